r"""Training throughput of Forward-Forward: ffkern's backends against two torch baselines.

Run ``python bench/throughput.py`` (the full sweep), ``--quick`` (under a minute on two CPU
cores), or ``--config cpu-target`` / ``--config gpu-target`` (the performance targets, with a
PASS/FAIL section). ``--json PATH`` and ``--plot PATH`` save the rows; see bench/README.md.

What is timed
-------------
One *step* is one full training step on a minibatch of ``B`` labelled images of ``K = 784``
features (MNIST-sized, 10 classes), with every input prepared before the timed region:

``triton``, ``triton-row``, ``reference``
    ``FFNetwork.train_step``: embed the labels, draw ``B`` random wrong labels (negatives), then
    for every layer the forward pass on ``2B`` rows, the local loss, its closed-form gradient
    and the SGD update. The softmax head and peer normalization are switched off, so only the
    Forward-Forward layer steps are timed and the work equals the autograd baseline's.
``autograd``
    ``bench/autograd_baseline.py``: the same algorithm written like public FF code
    (``nn.Linear``, an autograd loss, ``.backward()`` and ``torch.optim.SGD`` per layer).
``backprop``
    ``bench/backprop_baseline.py``: the same MLP plus a softmax head trained by backprop.

Throughput is ``B / t`` positive samples per second (the ``B`` negatives are work the FF step
does, not samples it learns from), for the median step time ``t``.

FLOPs and the floor
-------------------
With ``d_0 = K`` and ``d_1 .. d_L`` the layer widths, multiply-adds counted as two FLOPs::

    FF step        8 B Σ_l d_{l-1} d_l     forward (2 · 2B · d_in · d_out) and weight gradient
                                           (the same again) on 2B rows; no input gradient, as
                                           every layer's input is detached
    backprop step  6 B Σ_l d_{l-1} d_l - 2 B d_0 d_1
                                           forward, weight and input gradients of B rows over
                                           the hidden layers and the head (d_{L+1} = C); the
                                           first layer's input gradient is never computed

The *floor* of a row is the time its FLOPs would take at the machine's matrix-product rate,
measured in the same run: the median rate of a large square matmul (2048² on CPU, 8192² on
GPU) at the precision the row uses, timed in turns with the rows of each case (so a machine
whose load drifts during the run still gets a floor from the same minutes as the row); the
higher of that rate and the one measured at the start of the run is used, so that a bad
moment of either never flatters a row.
``floor`` in the table is ``(FLOPs / t) / rate``: 1.0 would mean the step runs as fast as its
matrix products alone could.

The GPU layer target times one layer step (2000 → 2000, 4096 + 4096 rows) against the two
bare cuBLAS products of the same shapes and precision, ``Z = X Wᵀ`` (8192×2000 · 2000×2000)
and ``dW = dZᵀ X`` (2000×8192 · 8192×2000), timed as one pair.

Timing and memory
-----------------
Warm-up steps (which also compile Triton kernels), then repetitions until a time budget is
spent (at least ``MIN_REPS``), and the median. The implementations of one case take turns,
repetition by repetition, so that drifting load or clocks fall on all of them alike. On GPU
each step is bracketed by ``torch.cuda.Event`` records and the device is synchronized once
after the repetitions; on CPU ``time.perf_counter`` brackets each step. Peak memory is the
growth while an implementation is built (model and inputs) and warmed up; the timed
repetitions allocate nothing new. On GPU
``torch.cuda.max_memory_allocated`` minus the memory allocated before the row (peak statistics
reset first); on CPU the process's peak resident set (``VmHWM``) minus its resident set before
the row, after ``malloc_trim`` and after resetting the peak through ``/proc/self/clear_refs``.
Where that reset is not possible (not Linux) the CPU column is the growth of
``resource.getrusage``'s lifetime peak, a lower bound, and the JSON says so.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:  # the baselines sit next to this script
    sys.path.insert(0, str(BENCH_DIR))

from autograd_baseline import AutogradFF  # noqa: E402
from backprop_baseline import BackpropMLP, backprop_flops  # noqa: E402

IN_FEATURES = 784  # MNIST images, flattened
NUM_CLASSES = 10
LR = 1e-3  # a small constant rate: the updates are real but keep the weights well-behaved
MIN_REPS = 3  # timed repetitions at least, whatever the budget
MAX_REPS = 50
FF_IMPLS = ("triton", "triton-row", "reference", "autograd")
IMPLS = (*FF_IMPLS, "backprop")
PRECISIONS = ("fp32", "tf32", "bf16")

# The targets, in one place.
CPU_TARGET_NET = (1000, 1000, 1000)
CPU_TARGET_SPEEDUP = 2.0  # reference / autograd samples/s at batch 100
CPU_TARGET_FLOOR = 0.6  # reference fraction of the floor at batch 1000
GPU_TARGET_NET = (2000, 2000, 2000, 2000)
GPU_TARGET_BATCH = 1000
GPU_TARGET_SPEEDUP = 3.0  # triton / reference samples/s
GPU_LAYER_ROWS, GPU_LAYER_WIDTH = 4096, 2000  # positives (as many negatives) and D = K
GPU_LAYER_RATIO = 1.25  # triton layer step / two cuBLAS products
RECIPE_TARGET_S = 15.0  # Hinton's 4x2000 recipe, 60 epochs, on one H200


# ------------------------------------------------------------------------------------------------
# Cases and rows
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One network and batch size to time every implementation on."""

    layers: tuple[int, ...]  # hidden widths
    batch: int  # positive samples per step (as many negatives)
    group: str  # "grid" (width x depth), "batch" (batch sweep) or "target"

    @property
    def net(self) -> str:
        return net_name(self.layers)


@dataclass
class Row:
    """One implementation timed on one case (``status`` other than "ok": no timings)."""

    impl: str
    layers: list[int]
    batch: int
    group: str
    precision: str
    status: str = "ok"  # "ok", "skipped", "oom" or "error"
    note: str = ""
    ms_per_step: float | None = None  # median step time
    samples_per_s: float | None = None  # batch / median step time
    us_per_sample: float | None = None  # median step time / batch
    flops_per_step: int = 0  # FF or backprop formula, see the module docstring
    tflops: float | None = None  # achieved FLOP rate, 1e12 FLOP/s
    floor_fraction: float | None = None  # achieved rate / measured matmul rate
    speedup_vs_autograd: float | None = None  # samples/s over the autograd baseline's
    speedup_vs_reference: float | None = None  # samples/s over ffkern reference's
    floor_tflops: float | None = None  # the matmul rate timed in turns with this row
    peak_mib: float | None = None  # memory growth during the row, MiB
    reps: int = 0  # timed repetitions behind the median
    times_ms: list[float] = field(default_factory=list)  # every timed repetition


@dataclass(frozen=True)
class Preset:
    """What one ``--config`` runs."""

    cases: tuple[Case, ...]
    layer_target: tuple[int, int] | None  # (positive rows, width) of the layer-step target
    budget_s: float  # timed seconds per row (besides the warm-up)


def net_name(layers: Sequence[int]) -> str:
    """``3x1000`` for equal widths, else the widths joined by dashes (``500-300``)."""
    if len(set(layers)) == 1:
        return f"{len(layers)}x{layers[0]}"
    return "-".join(map(str, layers))


def ff_flops(batch: int, layers: Sequence[int], in_features: int = IN_FEATURES) -> int:
    """FLOPs of one FF step on ``batch`` positives and as many negatives: ``8 B Σ d_in d_out``."""
    widths = (in_features, *layers)
    return 8 * batch * sum(d_in * d_out for d_in, d_out in pairwise(widths))


def batches_up_to(cap: int) -> tuple[int, ...]:
    """The batch sweep: 100, 250, 500, 1000, 2000, 4096, 8192, 16384 up to ``cap``."""
    return tuple(b for b in (100, 250, 500, 1000, 2000, 4096, 8192, 16384) if b <= cap)


def make_preset(name: str, device: torch.device, quick: bool) -> Preset:
    """The cases of ``--config name`` on ``device`` (``--quick`` shrinks the sweep)."""
    gpu = device.type == "cuda"
    if name == "micro":  # for the tests: tiny, every code path, about a second
        cases = (Case((32, 32), 16, "grid"), Case((32, 32), 32, "batch"))
        return Preset(cases, (16, 48), 0.02)
    if name == "cpu-target":
        cases = tuple(Case(CPU_TARGET_NET, b, "target") for b in (100, 1000))
        return Preset(cases, None, 0.5 if quick else 3.0)
    if name == "gpu-target":
        cases = (Case(GPU_TARGET_NET, GPU_TARGET_BATCH, "target"),)
        layer = (GPU_LAYER_ROWS, GPU_LAYER_WIDTH) if gpu else (512, 500)
        return Preset(cases, layer, 0.3 if quick else 1.0)
    if name != "sweep":
        raise ValueError(f"unknown --config {name!r}; choose from {sorted(PRESETS)}")
    if quick and gpu:
        grid = [Case((w,) * d, 1000, "grid") for w in (1000, 2000) for d in (2, 4)]
        batch = [Case(GPU_TARGET_NET, b, "batch") for b in (100, 1000, 4096, 8192)]
        return Preset(tuple(grid + batch), None, 0.25)
    if quick:
        grid = [Case((w,) * d, 500, "grid") for w in (500, 1000) for d in (2, 3)]
        batch = [Case(CPU_TARGET_NET, b, "batch") for b in (100, 1000)]
        return Preset(tuple(grid + batch), None, 0.25)
    grid = [Case((w,) * d, 1000, "grid") for w in (500, 1000, 2000) for d in (2, 3, 4)]
    sweep_net = GPU_TARGET_NET if gpu else CPU_TARGET_NET
    batch = [Case(sweep_net, b, "batch") for b in batches_up_to(16384 if gpu else 8192)]
    return Preset(tuple(grid + batch), None, 0.5 if gpu else 1.0)


PRESETS = ("sweep", "cpu-target", "gpu-target", "micro")


# ------------------------------------------------------------------------------------------------
# Timing, memory, precision
# ------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (a no-op on the CPU, where ops are synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    steps: Sequence[Callable[[], object]], device: torch.device, warmup: int, budget_s: float
) -> list[list[float]]:
    """Seconds of each timed repetition of every step, the steps taking turns.

    Each step gets ``warmup`` untimed runs, then one probe run that sets its repetition count
    (what fits in ``budget_s``, clamped to ``MIN_REPS .. MAX_REPS``). The repetitions then go
    round-robin, step 1, step 2, ..., step 1, ..., so that a change in the machine's load (a
    shared CPU, a GPU clock ramp) falls on every implementation alike instead of on whichever
    was timed last. CUDA repetitions are bracketed by events and the device is synchronized
    once at the end, so no host sync sits between repetitions.
    """
    reps = []
    for step in steps:
        for _ in range(warmup):
            step()
        synchronize(device)
        t0 = time.perf_counter()
        step()
        synchronize(device)
        probe = time.perf_counter() - t0
        reps.append(max(MIN_REPS, min(MAX_REPS, int(budget_s / max(probe, 1e-9)))))
    cuda = device.type == "cuda"
    marks: list[list[Any]] = [[] for _ in steps]
    for r in range(max(reps, default=0)):
        for k, step in enumerate(steps):
            if r >= reps[k]:
                continue
            if cuda:
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                step()
                end.record()
                marks[k].append((start, end))
            else:
                t0 = time.perf_counter()
                step()
                marks[k].append(time.perf_counter() - t0)
    if not cuda:
        return marks
    torch.cuda.synchronize(device)
    return [[start.elapsed_time(end) / 1e3 for start, end in m] for m in marks]


def time_steps(
    step: Callable[[], object], device: torch.device, warmup: int, budget_s: float
) -> list[float]:
    """Seconds of each timed repetition of one step (see :func:`time_interleaved`)."""
    return time_interleaved([step], device, warmup, budget_s)[0]


def at_precision(step: Callable[[], object], precision: str) -> Callable[[], object]:
    """``step`` run with torch's CUDA matmuls at ``precision`` (TF32 on or off)."""

    def run() -> object:
        with precision_mode(precision):
            return step()

    return run


class MemoryMeter:
    """Peak memory growth over a block: CUDA allocator statistics, or the CPU resident set."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "cuda.max_memory_allocated" if device.type == "cuda" else _cpu_method()
        self._base = 0

    def __enter__(self) -> MemoryMeter:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _malloc_trim()
        if self.method == "VmHWM":
            Path("/proc/self/clear_refs").write_text("5")  # resets the peak to the current RSS
            self._base = _proc_status_kib("VmRSS") * 1024
        else:
            self._base = _ru_maxrss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def peak_bytes(self) -> int:
        """Bytes of peak growth since entering (valid inside or after the block)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self._base
        if self.method == "VmHWM":
            return _proc_status_kib("VmHWM") * 1024 - self._base
        return _ru_maxrss_bytes() - self._base


MEMORY_METHODS = {
    "cuda.max_memory_allocated": "torch.cuda.max_memory_allocated growth over the build and "
    "warm-up (peak statistics reset first)",
    "VmHWM": "peak resident set growth over the build and warm-up: VmHWM after minus VmRSS "
    "before, the peak reset through /proc/self/clear_refs after malloc_trim",
}


def _cpu_method() -> str:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _proc_status_kib("VmHWM")
    except OSError:
        return "getrusage ru_maxrss growth (lower bound)"
    return "VmHWM"


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {key} line")


def _ru_maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _malloc_trim() -> None:
    """Hand freed heap memory back to the system so the next row's growth is its own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class precision_mode:
    """Context: torch's CUDA matmuls use TF32 exactly when ``precision == "tf32"``."""

    def __init__(self, precision: str) -> None:
        self.precision = precision

    def __enter__(self) -> None:
        self._saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.precision == "tf32"

    def __exit__(self, *exc: object) -> None:
        torch.backends.cuda.matmul.allow_tf32 = self._saved


def matmul_step(device: torch.device, precision: str, n: int) -> tuple[Callable[[], object], int]:
    """An ``n x n`` by ``n x n`` matmul at ``precision`` (inputs bound) and its FLOPs."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return at_precision(lambda: torch.mm(a, b, out=out), precision), 2 * n**3


def matmul_rate(device: torch.device, precision: str, n: int, budget_s: float) -> float:
    """Median FLOP/s of an ``n x n`` by ``n x n`` matmul at ``precision`` (the floor)."""
    step, flops = matmul_step(device, precision, n)
    return flops / statistics.median(time_steps(step, device, 2, budget_s))


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (CUDA's, or the CPU allocator's)."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and (
        "out of memory" in str(err) or "can't allocate memory" in str(err)
    )


# ------------------------------------------------------------------------------------------------
# Implementations
# ------------------------------------------------------------------------------------------------


def triton_skip_reason(device: torch.device, allow_interpreter: bool = False) -> str | None:
    """Why the Triton backend cannot be benchmarked here, or None when it can.

    On the CPU it runs only through Triton's interpreter, orders of magnitude too slow to
    time; ``--allow-interpreter`` (which sets ``TRITON_INTERPRET=1``) still runs it there, to
    smoke-test the benchmark's code paths on tiny shapes, never to measure it.
    """
    if device.type != "cuda" and not allow_interpreter:
        return "needs CUDA: under TRITON_INTERPRET=1 on the CPU it is far too slow to time"
    try:
        from ffkern.backends.triton import TritonBackend  # noqa: F401
    except ImportError as err:
        return f"ffkern.backends.triton does not import: {err}"
    return None


def supports_row_fusion() -> bool:
    """Whether ``TritonBackend`` takes ``fusion="row"``."""
    import inspect

    try:
        from ffkern.backends.triton import TritonBackend
    except ImportError:
        return False
    return "fusion" in inspect.signature(TritonBackend).parameters


def make_backend(impl: str, device: torch.device, precision: str) -> Any:
    """The ffkern backend of ``impl`` ("triton", "triton-row" or "reference")."""
    from ffkern import get_backend

    if impl == "triton-row":
        from ffkern.backends.triton import TritonBackend

        return TritonBackend(device=device, precision=precision, fusion="row")
    # The reference computes in float32 only; at "tf32" its torch matmuls are switched to
    # TF32 around the step instead (see precision_mode), as for the other torch rows.
    return get_backend(impl, device, precision if impl.startswith("triton") else "fp32")


def bench_inputs(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] (B, 784) and labels (B,): MNIST's shapes and value range."""
    gen = torch.Generator(device="cpu").manual_seed(1234)
    x = torch.rand(batch, IN_FEATURES, generator=gen).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
    return x, y


def build_step(
    impl: str, case: Case, device: torch.device, precision: str
) -> tuple[Callable[[], object], int]:
    """A zero-argument training step of ``impl`` on ``case`` (inputs bound) and its FLOPs."""
    x, y = bench_inputs(case.batch, device)
    if impl in ("triton", "triton-row", "reference"):
        from ffkern import FFConfig, FFNetwork

        config = FFConfig(
            layers=case.layers,
            batch_size=case.batch,
            softmax_head=False,  # only the FF layer steps are timed
            negatives="random",  # hard negatives need the head's predictions
            peer_strength=0.0,  # the autograd baseline has no peer normalization either
            schedule="constant",
            lr=LR,
        )
        backend = make_backend(impl, device, precision)
        net = FFNetwork(config, IN_FEATURES, NUM_CLASSES, device=device, backend=backend, seed=0)
        return (lambda: net.train_step(x, y, LR)), ff_flops(case.batch, case.layers)
    if impl == "autograd":
        ff = AutogradFF(case.layers, IN_FEATURES, NUM_CLASSES, lr=LR, device=device, seed=0)
        return (lambda: ff.train_step(x, y)), ff_flops(case.batch, case.layers)
    if impl == "backprop":
        mlp = BackpropMLP(case.layers, IN_FEATURES, NUM_CLASSES, lr=LR, device=device, seed=0)
        flops = backprop_flops(case.batch, IN_FEATURES, case.layers, NUM_CLASSES)
        return (lambda: mlp.train_step(x, y)), flops
    raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLS}")


def row_precision(impl: str, precision: str) -> str:
    """The precision ``impl`` really computes in: only Triton runs below TF32."""
    if impl.startswith("triton"):
        return precision
    return "tf32" if precision == "tf32" else "fp32"


def measure_case(
    case: Case,
    runs: Sequence[tuple[str, str]],
    device: torch.device,
    budget_s: float,
    warmup: int,
    floor_n: int,
) -> list[Row]:
    """Time every ``(impl, precision)`` of ``runs`` on ``case``, interleaved; one row each.

    Each implementation is built and warmed up inside its own :class:`MemoryMeter`, which is
    where its peak memory comes from; all of them are then timed in turns, together with the
    floor's ``floor_n``-square matmul at each precision in use, so that every row's floor is
    measured in the same minutes as the row itself (on a shared machine the load drifts). A
    failure (out of memory, or an implementation that raises) becomes a row with that status.
    """
    rows: list[Row] = []
    steps: list[tuple[Row, Callable[[], object]]] = []
    for impl, precision in runs:
        prec = row_precision(impl, precision)
        row = Row(impl, list(case.layers), case.batch, case.group, prec)
        if prec != precision:
            row.note = f"torch path at {prec}"
        rows.append(row)
        meter = MemoryMeter(device)
        try:
            with meter:
                step, row.flops_per_step = build_step(impl, case, device, precision)
                step = at_precision(step, prec)
                for _ in range(warmup):
                    step()
                synchronize(device)
            row.peak_mib = meter.peak_bytes() / 2**20
            steps.append((row, step))
        except Exception as err:  # noqa: BLE001 - every failure is reported as a row
            fail(row, err, device)
    precs = sorted({row.precision for row, _ in steps})
    probes = [matmul_step(device, prec, floor_n) for prec in precs]
    try:
        times = time_interleaved(
            [s for _, s in steps] + [p for p, _ in probes], device, 0, budget_s
        )
    except Exception as err:  # noqa: BLE001 - e.g. out of memory with every model alive
        for row, _ in steps:
            fail(row, err, device)
        return rows
    rates = {
        prec: flops / statistics.median(ts)
        for prec, (_, flops), ts in zip(precs, probes, times[len(steps) :], strict=True)
    }
    for (row, _), ts in zip(steps, times, strict=False):
        row.floor_tflops = rates[row.precision] / 1e12
        t = statistics.median(ts)
        row.reps = len(ts)
        row.times_ms = [1e3 * x for x in ts]
        row.ms_per_step = 1e3 * t
        row.samples_per_s = case.batch / t
        row.us_per_sample = 1e6 * t / case.batch
        row.tflops = row.flops_per_step / t / 1e12
    del steps
    gc.collect()
    return rows


def fail(row: Row | LayerRow, err: BaseException, device: torch.device) -> None:
    """Mark ``row`` as failed by ``err`` ("oom" or "error") and free what can be freed."""
    row.status = "oom" if is_oom(err) else "error"
    text = str(err).splitlines()[0][:120] if str(err) else ""
    row.note = f"{type(err).__name__}: {text}"
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# The layer-step target
# ------------------------------------------------------------------------------------------------


@dataclass
class LayerRow:
    """One full FF layer step (or the bare matmul pair) at one precision."""

    impl: str  # "triton", "triton-row", "reference" or "cublas-pair"
    precision: str
    rows: int  # positives; as many negatives
    width: int  # D = K
    status: str = "ok"
    note: str = ""
    ms: float | None = None  # median time of one step (or of the pair)
    tflops: float | None = None  # 8 B K D / t for a step, the same count for the pair
    floor_fraction: float | None = None
    ratio_vs_matmuls: float | None = None  # this time / the matmul pair's time


def layer_target(
    rows: int,
    width: int,
    device: torch.device,
    precisions: Sequence[str],
    budget_s: float,
    floor_n: int,
    floors: dict[str, float],
    with_triton: bool,
) -> list[LayerRow]:
    """Time one layer step of every available backend against two bare matmuls, per precision.

    Shapes: ``X`` (2B, K), ``W`` (D, K), ``dZ`` (2B, D), with B = ``rows`` and D = K = ``width``.
    The pair is ``Z = X Wᵀ`` then ``dW = dZᵀ X``, what any layer step must at least compute;
    a layer step adds the loss, the row statistics, the output scale and the update. Peer
    normalization is off, as in the network rows. The pair and the steps are timed in turns.
    """
    from ffkern import LayerObjective, OptimConfig
    from ffkern.backends import FFLayer

    n, flops = 2 * rows, 8 * rows * width * width
    impls = ["reference"]
    if with_triton:
        impls = ["triton", *(["triton-row"] if supports_row_fusion() else []), "reference"]
    obj = LayerObjective(peer_strength=0.0)
    opt = OptimConfig(lr=LR, schedule="constant")
    pair_name = "cublas-pair" if device.type == "cuda" else "matmul-pair"
    out: list[LayerRow] = []
    for prec in precisions:
        dtype = torch.bfloat16 if prec == "bf16" else torch.float32
        gen = torch.Generator(device=device).manual_seed(7)
        x = torch.rand(n, width, device=device, generator=gen)
        w = torch.randn(width, width, device=device, generator=gen) / width**0.5
        xl, wl = x.to(dtype), w.to(dtype)
        dz = torch.randn(n, width, device=device, dtype=dtype, generator=gen)
        z = torch.empty(n, width, device=device, dtype=dtype)
        dw = torch.empty(width, width, device=device, dtype=dtype)

        def matmuls(
            xl: torch.Tensor = xl,
            wl: torch.Tensor = wl,
            dz: torch.Tensor = dz,
            z: torch.Tensor = z,
            dw: torch.Tensor = dw,
        ) -> None:
            torch.mm(xl, wl.t(), out=z)
            torch.mm(dz.t(), xl, out=dw)

        lrows = [LayerRow(pair_name, prec, rows, width)]
        steps: list[Callable[[], object]] = [at_precision(matmuls, prec)]
        for impl in impls:
            if impl == "reference" and prec != "fp32":
                continue  # the reference computes in float32 only
            lrow = LayerRow(impl, prec, rows, width)
            lrows.append(lrow)
            try:
                backend = make_backend(impl, device, prec)
                layer = FFLayer(
                    weight=w.clone(),
                    bias=torch.zeros(width, device=device),
                    peer_mean=torch.zeros(width, device=device),
                )
                # Inside a network a layer's input is the previous layer's h, stored in the
                # backend's operand dtype (bfloat16 at bf16), so feed it that.
                inp = backend.normalize(x.to(getattr(backend, "operand", x.dtype)), obj)
                step = functools.partial(backend.step, layer, inp, rows, obj, opt, LR)
                step()  # fails here, not in the timing loop, if the backend cannot run
                steps.append(at_precision(step, "fp32"))
            except Exception as err:  # noqa: BLE001 - reported as a row
                fail(lrow, err, device)
        timed = [lrows[0], *(r for r in lrows[1:] if r.status == "ok")]
        probe, probe_flops = matmul_step(device, prec, floor_n)
        times = time_interleaved([*steps, probe], device, 3, budget_s)
        # The floor: the higher of the rate timed in turns and the one from the run's start.
        rate = max(probe_flops / statistics.median(times.pop()), floors[prec])
        pair_t = statistics.median(times[0])
        for lrow, ts in zip(timed, times, strict=True):
            t = statistics.median(ts)
            lrow.ms, lrow.tflops = 1e3 * t, flops / t / 1e12
            lrow.floor_fraction = flops / t / rate
            lrow.ratio_vs_matmuls = t / pair_t
        out += lrows
        del x, w, xl, wl, dz, z, dw, steps
        gc.collect()
    return out


# ------------------------------------------------------------------------------------------------
# Hinton's recipe, end to end
# ------------------------------------------------------------------------------------------------


def synthetic_mnist(samples: int, device: torch.device, seed: int = 0) -> Any:
    """``samples`` random images in [0, 1] with random labels, and ``samples // 6`` test ones.

    60000 / 10000 is MNIST's split; the values are uniform, so accuracies mean nothing, but
    every shape and therefore every cost is MNIST's.
    """
    from ffkern import Dataset

    gen = torch.Generator().manual_seed(seed)
    n_test = max(1, samples // 6)
    return Dataset(
        "synthetic-mnist",
        torch.rand(samples, IN_FEATURES, generator=gen).to(device),
        torch.randint(0, NUM_CLASSES, (samples,), generator=gen).to(device),
        torch.rand(n_test, IN_FEATURES, generator=gen).to(device),
        torch.randint(0, NUM_CLASSES, (n_test,), generator=gen).to(device),
        NUM_CLASSES,
        (1, 28, 28),
    )


def recipe_time(
    device: torch.device,
    backend: str,
    precision: str,
    data_dir: str | None,
    epochs: int,
    samples: int,
    budget_s: float | None = None,
) -> dict[str, Any]:
    """Wall-clock seconds of Hinton's 4x2000 recipe (``FFConfig`` defaults) with evaluation.

    Data: real MNIST from ``data_dir`` when given, else :func:`synthetic_mnist`. A one-epoch
    warm-up on 2000 images first compiles the Triton kernels for the recipe's shapes (batch
    100, evaluation chunks of 1000 images times 10 labels), so compilation is not timed. The
    time covers ``Trainer.fit`` only, epoch by epoch: each epoch's training and its evaluation
    of both predictors. Where ``budget_s`` runs out first the run stops after that epoch and
    the total is extrapolated from the mean epoch time (``extrapolated`` says so).
    """
    from ffkern import FFConfig, Trainer, load_dataset

    if data_dir is not None:
        dataset = load_dataset("mnist", data_dir, device=device)
        source = f"MNIST from {data_dir}"
    else:
        dataset = synthetic_mnist(samples, device)
        source = f"synthetic: {samples} train / {dataset.x_test.shape[0]} test random images"
    config = FFConfig(layers=GPU_TARGET_NET, epochs=epochs)
    if device.type == "cuda":  # nothing compiles on the CPU
        warm = Trainer(
            config.replace(epochs=1),
            synthetic_mnist(2000, device, seed=1),
            backend=backend,
            device=device,
            precision=precision,
            progress=False,
        )
        warm.fit()
        del warm
    trainer = Trainer(
        config, dataset, backend=backend, device=device, precision=precision, progress=False
    )
    synchronize(device)
    t0 = time.perf_counter()
    done = 0
    for epoch in range(1, epochs + 1):
        trainer.fit(stop_after=epoch)  # synchronizes at the end of the epoch
        done = epoch
        elapsed = time.perf_counter() - t0
        print(f"  recipe epoch {epoch:>3}/{epochs}: {elapsed:8.2f} s", flush=True)
        if budget_s is not None and elapsed > budget_s and epoch < epochs:
            break
    synchronize(device)
    seconds = time.perf_counter() - t0
    history = trainer.history
    last = history[-1] if history else {}
    return {
        "seconds": seconds * epochs / done,
        "measured_seconds": seconds,
        "epochs": epochs,
        "epochs_run": done,
        "extrapolated": done < epochs,
        "data": source,
        "backend": trainer.backend.describe(),
        "precision": precision,
        "train_samples": int(dataset.x_train.shape[0]),
        "batch_size": config.batch_size,
        "train_seconds": sum(r["seconds"] for r in history),
        "eval_seconds": sum(r.get("eval_seconds", 0.0) for r in history),
        "final_test_acc": last.get("test_acc"),
    }


# ------------------------------------------------------------------------------------------------
# Ratios, targets, output
# ------------------------------------------------------------------------------------------------


def fill_ratios(rows: list[Row], floors: dict[str, float]) -> None:
    """Floor fractions and speedups against autograd and reference rows of the same case."""
    by_case: dict[tuple[tuple[int, ...], int, str], dict[str, Row]] = {}
    for row in rows:
        by_case.setdefault((tuple(row.layers), row.batch, row.group), {})[row.impl] = row
    for row in rows:
        if row.status != "ok":
            continue
        # The higher of the two estimates of the matmul rate (at the start of the run, and in
        # turns with this case): on a loaded machine either can catch a bad moment, and the
        # higher rate never flatters the row.
        rate = max(1e12 * (row.floor_tflops or 0.0), floors[row.precision])
        row.floor_fraction = row.flops_per_step / (row.ms_per_step / 1e3) / rate
        peers = by_case[(tuple(row.layers), row.batch, row.group)]
        for attr, other in (
            ("speedup_vs_autograd", "autograd"),
            ("speedup_vs_reference", "reference"),
        ):
            ref = peers.get(other)
            if ref is not None and ref.status == "ok":
                setattr(row, attr, row.samples_per_s / ref.samples_per_s)


def find(rows: list[Row], impl: str, layers: Sequence[int], batch: int) -> Row | None:
    """The successful row of ``impl`` on that network and batch, if any.

    Where a sweep times the same case twice (a grid row and a batch-sweep row), the target
    case wins, then the batch sweep, then the grid.
    """
    order = {"target": 0, "batch": 1, "grid": 2}
    found = [
        r
        for r in rows
        if r.impl == impl
        and tuple(r.layers) == tuple(layers)
        and r.batch == batch
        and r.status == "ok"
    ]
    return min(found, key=lambda r: order.get(r.group, 3), default=None)


@dataclass
class Target:
    """One PASS/FAIL line."""

    name: str
    value: float | None  # measured quantity
    goal: str  # e.g. ">= 2.00"
    passed: bool | None  # None: not measured in this run
    note: str = ""


def evaluate_targets(
    device: torch.device,
    rows: list[Row],
    layer_rows: list[LayerRow],
    recipe: dict[str, Any] | None,
) -> list[Target]:
    """The PASS/FAIL lines for whatever targets this run measured."""
    out: list[Target] = []
    if device.type == "cpu":
        ref, auto = (
            find(rows, "reference", CPU_TARGET_NET, 100),
            find(rows, "autograd", CPU_TARGET_NET, 100),
        )
        if ref and auto:
            v = ref.samples_per_s / auto.samples_per_s
            out.append(
                Target(
                    "CPU 3x1000 b100: reference / autograd samples/s",
                    v,
                    f">= {CPU_TARGET_SPEEDUP:.2f}",
                    v >= CPU_TARGET_SPEEDUP,
                )
            )
        ref = find(rows, "reference", CPU_TARGET_NET, 1000)
        if ref:
            v = ref.floor_fraction
            out.append(
                Target(
                    "CPU 3x1000 b1000: reference fraction of the fp32 floor",
                    v,
                    f">= {CPU_TARGET_FLOOR:.2f}",
                    v >= CPU_TARGET_FLOOR,
                )
            )
    for lrow in layer_rows:
        if lrow.impl.startswith("triton"):
            full = (lrow.rows, lrow.width) == (GPU_LAYER_ROWS, GPU_LAYER_WIDTH)
            name = (
                f"GPU layer step {lrow.width}->{lrow.width}, {lrow.rows}+{lrow.rows} rows: "
                f"{lrow.impl}[{lrow.precision}] / two cuBLAS matmuls"
            )
            ok = lrow.status == "ok"
            v = lrow.ratio_vs_matmuls if ok else None
            out.append(
                Target(
                    name,
                    v,
                    f"<= {GPU_LAYER_RATIO:.2f}",
                    (v <= GPU_LAYER_RATIO) if ok and full else None,
                    "" if ok else lrow.note,
                )
            )
    ref = find(rows, "reference", GPU_TARGET_NET, GPU_TARGET_BATCH)
    for row in rows:
        if (
            row.impl.startswith("triton")
            and row.status == "ok"
            and ref is not None
            and tuple(row.layers) == GPU_TARGET_NET
            and row.batch == GPU_TARGET_BATCH
        ):
            v = row.samples_per_s / ref.samples_per_s
            out.append(
                Target(
                    f"GPU 4x2000 b1000: {row.impl}[{row.precision}] / reference[fp32] samples/s",
                    v,
                    f">= {GPU_TARGET_SPEEDUP:.2f}",
                    v >= GPU_TARGET_SPEEDUP,
                )
            )
    if recipe is not None:
        full = recipe["epochs"] == 60 and recipe["train_samples"] == 60000
        on_gpu = device.type == "cuda"
        out.append(
            Target(
                f"Hinton 4x2000 recipe, {recipe['epochs']} epochs on {recipe['train_samples']} "
                f"samples, with evaluation: seconds",
                recipe["seconds"],
                f"< {RECIPE_TARGET_S:.0f}",
                (recipe["seconds"] < RECIPE_TARGET_S) if full and on_gpu else None,
                ("extrapolated; " if recipe["extrapolated"] else "")
                + ("" if full and on_gpu else "smoke run: not the target's size or device"),
            )
        )
    return out


def _fmt(value: float | None, spec: str) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def format_table(rows: list[Row]) -> str:
    """The plain results table, one line per row."""
    head = (
        f"{'impl':<11} {'network':<9} {'batch':>6} {'prec':<5} {'ms/step':>9} "
        f"{'samples/s':>11} {'us/sample':>10} {'TFLOP/s':>8} {'floor':>6} "
        f"{'x autograd':>10} {'x ref':>6} {'peak MiB':>9}  note"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.impl:<11} {net_name(r.layers):<9} {r.batch:>6} {r.precision:<5} "
            f"{_fmt(r.ms_per_step, '9.2f')} {_fmt(r.samples_per_s, '11.0f')} "
            f"{_fmt(r.us_per_sample, '10.2f')} {_fmt(r.tflops, '8.3f')} "
            f"{_fmt(r.floor_fraction, '6.2f')} {_fmt(r.speedup_vs_autograd, '10.2f')} "
            f"{_fmt(r.speedup_vs_reference, '6.2f')} {_fmt(r.peak_mib, '9.1f')}  "
            f"{r.status if r.status != 'ok' else ''}{' ' if r.status != 'ok' else ''}{r.note}"
        )
    return "\n".join(lines)


def format_layer_table(layer_rows: list[LayerRow]) -> str:
    head = (
        f"{'impl':<12} {'shape':<22} {'prec':<5} {'ms':>8} {'TFLOP/s':>8} {'floor':>6} "
        f"{'x matmuls':>9}  note"
    )
    lines = [head, "-" * len(head)]
    for r in layer_rows:
        shape = f"{r.rows}+{r.rows} x {r.width}->{r.width}"
        lines.append(
            f"{r.impl:<12} {shape:<22} {r.precision:<5} {_fmt(r.ms, '8.3f')} "
            f"{_fmt(r.tflops, '8.2f')} {_fmt(r.floor_fraction, '6.2f')} "
            f"{_fmt(r.ratio_vs_matmuls, '9.2f')}  {'' if r.status == 'ok' else r.status} {r.note}"
        )
    return "\n".join(lines)


def scaling_tables(rows: list[Row]) -> str:
    """Cost per sample (µs/sample) of every implementation as width, depth and batch grow."""
    ok = [r for r in rows if r.status == "ok"]
    impls = [i for i in IMPLS if any(r.impl == i for r in ok)]
    parts: list[str] = []

    def table(title: str, keyed: dict[str, dict[str, Row]]) -> None:
        if len(keyed) < 2:
            return
        head = f"{title:<22}" + "".join(f"{i:>12}" for i in impls)
        lines = [head, "-" * len(head)]
        for key, per_impl in keyed.items():
            cells = "".join(
                f"{_fmt(per_impl[i].us_per_sample if i in per_impl else None, '12.2f')}"
                for i in impls
            )
            lines.append(f"{key:<22}{cells}")
        parts.append("\n".join(lines))

    grid = [r for r in ok if r.group == "grid"]
    if grid:
        depths = sorted({len(r.layers) for r in grid})
        widths = sorted({r.layers[0] for r in grid})
        mid_depth = depths[len(depths) // 2]
        mid_width = widths[len(widths) // 2]
        keyed: dict[str, dict[str, Row]] = {}
        for r in sorted(grid, key=lambda r: r.layers[0]):
            if len(r.layers) == mid_depth:
                keyed.setdefault(f"width {net_name(r.layers)} b{r.batch}", {})[r.impl] = r
        table("us/sample vs width", keyed)
        keyed = {}
        for r in sorted(grid, key=lambda r: len(r.layers)):
            if r.layers[0] == mid_width:
                keyed.setdefault(f"depth {net_name(r.layers)} b{r.batch}", {})[r.impl] = r
        table("us/sample vs depth", keyed)
    keyed = {}
    for r in sorted((r for r in ok if r.group in ("batch", "target")), key=lambda r: r.batch):
        keyed.setdefault(f"batch {r.batch:>5} {net_name(r.layers)}", {})[r.impl] = r
    table("us/sample vs batch", keyed)
    return "\n\n".join(parts)


def format_targets(targets: list[Target]) -> str:
    lines = []
    for t in targets:
        verdict = "n/a " if t.passed is None else ("PASS" if t.passed else "FAIL")
        lines.append(
            f"{verdict}  {t.name}: {_fmt(t.value, '.3f')} (target {t.goal})"
            + (f"  [{t.note}]" if t.note else "")
        )
    return "\n".join(lines) if lines else "(no target measured in this run)"


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "git_commit": _git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=props.total_memory / 2**30,
            cuda=torch.version.cuda,
            sm_count=props.multi_processor_count,
        )
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return str(triton.__version__)


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=BENCH_DIR,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=BENCH_DIR,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out + ("-dirty" if dirty else "")


def _matplotlib() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or a clear exit without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            "--plot needs matplotlib, which is not installed: pip install matplotlib "
            "(or pip install 'ffkern[plot]'), or drop --plot"
        ) from None
    return plt


def plot(rows: list[Row], path: str, where: str = "") -> None:
    """samples/s against batch size per implementation, for the batch-sweep rows."""
    plt = _matplotlib()
    sweep = [r for r in rows if r.status == "ok" and r.group in ("batch", "target")]
    if not sweep:
        sweep = [r for r in rows if r.status == "ok"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl in IMPLS:
        for net in sorted({net_name(r.layers) for r in sweep}):
            pts = sorted(
                (r.batch, r.samples_per_s)
                for r in sweep
                if r.impl == impl and net_name(r.layers) == net
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{impl} ({net})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size (positive samples per step)")
    ax.set_ylabel("throughput (positive samples / s)")
    ax.set_title("Forward-Forward training throughput" + (f"\n{where}" if where else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Profiling (why a path misses its floor)
# ------------------------------------------------------------------------------------------------

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")


def profile_impl(impl: str, case: Case, device: torch.device, precision: str) -> str:
    """torch.profiler on a few steps: self time per op, and the share spent outside matmuls."""
    from torch.profiler import ProfilerActivity, profile

    step, _ = build_step(impl, case, device, precision)
    for _ in range(2):
        step()
    synchronize(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(5):
            step()
        synchronize(device)
    averages = prof.key_averages()
    cuda = device.type == "cuda"

    def self_us(e: Any) -> float:
        return float(e.self_device_time_total if cuda else e.self_cpu_time_total)

    total = sum(self_us(e) for e in averages)
    mm = sum(self_us(e) for e in averages if e.key in MATMUL_OPS)
    table = averages.table(
        sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=15
    )
    return (
        f"{table}\n{impl} {case.net} b{case.batch}: {100 * mm / max(total, 1e-9):.1f}% of "
        f"self time in matrix products, {100 * (1 - mm / max(total, 1e-9)):.1f}% outside"
    )


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config",
        choices=PRESETS,
        default="sweep",
        help="sweep (default), cpu-target, gpu-target, micro (tests)",
    )
    p.add_argument("--quick", action="store_true", help="a reduced sweep (< 1 min on 2 cores)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="precision of the triton rows (torch rows stay fp32 unless tf32)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); the floor is measured with the same",
    )
    p.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {','.join(IMPLS)}")
    p.add_argument("--json", metavar="PATH", help="write rows, machine and versions as JSON")
    p.add_argument("--plot", metavar="PATH", help="samples/s vs batch size (needs matplotlib)")
    p.add_argument(
        "--allow-interpreter",
        action="store_true",
        help="run the triton rows on the CPU through TRITON_INTERPRET=1 (smoke tests only)",
    )
    p.add_argument(
        "--profile",
        metavar="IMPL",
        help="profile IMPL on every case of the preset instead of timing",
    )
    p.add_argument(
        "--mnist-recipe-time",
        action="store_true",
        help="time Hinton's 4x2000 recipe end to end (60 epochs, with evaluation)",
    )
    p.add_argument("--data", metavar="DIR", help="MNIST IDX folder for --mnist-recipe-time")
    p.add_argument("--recipe-backend", default="auto", help="backend of --mnist-recipe-time")
    p.add_argument("--recipe-epochs", type=int, default=None, help="default 60 (1 on CPU)")
    p.add_argument(
        "--recipe-budget-s",
        type=float,
        default=None,
        help="stop the recipe after the epoch that passes this many seconds; extrapolate",
    )
    p.add_argument(
        "--recipe-samples",
        type=int,
        default=None,
        help="synthetic training images; default 60000 (1200 on CPU)",
    )
    args = p.parse_args(argv)
    args.impls = tuple(i.strip() for i in args.impls.split(",") if i.strip())
    unknown = [i for i in args.impls if i not in IMPLS]
    if unknown:
        p.error(f"--impls: unknown {unknown}; choose from {list(IMPLS)}")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the tables; return what ``--json`` writes."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads is None and args.config == "micro":
        args.threads = 1  # micro shapes are all overhead; one thread keeps the tests steady
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (the tests)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The body of :func:`main` on parsed arguments."""
    if args.plot:
        _matplotlib()  # fail before the run, not after it
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif args.allow_interpreter:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    if device.type == "cpu" and args.precision != "fp32":
        print(f"--precision {args.precision}: the CPU has no TF32 or bf16 matmul path; fp32")
        args.precision = "fp32"
    preset = make_preset(args.config, device, args.quick)
    if args.mnist_recipe_time:
        preset = Preset((), None, 0.0)  # the recipe alone
    warmup = 3 if device.type == "cuda" else 2
    if args.config == "micro":
        warmup = 1

    if args.profile:
        for case in preset.cases:
            print(profile_impl(args.profile, case, device, args.precision) + "\n")
        return {}

    impls = list(args.impls)
    skip = triton_skip_reason(device, args.allow_interpreter)
    if "triton-row" in impls and (skip is not None or not supports_row_fusion()):
        impls.remove("triton-row")
        if skip is None:
            print("triton-row: skipped, TritonBackend has no fusion='row' option")
    if "triton" in impls and skip is not None:
        impls.remove("triton")
        impls = [i for i in impls if i != "triton-row"]
        print(f"triton: skipped, {skip}")
    triton_precisions = [args.precision]
    if args.config == "gpu-target" and skip is None and device.type == "cuda":
        triton_precisions = list(PRECISIONS)  # the targets are reported at every precision

    precisions_used = {"fp32", args.precision}
    if args.config == "gpu-target" and device.type == "cuda":
        precisions_used |= set(PRECISIONS)
    floor_n = 8192 if device.type == "cuda" else (256 if args.config == "micro" else 2048)
    floor_budget = 0.05 if args.config == "micro" else 1.0
    floors = {
        p: matmul_rate(device, p, floor_n, floor_budget)
        for p in sorted(precisions_used)
        if device.type == "cuda" or p != "bf16"
    }
    if "bf16" in precisions_used and "bf16" not in floors:
        floors["bf16"] = floors["fp32"]  # bf16 only runs on the triton rows, which need CUDA
    print(
        f"device {device} ({machine_info(device).get('gpu', _cpu_model())}), torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads"
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if device.type == "cpu" and load > 0.5:
        print(
            f"warning: 1-minute load average {load:.2f} before the run; other processes share "
            f"these {os.cpu_count()} cores, so absolute times (not the interleaved ratios) "
            f"are pessimistic (on an oversubscribed CPU, --threads 1 is steadier)"
        )
    print(
        f"floor at the start (median {floor_n}^2 matmul; every case re-times it in turns): "
        + ", ".join(f"{p} {r / 1e12:.3f} TFLOP/s" for p, r in sorted(floors.items()))
    )

    t_start = time.perf_counter()
    # The layer-step target first: it is the kernel target, and if a time limit stops the run
    # later, its lines are already printed.
    layer_rows: list[LayerRow] = []
    if preset.layer_target is not None:
        precs = triton_precisions if skip is None else ["fp32"]
        layer_rows = layer_target(
            *preset.layer_target, device, precs, preset.budget_s, floor_n, floors, skip is None
        )
        print(format_layer_table(layer_rows), flush=True)

    rows: list[Row] = []
    oom: set[tuple[str, str, str]] = set()  # (impl, precision, network) out of memory earlier
    for case in preset.cases:
        runs = [
            (impl, prec)
            for impl in impls
            for prec in (triton_precisions if impl.startswith("triton") else [args.precision])
        ]
        todo = [r for r in runs if (*r, case.net) not in oom]
        for impl, prec in runs:
            if (impl, prec) not in todo:
                rows.append(
                    Row(
                        impl,
                        list(case.layers),
                        case.batch,
                        case.group,
                        row_precision(impl, prec),
                        "skipped",
                        "out of memory at a smaller batch",
                    )
                )
        for row, (impl, prec) in zip(
            measure_case(case, todo, device, preset.budget_s, warmup, floor_n), todo, strict=True
        ):
            if row.status == "oom":
                oom.add((impl, prec, case.net))
            rows.append(row)
            print(
                f"  {impl:<10} {case.net:<9} b{case.batch:<6} {row.precision:<5} "
                + (
                    f"{row.ms_per_step:9.2f} ms/step"
                    if row.status == "ok"
                    else f"{row.status}: {row.note}"
                ),
                flush=True,
            )
    fill_ratios(rows, floors)

    recipe = None
    if args.mnist_recipe_time:
        cpu = device.type == "cpu"
        epochs = args.recipe_epochs or (1 if cpu else 60)
        samples = args.recipe_samples or (1200 if cpu else 60000)
        recipe = recipe_time(
            device,
            args.recipe_backend,
            args.precision,
            args.data,
            epochs,
            samples,
            args.recipe_budget_s,
        )
        print(
            f"recipe: {recipe['seconds']:.2f} s for {epochs} epochs"
            + (f" (extrapolated from {recipe['epochs_run']})" if recipe["extrapolated"] else "")
            + f" ({recipe['data']}; "
            f"{recipe['backend']}; train {recipe['train_seconds']:.2f} s, "
            f"eval {recipe['eval_seconds']:.2f} s)"
        )

    targets = evaluate_targets(device, rows, layer_rows, recipe)
    elapsed = time.perf_counter() - t_start
    result = {
        "machine": machine_info(device),
        "config": args.config,
        "quick": args.quick,
        "precision": args.precision,
        "floors_flops": floors,
        "floor_matmul_n": floor_n,
        "memory_method": MEMORY_METHODS.get(MemoryMeter(device).method, MemoryMeter(device).method),
        "formulas": {
            "ff_step_flops": "8 * B * sum(d_in * d_out)",
            "backprop_step_flops": "6 * B * sum(d_in * d_out) - 2 * B * d_0 * d_1 (head incl.)",
            "floor_fraction": "(flops_per_step / median_step_s) / max(floor_tflops * 1e12, "
            "floors_flops[precision])",
        },
        "rows": [asdict(r) for r in rows],
        "layer_step": [asdict(r) for r in layer_rows],
        "recipe": recipe,
        "targets": [asdict(t) for t in targets],
        "seconds": elapsed,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        info = result["machine"]
        plot(rows, args.plot, f"{info.get('gpu', info['cpu'])}, torch {info['torch']}")

    print()
    scaling = scaling_tables(rows)
    if scaling:
        print(scaling + "\n")
    if layer_rows:
        print(format_layer_table(layer_rows) + "\n")
    print("targets")
    print(format_targets(targets) + "\n")
    print(
        f"peak MiB: {MemoryMeter(device).method} growth; floor: fraction of the {floor_n}^2 "
        f"matmul rate; "
        f"FF FLOPs 8·B·Σ d_in·d_out, backprop 6·B·Σ d_in·d_out − 2·B·d_0·d_1; "
        f"{elapsed:.0f} s in all"
    )
    if rows:
        print(format_table(rows))
    return result


if __name__ == "__main__":
    main()
