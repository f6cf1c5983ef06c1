"""Every Triton kernel against :mod:`ffkern.reference`, on the CPU through Triton's interpreter.

Inputs are fresh random draws (never zeros); every output buffer starts as NaN so an element a
kernel forgot to write fails the comparison; shapes are not multiples of the block sizes. The
objective of each case puts the threshold near the typical goodness and scales the temperature
with it, so both signs of ``g - θ`` occur and ``σ(-u)`` is not saturated: otherwise half the
rows would have ``c = 0`` and a wrong ``dz`` could pass unseen.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from ffkern import optim, reference
from ffkern.kernels import config as kconfig
from ffkern.kernels.ff_forward import forward_gemm, row_stats
from ffkern.kernels.ff_row import ff_row
from ffkern.kernels.ff_wgrad import weight_grad, weight_grad_update_

# Triton 3.6's interpreter converts 1-element arrays to ints in a way numpy 2.2 deprecates.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Conversion of an array with ndim:DeprecationWarning"
)

# (atol, rtol) per operand dtype and quantity class. Only float32 runs on the interpreter
# (tl.dot with "ieee" is exact float32 FMA, so only the order of summation differs from torch);
# the GPU precisions have their own table in test_gpu.py.
TOLERANCES = {
    torch.float32: {
        # Sums of at most a few thousand float32 terms of size ~1: each rounding is 2⁻²⁴ ≈ 6e-8
        # relative, and random-order errors grow like sqrt(terms), so 1e-5 relative bounds
        # them with two orders of margin; atol covers entries that cancel to near zero.
        "direct": (1e-5, 1e-5),
        # Quantities downstream of g (c, ℓ, dz, dW, updated parameters): g = Σ_j h_ij² over up
        # to 2049 units carries ~1e-6 relative error, which (g - θ)/T turns into an absolute
        # error in u of up to ~1e-4 (θ ~ D/2, T ~ sqrt(D)); σ and softplus pass it on 1:1.
        "derived": (1e-5, 2e-4),
    },
}

# (N rows, K inputs, D units): batch sizes 1, 7, 130 and widths 1, 33, 1000, 2049, none a
# multiple of the interpreter's 64 x 64 x 32 tiles or its 1024-wide row blocks, so every
# kernel meets partial tiles; 2049 spans three row blocks (the split reduction). The widest
# layers get few rows and a small K to keep the interpreter's run time in check.
SHAPES = [(1, 5, 33), (7, 33, 1), (7, 19, 2049), (130, 33, 1000), (130, 40, 33)]

# (goodness, norm, peer strength, where the positives end: a fraction of N)
VARIANTS = [
    ("sum", "rms", 0.0, 0.5),
    ("mean", "l2", 0.4, 1.0),
    ("sum", "l2", 0.4, 0.0),
    ("mean", "rms", 0.4, 0.3),
]


def close(actual: torch.Tensor, expected: torch.Tensor, kind: str, what: str) -> None:
    atol, rtol = TOLERANCES[actual.dtype][kind]
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


@pytest.fixture(autouse=True)
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kconfig, "POISON_OUTPUTS", True)


def objective(width: int, goodness: str, norm: str, peer: float) -> reference.LayerObjective:
    """θ at the mean goodness of unit-variance pre-activations, T at its spread."""
    mean_g = 0.5 * width if goodness == "sum" else 0.5
    spread = math.sqrt(width) if goodness == "sum" else 1.0 / math.sqrt(width)
    return reference.LayerObjective(
        goodness=goodness,
        threshold=mean_g,
        temperature=spread,
        norm=norm,
        peer_strength=peer,
    )


def layer_inputs(n: int, k: int, d: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=gen) * 3.0 + 0.5
    return {
        "x": x,
        "scale": reference.norm_scale(x, "rms", 1e-8),
        "weight": torch.randn(d, k, generator=gen) / math.sqrt(k),
        "bias": 0.3 * torch.randn(d, generator=gen),
        "peer_mean": torch.rand(d, generator=gen),
    }


def cases():
    for shape in SHAPES:
        for variant in VARIANTS:
            yield pytest.param(shape, variant, id=f"{shape}-{'-'.join(map(str, variant))}")


def run_reference(shape, variant, seed=0):
    n, k, d = shape
    goodness, norm, peer, frac = variant
    obj = objective(d, goodness, norm, peer)
    n_pos = round(frac * n)
    t = layer_inputs(n, k, d, seed)
    res = reference.layer_step(
        t["weight"], t["bias"], t["x"], t["scale"], n_pos, obj, t["peer_mean"]
    )
    _, phi = reference.peer_update(res.h, n_pos, t["peer_mean"], obj)
    return t, obj, n_pos, res, (phi if peer and n_pos else None)


@pytest.mark.parametrize("shape, variant", cases())
def test_forward_gemm_and_row_stats(shape, variant):
    t, obj, n_pos, res, phi = run_reference(shape, variant)
    d = shape[2]
    h, q_part, p = forward_gemm(
        t["x"], t["scale"], t["weight"], t["bias"], n_pos, peer=phi is not None
    )
    close(h, res.h, "direct", "h")
    if phi is not None:
        close(p, res.h[:n_pos].sum(dim=0), "direct", "column sums over positives")
    logistic = (obj.theta(d), obj.temperature, obj.kappa(d), 1.0)
    q, g, scale_out, coef, loss = row_stats(
        q_part, d, n_pos, obj.goodness, obj.norm, obj.norm_eps, logistic
    )
    close(q, (res.h * res.h).sum(dim=1), "direct", "q")
    close(g, res.goodness, "direct", "g")
    close(scale_out, res.out_scale, "direct", "r'")
    close(coef, res.coef, "derived", "c")
    close(loss, res.loss, "derived", "L")


def test_row_stats_reversed_and_without_logistic():
    t, obj, n_pos, _, _ = run_reference((130, 40, 33), ("sum", "rms", 0.0, 0.4))
    rev = reference.LayerObjective(
        threshold=obj.threshold, temperature=obj.temperature, objective="reversed"
    )
    res = reference.layer_step(
        t["weight"], t["bias"], t["x"], t["scale"], n_pos, rev, t["peer_mean"]
    )
    _, q_part, _ = forward_gemm(t["x"], t["scale"], t["weight"], t["bias"], n_pos)
    logistic = (rev.theta(33), rev.temperature, rev.kappa(33), -1.0)
    _, g, _, coef, loss = row_stats(q_part, 33, n_pos, "sum", "rms", 1e-8, logistic)
    close(coef, res.coef, "derived", "c (reversed)")
    close(loss, res.loss, "derived", "L (reversed)")
    _, g2, _, none_c, none_l = row_stats(q_part, 33, n_pos, "sum", "rms", 1e-8)
    assert none_c is None and none_l is None
    close(g2, g, "direct", "g without the logistic part")


def test_forward_gemm_strided_input():
    n, k, d = 37, 45, 50
    t = layer_inputs(n, k, d, seed=3)
    x_t = t["x"].t().contiguous().t()  # same values, column-major strides
    assert not x_t.is_contiguous()
    h, _, _ = forward_gemm(x_t, t["scale"], t["weight"], t["bias"])
    _, h_ref = reference.forward(t["weight"], t["bias"], t["x"], t["scale"])
    close(h, h_ref, "direct", "h from a column-major x")


@pytest.mark.parametrize("shape, variant", cases())
def test_row_kernel(shape, variant):
    t, obj, n_pos, res, phi = run_reference(shape, variant)
    d = shape[2]
    z, _ = reference.forward(t["weight"], t["bias"], t["x"], t["scale"])
    out = ff_row(
        z, n_pos, phi, obj.goodness, obj.norm, obj.norm_eps, obj.theta(d), obj.temperature,
        obj.kappa(d), normalized=True,
    )  # fmt: skip
    close(out["h"], res.h, "direct", "h")
    close(out["g"], res.goodness, "direct", "g")
    close(out["scale_out"], res.out_scale, "direct", "r'")
    close(out["y"], res.out_scale[:, None] * res.h, "direct", "y = r' h")
    close(out["coef"], res.coef, "derived", "c")
    close(out["loss"].mean(), res.loss, "derived", "L")
    close(out["dz"], res.dz, "derived", "dz")


def test_row_kernel_strided_input():
    t, obj, n_pos, res, phi = run_reference((7, 19, 300), ("sum", "rms", 0.4, 0.5))
    z, _ = reference.forward(t["weight"], t["bias"], t["x"], t["scale"])
    z_t = z.t().contiguous().t()
    out = ff_row(z_t, n_pos, phi, "sum", "rms", 1e-8, obj.theta(300), obj.temperature, 2.0)
    close(out["dz"], res.dz, "derived", "dz from a column-major z")


@pytest.mark.parametrize("shape, variant", cases())
def test_weight_grad(shape, variant):
    t, _, n_pos, res, phi = run_reference(shape, variant)
    dw, db = weight_grad(res.h, t["x"], t["scale"], res.coef, phi, n_pos)
    close(dw, res.dw, "derived", "dW")
    close(db, res.db, "derived", "db")


def test_weight_grad_strided_input():
    t, _, n_pos, res, phi = run_reference((130, 40, 33), ("sum", "rms", 0.4, 0.5))
    x_t = t["x"].t().contiguous().t()
    h_t = res.h.t().contiguous().t()
    dw, db = weight_grad(h_t, x_t, t["scale"], res.coef, phi, n_pos)
    close(dw, res.dw, "derived", "dW from column-major h and x")
    close(db, res.db, "derived", "db from column-major h and x")


@pytest.mark.parametrize("name", ["sgd", "adam"])
@pytest.mark.parametrize("shape", [(7, 33, 1), (130, 33, 1000), (130, 40, 33)])
def test_weight_grad_update(name, shape):
    t, _, n_pos, res, phi = run_reference(shape, ("mean", "rms", 0.4, 0.5), seed=5)
    cfg = optim.OptimConfig(name=name, lr=0.05, weight_decay=0.01)
    gen = torch.Generator().manual_seed(11)
    state = {}
    for pname in ("weight", "bias"):
        for sname in cfg.state_names():
            # Non-zero state (v ≥ 0 for Adam's second moment), as after a few steps.
            state[f"{pname}.{sname}"] = torch.rand(t[pname].shape, generator=gen) * 0.1
    weight, bias = t["weight"].clone(), t["bias"].clone()
    state_k = {key: v.clone() for key, v in state.items()}
    weight_grad_update_(
        res.h, t["x"], t["scale"], res.coef, phi, n_pos, weight, bias, state_k, cfg, 0.05, 3
    )
    ref_w, ref_b = t["weight"].clone(), t["bias"].clone()
    for pname, param, grad in (("weight", ref_w, res.dw), ("bias", ref_b, res.db)):
        sub = {s: state[f"{pname}.{s}"] for s in cfg.state_names()}
        optim.update_(cfg, param, grad, sub, 0.05, 3)
    close(weight, ref_w, "derived", f"{name}: W")
    close(bias, ref_b, "derived", f"{name}: b")
    for key in state:
        close(state_k[key], state[key], "derived", f"{name}: {key}")


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """Every GPU configuration lowers to an sm_90 cubin, fits shared memory and spills little.

    Needs no GPU (Triton ships ptxas), but the interpreter must be off, hence a subprocess.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "ffkern.kernels.sm90_check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr.count("ok ") >= 20, done.stderr
