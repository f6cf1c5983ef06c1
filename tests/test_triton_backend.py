"""The ``triton`` backend against the ``reference`` backend, step by step, on the interpreter.

A 3-layer network is trained for three steps by both backends from the same initial state, on
the same batches; after every layer step the losses, goodness, outputs, parameters, peer means
and optimizer state must agree. Plus the validation errors, the frozen-layer path, the
data-parallel path and a guard that the Triton kernels really ran.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import pytest
import torch

from ffkern import reference
from ffkern.backends import FFLayer, get_backend
from ffkern.backends.reference import ReferenceBackend
from ffkern.backends.triton import TritonBackend
from ffkern.kernels import config as kconfig
from ffkern.kernels.ff_forward import ff_forward_kernel
from ffkern.optim import OptimConfig
from ffkern.profiling import nvtx_range

pytestmark = pytest.mark.filterwarnings(
    "ignore:Conversion of an array with ndim:DeprecationWarning"
)

# (atol, rtol): float32 throughout; the two backends differ only in the order of summation
# (see TOLERANCES in test_kernels.py), compounded over 3 layers x 3 steps of updates, which
# feed each step's rounding differences into the next step's inputs. Parameters move by
# lr x (a gradient of size ~1), so 1e-4 relative (on values ~1) leaves a wide margin over the
# ~1e-6 observed while still catching any wrong term (which would be ~lr = 5e-2).
TOL = {"atol": 2e-5, "rtol": 1e-4}

WIDTHS = (20, 45, 33, 17)  # K, then the three layers' D (none a multiple of 64)
N, N_POS = 30, 13


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


def build_layers(seed: int = 0) -> list[FFLayer]:
    """Layers initialized like ffkern.model does: W ~ N(0, 1/K), b = 0, peer means 0."""
    gen = torch.Generator().manual_seed(seed)
    return [
        FFLayer(
            weight=torch.randn(d, k, generator=gen) / math.sqrt(k),
            bias=torch.zeros(d),
            peer_mean=torch.zeros(d),
        )
        for k, d in zip(WIDTHS[:-1], WIDTHS[1:], strict=True)
    ]


def batches(steps: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(N, WIDTHS[0], generator=gen) + 0.1 for _ in range(steps)]


def compare_training(
    backend: TritonBackend,
    obj: reference.LayerObjective,
    opt: OptimConfig,
    steps: int = 3,
    reduce=None,
    n_pos: int = N_POS,
) -> None:
    ours, theirs = build_layers(), build_layers()
    ref = ReferenceBackend()
    for step, x in enumerate(batches(steps)):
        a, b = backend.normalize(x, obj), ref.normalize(x, obj)
        for i, (la, lb) in enumerate(zip(ours, theirs, strict=True)):
            where = f"step {step} layer {i}"
            oa = backend.step(la, a, n_pos, obj, opt, 0.05, reduce)
            ob = ref.step(lb, b, n_pos, obj, opt, 0.05, reduce)
            close(oa.loss, ob.loss, f"{where}: loss")
            close(oa.goodness, ob.goodness, f"{where}: goodness")
            close(oa.out.x, ob.out.x, f"{where}: h")
            close(oa.out.scale, ob.out.scale, f"{where}: r'")
            close(la.weight, lb.weight, f"{where}: weight")
            close(la.bias, lb.bias, f"{where}: bias")
            close(la.peer_mean, lb.peer_mean, f"{where}: peer mean")
            assert la.step == lb.step == step + 1
            assert la.opt_state.keys() == lb.opt_state.keys()
            for key in lb.opt_state:
                close(la.opt_state[key], lb.opt_state[key], f"{where}: {key}")
            a, b = oa.out, ob.out


OBJ = reference.LayerObjective(threshold=3.0, temperature=2.0, peer_strength=0.3)


@pytest.mark.parametrize("name", ["sgd", "adam"])
@pytest.mark.parametrize("fusion", ["gemm", "row"])
def test_training_matches_reference(name, fusion):
    opt = OptimConfig(name=name, lr=0.05, weight_decay=1e-3)
    compare_training(TritonBackend("cpu", fusion=fusion), OBJ, opt)


@pytest.mark.parametrize(
    "obj",
    [
        reference.LayerObjective(goodness="mean", norm="l2", peer_strength=0.0),
        reference.LayerObjective(threshold=3.0, objective="reversed", peer_strength=0.3),
    ],
    ids=["mean-l2-nopeer", "reversed"],
)
def test_training_other_objectives(obj):
    compare_training(TritonBackend("cpu"), obj, OptimConfig(name="adam"), steps=2)


def test_training_symba_runs_in_torch():
    # SymBa pairs row i with row n_pos + i, so it needs as many negatives as positives.
    obj = reference.LayerObjective(objective="symba", peer_strength=0.3)
    backend = TritonBackend("cpu")
    compare_training(backend, obj, OptimConfig(name="sgd"), steps=2, n_pos=N // 2)


def test_custom_objective_is_used():
    calls = []

    def torch_logistic(g, n_pos, obj, width):
        calls.append(tuple(g.shape))
        return reference.loss_and_coef(g, n_pos, obj, width)

    backend = TritonBackend("cpu", objective=torch_logistic)
    compare_training(backend, OBJ, OptimConfig(name="sgd"), steps=1)
    assert calls == [(N,)] * 3
    assert "torch_logistic" in backend.describe()


def test_data_parallel_path_matches_reference():
    # A stand-in for an all-reduce over ranks that changes the values, so that a path that
    # skipped it would not match.
    def reduce(t: torch.Tensor) -> torch.Tensor:
        return 0.75 * t

    compare_training(TritonBackend("cpu"), OBJ, OptimConfig(name="adam"), steps=2, reduce=reduce)


def test_forward_and_frozen_layer_match_reference():
    backend, ref = TritonBackend("cpu"), ReferenceBackend()
    layers = build_layers()
    x = batches(1)[0]
    a, b = backend.normalize(x, OBJ), ref.normalize(x, OBJ)
    for layer in layers:
        ga, a = backend.forward(layer, a, OBJ)
        gb, b = ref.forward(layer, b, OBJ)
        close(ga, gb, "forward goodness")
        close(a.x, b.x, "forward h")
        close(a.scale, b.scale, "forward r'")
    layer = build_layers()[0]
    layer.frozen = True
    before = copy.deepcopy(layer)
    inp = backend.normalize(x, OBJ)
    oa = backend.step(layer, inp, N_POS, OBJ, OptimConfig(), 0.05)
    ob = ref.step(before, inp, N_POS, OBJ, OptimConfig(), 0.05)
    close(oa.loss, ob.loss, "frozen loss")
    close(oa.goodness, ob.goodness, "frozen goodness")
    assert torch.equal(layer.weight, before.weight) and torch.equal(layer.bias, before.bias)
    assert torch.equal(layer.peer_mean, before.peer_mean)
    assert layer.step == 0 and layer.opt_state == {}


@pytest.mark.parametrize("n_pos", [0, N])
def test_all_negative_and_all_positive_batches(n_pos):
    backend, ref = TritonBackend("cpu"), ReferenceBackend()
    la, lb = build_layers()[0], build_layers()[0]
    x = batches(1)[0]
    inp = backend.normalize(x, OBJ)
    oa = backend.step(la, inp, n_pos, OBJ, OptimConfig(), 0.05)
    ob = ref.step(lb, inp, n_pos, OBJ, OptimConfig(), 0.05)
    close(oa.loss, ob.loss, "loss")
    close(la.weight, lb.weight, "weight")
    close(la.peer_mean, lb.peer_mean, "peer mean")


def test_interpreter_really_ran_the_kernels():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert kconfig.is_interpreted(ff_forward_kernel)
    backend = TritonBackend("cpu")
    assert backend.interpreted and "interpreter" in backend.describe()
    before = dict(kconfig.LAUNCH_COUNTS)
    layer = build_layers()[0]
    x = batches(1)[0]
    backend.step(layer, backend.normalize(x, OBJ), N_POS, OBJ, OptimConfig(), 0.05)
    for kernel in ("ff_forward_kernel", "ff_row_stats_kernel", "ff_wgrad_kernel"):
        assert kconfig.LAUNCH_COUNTS[kernel] == before.get(kernel, 0) + 1, kernel
    row = TritonBackend("cpu", fusion="row")
    row.step(layer, row.normalize(x, OBJ), N_POS, OBJ, OptimConfig(), 0.05)
    assert kconfig.LAUNCH_COUNTS["ff_row_kernel"] == before.get("ff_row_kernel", 0) + 1


def test_get_backend_builds_the_triton_backend():
    backend = get_backend("triton", "cpu", "fp32")
    assert isinstance(backend, TritonBackend) and backend.name == "triton"
    assert "fp32" in backend.describe()


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision_is_refused_on_the_interpreter(precision):
    with pytest.raises(ValueError, match="interpreter"):
        TritonBackend("cpu", precision=precision)


def test_cpu_without_interpreter_is_refused():
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kconfig.check_precision("fp32", interpreted=False, device_type="cpu")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="fusion"):
        TritonBackend("cpu", fusion="full")
    with pytest.raises(ValueError, match="precision"):
        TritonBackend("cpu", precision="fp16")
    with pytest.raises(ValueError, match="objective"):
        TritonBackend("cpu", fusion="row", objective=reference.loss_and_coef)


def test_bad_layers_and_inputs_are_refused():
    backend = TritonBackend("cpu")
    x = batches(1)[0]
    inp = backend.normalize(x, OBJ)
    opt = OptimConfig()
    layer = build_layers()[0]
    bad = copy.deepcopy(layer)
    bad.weight = bad.weight.double()
    with pytest.raises(TypeError, match="layer.weight must be torch.float32"):
        backend.step(bad, inp, N_POS, OBJ, opt, 0.05)
    bad = copy.deepcopy(layer)
    bad.bias = torch.zeros(3)
    with pytest.raises(ValueError, match=r"layer.bias must have shape \(45,\)"):
        backend.step(bad, inp, N_POS, OBJ, opt, 0.05)
    bad = copy.deepcopy(layer)
    bad.weight = torch.randn(WIDTHS[0], WIDTHS[1]).t()
    with pytest.raises(ValueError, match="contiguous"):
        backend.step(bad, inp, N_POS, OBJ, opt, 0.05)
    with pytest.raises(ValueError, match="20 columns"):
        backend.step(layer, backend.normalize(x[:, :7], OBJ), N_POS, OBJ, opt, 0.05)
    with pytest.raises(ValueError, match="inp.scale must have shape"):
        backend.step(layer, type(inp)(inp.x, inp.scale[:4]), N_POS, OBJ, opt, 0.05)
    with pytest.raises(TypeError, match="inp.x must be torch.float32"):
        backend.step(layer, type(inp)(inp.x.half(), inp.scale), N_POS, OBJ, opt, 0.05)
    for n_pos in (-1, N + 1, 2.0):
        with pytest.raises(ValueError, match="n_pos"):
            backend.step(layer, inp, n_pos, OBJ, opt, 0.05)
    with pytest.raises(ValueError, match="symba"):
        symba = reference.LayerObjective(objective="symba")
        TritonBackend("cpu", fusion="row").step(layer, inp, N_POS, symba, opt, 0.05)
    bad = copy.deepcopy(layer)
    bad.opt_state["weight.momentum"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"opt_state\['weight.momentum'\]"):
        backend.step(bad, inp, N_POS, OBJ, opt, 0.05)


def test_nvtx_range_is_a_silent_no_op_here():
    with nvtx_range("ff.test"):
        value = 1
    assert value == 1


def test_imports_do_not_touch_the_gpu():
    # torch.cuda queries raise in the child, so an import-time query would fail it.
    code = (
        "import os, torch\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "def boom(*a, **k):\n"
        "    raise RuntimeError('GPU queried at import time')\n"
        "torch.cuda.is_available = boom\n"
        "torch.cuda.device_count = boom\n"
        "torch.cuda.get_device_capability = boom\n"
        "import ffkern.kernels, ffkern.kernels.ff_forward, ffkern.kernels.ff_row\n"
        "import ffkern.kernels.ff_wgrad, ffkern.backends.triton, ffkern.profiling\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
