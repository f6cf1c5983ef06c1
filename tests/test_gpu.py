"""The Triton kernels and backend on a CUDA GPU, in fp32, tf32 and bf16, against the reference.

Skipped, with the reason shown, where CUDA is absent. Errors are measured against a float64
reference computed from the same (for bf16: the same bf16-rounded) operands, and normalized by
the largest reference magnitude, ``max|a - b| / max|b|``: reduced-precision errors scale with
the size of the terms summed, not with each result, so elementwise relative tolerances would
fail on the entries that happen to cancel.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from ffkern import optim, reference
from ffkern.backends import FFLayer
from ffkern.backends.reference import ReferenceBackend
from ffkern.backends.triton import TritonBackend
from ffkern.kernels import config as kconfig
from ffkern.kernels.ff_forward import forward_gemm, row_stats
from ffkern.kernels.ff_row import ff_row
from ffkern.kernels.ff_wgrad import weight_grad, weight_grad_update_
from ffkern.optim import OptimConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# Normalized error bounds per precision (see the module docstring).
TOLERANCES = {
    # ieee fp32 FMA: only the order of summation differs; K, N up to a few thousand terms.
    "fp32": 2e-5,
    # tf32 keeps 10 mantissa bits: each product is off by up to 2⁻¹¹ ≈ 5e-4 relative, and
    # the random-sign errors of a sum grow like its typical size, so ~1e-3 of the largest
    # entry; 5e-3 leaves margin for the chained quantities (c from g, dW from c).
    "tf32": 5e-3,
    # bf16 keeps 7 mantissa bits: operands (x, W tiles, h, r·dz) round by up to 2⁻⁸ ≈ 4e-3
    # relative, two roundings per product; 2e-2 of the largest entry.
    "bf16": 2e-2,
}
# Training drifts as each step's rounding feeds the next; three steps at most triple it.
TRAIN_FACTOR = 3.0

PRECISIONS = ("fp32", "tf32", "bf16")


def nerr(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` in float64; deliberately synchronizes (tests only)."""
    a, b = actual.double(), expected.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check(actual, expected, precision, what, factor=1.0):
    err = nerr(actual, expected)
    assert math.isfinite(err) and err <= TOLERANCES[precision] * factor, (
        f"{what} ({precision}): normalized error {err:.3g} > {TOLERANCES[precision] * factor:.3g}"
    )


@pytest.fixture(autouse=True)
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kconfig, "POISON_OUTPUTS", True)


def inputs(n: int, k: int, d: int, precision: str, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.rand(n, k, device="cuda", generator=gen) * 2.0
    w = torch.randn(d, k, device="cuda", generator=gen) / math.sqrt(k)
    b = 0.1 * torch.randn(d, device="cuda", generator=gen)
    pm = torch.rand(d, device="cuda", generator=gen)
    if precision == "bf16":
        # The kernels round x and W tiles to bf16; the reference starts from the same values.
        x = x.bfloat16()
        w_ref = w.bfloat16().double()
    else:
        w_ref = w.double()
    x_ref = x.double()
    scale = reference.norm_scale(x_ref, "rms", 1e-8).float()
    return x, scale, w, b, pm, x_ref, w_ref


# (N, K, D, n_pos): odd sizes around the tile sizes, and the target width 2000.
GPU_SHAPES = [(1, 33, 1), (257, 130, 1000), (1000, 784, 2000), (513, 2049, 77)]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_kernels_match_reference(precision, shape):
    n, k, d = shape
    n_pos = n // 2
    obj = reference.LayerObjective(threshold=0.5 * d, temperature=math.sqrt(d), peer_strength=0.1)
    x, scale, w, b, pm, x_ref, w_ref = inputs(n, k, d, precision)
    res = reference.layer_step(w_ref, b.double(), x_ref, scale.double(), n_pos, obj, pm.double())
    _, phi = reference.peer_update(res.h, n_pos, pm.double(), obj)
    peer = phi.float() if n_pos else None
    h, q_part, p = forward_gemm(x, scale, w, b, n_pos, peer=peer is not None, precision=precision)
    check(h, res.h, precision, "h")
    if peer is not None:
        check(p, res.h[:n_pos].sum(dim=0), precision, "positive column sums")
    logistic = (obj.theta(d), obj.temperature, obj.kappa(d), 1.0)
    q, g, scale_out, coef, loss = row_stats(q_part, d, n_pos, "sum", "rms", 1e-8, logistic)
    check(g, res.goodness, precision, "g")
    check(scale_out, res.out_scale, precision, "r'")
    check(coef, res.coef, precision, "c", factor=2.0)
    check(loss, res.loss, precision, "L", factor=2.0)
    # The weight gradient from the reference's own h and c isolates this kernel's error.
    operand = torch.bfloat16 if precision == "bf16" else torch.float32
    dw, db = weight_grad(res.h.to(operand), x, scale, res.coef.float(), peer, n_pos, precision)
    check(dw, res.dw, precision, "dW", factor=2.0)
    check(db, res.db, precision, "db", factor=2.0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_row_kernel_matches_reference(precision):
    n, k, d = 1000, 300, 2049
    n_pos = 400
    obj = reference.LayerObjective(threshold=0.5 * d, temperature=math.sqrt(d), peer_strength=0.1)
    x, scale, w, b, pm, x_ref, w_ref = inputs(n, k, d, "fp32")
    res = reference.layer_step(
        w.double(), b.double(), x_ref, scale.double(), n_pos, obj, pm.double()
    )
    _, phi = reference.peer_update(res.h, n_pos, pm.double(), obj)
    z, _ = reference.forward(w, b, x, scale)
    operand = torch.bfloat16 if precision == "bf16" else torch.float32
    out = ff_row(
        z, n_pos, phi.float(), "sum", "rms", 1e-8, obj.theta(d), obj.temperature, 2.0,
        out_dtype=operand, normalized=True,
    )  # fmt: skip
    check(out["h"], res.h, precision, "h")
    check(out["dz"], res.dz, precision, "dz", factor=2.0)
    check(out["g"], res.goodness, "fp32", "g")
    check(out["coef"], res.coef, "fp32", "c", factor=2.0)
    check(out["scale_out"], res.out_scale, "fp32", "r'")


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_fused_update_matches_optim(name):
    n, k, d = 777, 513, 1000
    x, scale, w, b, pm, _, _ = inputs(n, k, d, "fp32", seed=4)
    h = torch.relu(torch.randn(n, d, device="cuda"))
    coef = torch.randn(n, device="cuda") / n
    phi = 1e-3 * torch.randn(d, device="cuda")
    cfg = OptimConfig(name=name, lr=0.01, weight_decay=1e-2)
    state = {
        f"{p}.{s}": torch.rand_like(t) * 0.01
        for p, t in (("weight", w), ("bias", b))
        for s in cfg.state_names()
    }
    dw, db = weight_grad(h, x, scale, coef, phi, 300, "fp32")
    ref_w, ref_b = w.clone(), b.clone()
    ref_state = {key: t.clone() for key, t in state.items()}
    for pname, param, grad in (("weight", ref_w, dw), ("bias", ref_b, db)):
        optim.update_(cfg, param, grad, {s: ref_state[f"{pname}.{s}"] for s in cfg.state_names()},
                      0.01, 2)  # fmt: skip
    weight_grad_update_(h, x, scale, coef, phi, 300, w, b, state, cfg, 0.01, 2, "fp32")
    check(w, ref_w, "fp32", "W")
    check(b, ref_b, "fp32", "b")
    for key in state:
        check(state[key], ref_state[key], "fp32", key)


def build_layers(widths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        FFLayer(
            weight=(torch.randn(d, k, generator=gen) / math.sqrt(k)).cuda(),
            bias=torch.zeros(d, device="cuda"),
            peer_mean=torch.zeros(d, device="cuda"),
        )
        for k, d in zip(widths[:-1], widths[1:], strict=True)
    ]


@pytest.mark.parametrize("fusion", ["gemm", "row"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_training_steps_match_reference(precision, fusion):
    widths, n, n_pos = (784, 500, 500, 300), 512, 256
    obj = reference.LayerObjective(threshold=100.0, temperature=10.0, peer_strength=0.03)
    opt = OptimConfig(name="sgd", lr=0.05, momentum=0.9)
    backend, ref = TritonBackend("cuda", precision, fusion=fusion), ReferenceBackend()
    ours, theirs = build_layers(widths), build_layers(widths)
    start = [layer.weight.clone() for layer in ours]
    gen = torch.Generator(device="cuda").manual_seed(7)
    for step in range(3):
        x = torch.rand(n, widths[0], device="cuda", generator=gen)
        a, b = backend.normalize(x, obj), ref.normalize(x, obj)
        for i, (la, lb) in enumerate(zip(ours, theirs, strict=True)):
            oa = backend.step(la, a, n_pos, obj, opt, 0.05)
            ob = ref.step(lb, b, n_pos, obj, opt, 0.05)
            where = f"step {step} layer {i}"
            check(oa.goodness, ob.goodness, precision, f"{where}: g", TRAIN_FACTOR)
            check(oa.loss, ob.loss, precision, f"{where}: L", TRAIN_FACTOR)
            check(oa.out.scale, ob.out.scale, precision, f"{where}: r'", TRAIN_FACTOR)
            # Compare what the updates did, not the weights (which barely move in 3 steps).
            check(la.weight - start[i], lb.weight - start[i], precision, f"{where}: ΔW",
                  4 * TRAIN_FACTOR)  # fmt: skip
            a, b = oa.out, ob.out


def test_adam_training_fp32_matches_reference():
    widths, n, n_pos = (300, 257, 129), 300, 100
    obj = reference.LayerObjective(threshold=50.0, temperature=8.0, peer_strength=0.03)
    opt = OptimConfig(name="adam", lr=1e-3)
    backend, ref = TritonBackend("cuda", "fp32"), ReferenceBackend()
    ours, theirs = build_layers(widths), build_layers(widths)
    gen = torch.Generator(device="cuda").manual_seed(3)
    for _ in range(3):
        x = torch.rand(n, widths[0], device="cuda", generator=gen)
        a, b = backend.normalize(x, obj), ref.normalize(x, obj)
        for la, lb in zip(ours, theirs, strict=True):
            oa = backend.step(la, a, n_pos, obj, opt, 1e-3)
            ob = ref.step(lb, b, n_pos, obj, opt, 1e-3)
            check(la.weight, lb.weight, "fp32", "W", TRAIN_FACTOR)
            check(la.opt_state["weight.exp_avg"], lb.opt_state["weight.exp_avg"], "fp32", "m",
                  TRAIN_FACTOR * 10)  # fmt: skip
            check(oa.loss, ob.loss, "fp32", "L", TRAIN_FACTOR)
            a, b = oa.out, ob.out


@pytest.mark.parametrize("precision", PRECISIONS)
def test_target_shape_runs(precision):
    """One step at the benchmark shape (4096 + 4096 rows, 2000 -> 2000): compiles and is finite.

    This is the configuration the block-size table was chosen for, so it exercises the
    shared-memory budget of the Hopper tiles.
    """
    n, d = 8192, 2000
    layer = build_layers((d, d))[0]
    backend = TritonBackend("cuda", precision)
    obj = reference.LayerObjective(peer_strength=0.03)
    x = torch.rand(n, d, device="cuda")
    out = backend.step(layer, backend.normalize(x, obj), n // 2, obj, OptimConfig(), 0.01)
    torch.cuda.synchronize()
    assert torch.isfinite(out.loss) and torch.isfinite(layer.weight).all()
    assert out.out.x.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)


def _median_ms(fn, repeats: int = 20) -> float:
    """Median time of ``fn()`` in milliseconds, measured with CUDA events after a warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_fused_step_time_against_two_cublas_gemms(precision, caplog):
    """Logs (does not assert) the fused step's time over two bare cuBLAS GEMMs of its shapes.

    The design target is at most 1.25 x (kernels/NOTES.md); a timing assertion would make the
    suite flaky on shared machines, so the ratio is reported for a person to judge; see it with
    ``pytest tests/test_gpu.py -k time -o log_cli=true -o log_cli_level=INFO``.
    """
    caplog.set_level(logging.INFO)
    n, d = 8192, 2000
    operand = torch.bfloat16 if precision == "bf16" else torch.float32
    layer = build_layers((d, d))[0]
    backend = TritonBackend("cuda", precision)
    obj = reference.LayerObjective(peer_strength=0.03)
    opt = OptimConfig(lr=1e-4)
    x = torch.rand(n, d, device="cuda").to(operand)
    inp = backend.normalize(x, obj)
    a, w, dz = x, layer.weight.to(operand), torch.rand(n, d, device="cuda").to(operand)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        cublas = _median_ms(lambda: (a @ w.t(), dz.t() @ a))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    fused = _median_ms(lambda: backend.step(layer, inp, n // 2, obj, opt, 1e-4))
    flops = 2 * 2 * n * d * d
    logging.getLogger(__name__).info(
        "%s: fused step %.3f ms (%.0f TFLOP/s), two cuBLAS GEMMs %.3f ms, ratio %.2f",
        precision, fused, flops / fused / 1e9, cublas, fused / cublas,
    )  # fmt: skip
    assert fused > 0 and cublas > 0
