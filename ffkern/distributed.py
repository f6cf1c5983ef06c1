r"""Scale-out training with ``torch.distributed``: data parallelism and a layer pipeline.

Both modes run under ``torchrun`` (``torchrun --nproc-per-node N -m ffkern train ...
--parallel data|pipeline``, or ``torchrun --no-python ... ffkern train ...``), which sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address. CUDA devices talk through
NCCL (rank ``r`` on ``cuda:LOCAL_RANK``), the CPU through gloo. Checkpoints have the
single-process format and are written by rank 0 alone, atomically (:mod:`ffkern.checkpoint`);
so are metrics. Other ranks log at WARNING only.

Data parallelism (``--parallel data``)
--------------------------------------
A minibatch of ``B`` rows is cut into ``W`` contiguous shards, rank ``r`` holding rows
``[⌊rB/W⌋, ⌊(r+1)B/W⌋)`` (``n_r`` rows). Every quantity the update needs is a mean over rows,
and a mean over the whole minibatch is the shard means weighted by their share::

    mean_B(v) = Σ_r (n_r / B) · mean_{n_r}(v)

The local loss gradient is such a mean (``c_i`` carries ``1/N``), and so are the peer
statistics (``mean_{i pos} h_i`` and the ``λ / n_pos`` coefficient) and the softmax head's
cross-entropy gradient (``(p - Y) / B``). The backend's ``reduce`` hook therefore computes
``all_reduce_sum((n_r / B) · t)``: with equal shards the plain average over ranks, and still
exact on an epoch's last, shorter minibatch. ``batch_size`` must be a multiple of ``W`` so
that the full minibatches split evenly; every shard of the last one must be non-empty.

Randomness follows one process exactly. Every rank holds the same generator state (the same
seed, restored from the same checkpoint), draws the same permutation each epoch and the
negative labels of the *whole* minibatch, and keeps its own slice, so the generator advances
as in single-process training and checkpoints carry no trace of the world size. Hard
negatives are drawn from the softmax head's probabilities on the neutral pass: each rank
computes them for its shard (as part of its head update, as in one process) and the ``(B, C)``
matrix is all-gathered before sampling. Gathering ``B · C`` numbers is cheaper than every rank
recomputing the neutral pass of the whole minibatch through all layers, which would cost ``W``
times the forward work. The gathered rows come from shard-sized matrix products, so they can
differ from one process's in the last bit. A hard negative changes only where such a
difference moves a draw across a boundary of its categorical distribution, which is rare
enough that none did in the tests' runs (their weights match one process's to rounding).

The result equals single-process training on the whole minibatch up to floating-point
rounding: the all-reduce sums per-shard partial sums in another order than one matrix
product does. Ranks stay identical to one another: gloo and NCCL hand every rank the same
reduced tensor, and every rank applies the same update to it.

Fused backend. The ``triton`` backend normally folds the optimizer update into the
weight-gradient GEMM's epilogue, so ``dW`` never reaches memory. An all-reduce needs ``dW``
itself, so with ``reduce`` set that backend materializes ``dW`` and ``db``, the hook averages
them and the update runs unfused (:mod:`ffkern.backends.triton` states the extra traffic);
the forward GEMM and the row statistics stay fused. Each trained layer issues up to three
all-reduces per step (peer mean, ``dW``, ``db``), the head two more, unbucketed: the hook
reduces one tensor at a time, which costs latency on small layers.

Layer pipeline (``--parallel pipeline``)
----------------------------------------
Layer ``k`` lives on rank ``k`` (``W`` must equal the number of layers). On tick ``s`` rank
``k`` trains on minibatch ``t = s - k``: layer ``k`` works on minibatch ``t`` while layer
``k + 1`` works on ``t - 1``. Rank 0 embeds the labels, draws the negatives and normalizes the
input; every rank sends the ``Activations`` it produces (``x``, ``scale``) and ``n_pos`` to the
next rank with point-to-point sends. Nothing travels backwards, as FF layers need no gradient
from above. Epochs are drained: the learning rate is per epoch and evaluation needs every
layer at the same epoch, at the cost of an ``L - 1``-tick bubble per epoch.

Because a layer's step depends only on its own state and its input, and layer ``k - 1``
produces minibatch ``t``'s input with the parameters it holds after ``t`` updates in both
schedules, the delayed schedule computes what the sequential one does: it overlaps in time
what one process does in turn. :func:`simulate_pipeline` runs the delayed schedule tick by tick
in one process; the tests use it as the oracle for the pipeline, and it matches
single-process training too.

The softmax head and hard negatives need every layer's activities of a neutral pass with
the current weights, which no rank has mid-pipeline, so the pipeline requires
``negatives="random"`` and ``softmax_head=False`` and says so otherwise; greedy training trains
one layer at a time and has nothing to overlap, so it is refused too. At the end of each
epoch every rank all-gathers the other layers' parameters (so rank 0 can write the whole
network's checkpoint) and the goodness predictor runs on every rank over a ``1/W`` shard of the
evaluation images; the correct counts are summed. That divides the evaluation over the ranks
instead of leaving ``W - 1`` ranks waiting on rank 0 for longer than the collective timeout.

Failures
--------
The process group is created with a timeout (``FFKERN_DIST_TIMEOUT`` seconds, default
``DEFAULT_TIMEOUT_S``), which bounds how long a collective or a receive waits for a hung
peer. A rank that raises logs the error with its rank number and leaves with ``os._exit``
(status 2 for a usage error, 1 otherwise) without running the process group's teardown, which
could itself wait on the peers. Its sockets close, so the other ranks' next collective fails
at once (gloo) or within the timeout (NCCL), and ``torchrun`` ends the job with a non-zero
status.

Threads. ``torchrun`` sets ``OMP_NUM_THREADS=1`` for every worker unless the variable is set;
on a CPU, set it to ``cores / ranks`` to use the whole machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from ffkern import optim
from ffkern.backends import Activations, Backend, FFLayer, get_backend
from ffkern.config import FFConfig
from ffkern.data import Dataset
from ffkern.model import FFNetwork, Reduce
from ffkern.trainer import Trainer, TrainResult, _progress, resolve_device

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
    "DataParallelTrainer",
    "DistContext",
    "PipelineSimulation",
    "PipelineTrainer",
    "check_data_parallel",
    "check_pipeline",
    "cli_train",
    "data_parallel_step",
    "dist_timeout",
    "first_stage_input",
    "init_distributed",
    "shard_bounds",
    "sharded_accuracies",
    "simulate_pipeline",
    "weighted_sum_reduce",
]

log = logging.getLogger(__name__)

TIMEOUT_ENV = "FFKERN_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 120.0  # long enough for a slow rank's checkpoint write, short for a hang
DOWNLOAD_TIMEOUT_S = 3600.0  # how long ranks wait for rank 0 to download a dataset

# Dtype codes of the activations a pipeline stage sends (float32, or bfloat16 under bf16).
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}

_USAGE_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError)


# -- the process group ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int  # global rank
    world_size: int  # number of processes
    local_rank: int  # rank on this machine (picks the GPU)
    device: torch.device  # this rank's training device
    backend: str  # "nccl" or "gloo"
    timeout_s: float  # collective and receive timeout

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, metrics and INFO logs."""
        return self.rank == 0

    @property
    def timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout_s)


def dist_timeout() -> float:
    """Seconds from ``$FFKERN_DIST_TIMEOUT`` (default :data:`DEFAULT_TIMEOUT_S`)."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return value


def init_distributed(
    device: str | torch.device | None = "auto", timeout_s: float | None = None
) -> DistContext:
    """Join the ``torchrun`` job described by the environment; NCCL on CUDA, gloo on CPU.

    ``device`` ``auto`` or ``cuda`` without an index means ``cuda:LOCAL_RANK`` when CUDA is
    available; ``cpu`` keeps every rank on the CPU.
    """
    missing = [
        v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ
    ]
    if missing:
        raise ValueError(
            f"--parallel needs the environment torchrun sets up ({', '.join(missing)} missing); "
            "launch with: torchrun --nproc-per-node N -m ffkern train ... --parallel data"
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    timeout = dist_timeout() if timeout_s is None else float(timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(
            backend, timeout=datetime.timedelta(seconds=timeout), rank=rank, world_size=world
        )
    return DistContext(rank, world, local_rank, dev, backend, timeout)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``n`` that ``rank`` holds: contiguous, sizes differ by ≤ 1."""
    return rank * n // world_size, (rank + 1) * n // world_size


def weighted_sum_reduce(weight: float) -> Reduce:
    """The ``reduce`` hook ``t ↦ Σ_ranks weight_r · t_r``, ``weight`` being this rank's share."""

    def reduce(t: torch.Tensor) -> torch.Tensor:
        out = t * weight
        dist.all_reduce(out)
        return out

    return reduce


def _all_gather_rows(local: torch.Tensor, n: int, ctx: DistContext) -> torch.Tensor:
    """The ``(n, ...)`` matrix whose shard rows (see :func:`shard_bounds`) each rank holds."""
    width = -(-n // ctx.world_size)
    padded = local.new_zeros((width, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    sizes = [hi - lo for lo, hi in (shard_bounds(n, r, ctx.world_size) for r in range(len(parts)))]
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])


def _run_on_main(ctx: DistContext, fn: Callable[[], object], group: Any = None) -> None:
    """Run ``fn`` on rank 0 and raise its usage error on every rank, so all stop together.

    The other ranks wait in a broadcast on ``group`` (default: the job's), so under that
    group's timeout.
    """
    failure: list[tuple[str, str] | None] = [None]
    if ctx.is_main:
        try:
            fn()
        except _USAGE_ERRORS as exc:
            failure[0] = (type(exc).__name__, str(exc))
    dist.broadcast_object_list(failure, src=0, group=group)
    if failure[0] is not None:
        kind, message = failure[0]
        errors = {e.__name__: e for e in _USAGE_ERRORS}
        raise errors[kind](message)


def _to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in its dicts moved to the CPU (for pickling between ranks)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def sharded_accuracies(
    net: FFNetwork,
    sets: dict[str, tuple[torch.Tensor, torch.Tensor, str]],
    ctx: DistContext,
) -> dict[str, float]:
    """Accuracies ``{name: correct / n}`` of ``(x, y, method)`` sets, each rank predicting 1/W.

    Every rank must hold the same parameters; the correct counts are summed over ranks (one
    all-reduce), so the result is the single-process accuracy.
    """
    counts = []
    for x, y, method in sets.values():
        lo, hi = shard_bounds(y.shape[0], ctx.rank, ctx.world_size)
        if hi > lo:
            counts.append((net.predict(x[lo:hi], method) == y[lo:hi]).sum())
        else:
            counts.append(torch.zeros((), dtype=torch.int64, device=y.device))
    total = torch.stack(counts).to(torch.int64)
    dist.all_reduce(total)
    correct = total.tolist()  # host sync, once per evaluation
    return {
        name: correct[i] / max(1, y.shape[0]) for i, (name, (_, y, _)) in enumerate(sets.items())
    }


def _configure_logging(ctx: DistContext) -> None:
    """Rank in every log line; ranks other than 0 log warnings and errors only."""
    root = logging.getLogger()
    fmt = f"%(asctime)s %(levelname)s [rank {ctx.rank}/{ctx.world_size}] %(name)s: %(message)s"
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(fmt))
    if not ctx.is_main and root.getEffectiveLevel() < logging.WARNING:
        root.setLevel(logging.WARNING)


# -- data parallelism ----------------------------------------------------------------------------


@torch.no_grad()
def data_parallel_step(
    net: FFNetwork,
    x: torch.Tensor,
    labels: torch.Tensor,
    lr: float,
    ctx: DistContext,
    active: int | None = None,
) -> torch.Tensor:
    """:meth:`FFNetwork.train_step` on the global minibatch ``x`` (B, K), ``labels`` (B,).

    Every rank passes the same global minibatch and trains on its shard; gradients and peer
    statistics are combined through the ``reduce`` hook (see the module docstring). Returns
    this rank's share ``(n_r / B) · L_r`` of the per-layer losses: summed over ranks (once per
    epoch is enough) it is the loss one process would report for the minibatch.
    """
    b = labels.shape[0]
    lo, hi = shard_bounds(b, ctx.rank, ctx.world_size)
    if hi <= lo:
        raise ValueError(
            f"a minibatch of {b} rows leaves rank {ctx.rank} of {ctx.world_size} without rows"
        )
    share = (hi - lo) / b
    reduce = weighted_sum_reduce(share)
    xs, ys = x[lo:hi], labels[lo:hi]
    probs = None
    if net.config.softmax_head:
        # Head first, as in one process: its pre-update probabilities pick hard negatives.
        local_probs = net._train_head(xs, ys, lr, reduce)
        if net.config.negatives == "hard":
            probs = _all_gather_rows(local_probs, b, ctx)
    neg = net.sample_negative_labels(labels, probs)[lo:hi]
    batch = torch.cat([net.embed(xs, ys), net.embed(xs, neg)])
    return net.train_layers(batch, hi - lo, lr, active, reduce) * share


def check_supported_variant(config: FFConfig, mode: str) -> None:
    """Raise ``ValueError`` for the variants scale-out does not implement.

    Both modes build Hinton's supervised batches themselves (label embedding and negatives),
    so jitter, hybrid negatives and the recurrent model would otherwise be skipped silently.
    """
    unsupported = []
    if config.augment != "none":
        unsupported.append(f"--augment {config.augment}")
    if config.negatives == "hybrid":
        unsupported.append("--negatives hybrid")
    if config.model != "feedforward":
        unsupported.append(f"--model {config.model}")
    if unsupported:
        raise ValueError(
            f"--parallel {mode} trains the supervised feed-forward recipe only; it does not "
            f"implement {', '.join(unsupported)}: train that variant without --parallel"
        )


def check_data_parallel(config: FFConfig, n_train: int, world_size: int) -> None:
    """Raise ``ValueError`` unless every rank gets rows of every minibatch."""
    check_supported_variant(config, "data")
    if config.batch_size % world_size:
        lower = config.batch_size - config.batch_size % world_size
        raise ValueError(
            f"--batch-size {config.batch_size} does not split evenly over {world_size} ranks; "
            f"data parallelism gives each rank batch_size / world_size rows of every minibatch, "
            f"so use a multiple of {world_size} such as {max(lower, world_size)} or "
            f"{lower + world_size}"
        )
    last = n_train % config.batch_size
    if 0 < last < world_size:
        raise ValueError(
            f"each epoch ends with a minibatch of {last} rows ({n_train} training images, "
            f"batch size {config.batch_size}), fewer than the {world_size} ranks; choose a "
            "batch size that leaves at least one row per rank"
        )


class DataParallelTrainer(Trainer):
    """:class:`Trainer` whose minibatches are split over the ranks of a process group.

    Every rank builds the same network from the same seed; rank 0 alone writes the checkpoint
    and the metrics. Keyword arguments are those of :class:`Trainer` (``device`` comes from
    ``ctx``).
    """

    def __init__(self, config: FFConfig, dataset: Dataset, ctx: DistContext, **kwargs: Any):
        check_data_parallel(config, dataset.x_train.shape[0], ctx.world_size)
        self.ctx = ctx
        _main_only_outputs(ctx, kwargs)
        super().__init__(config, dataset, device=ctx.device, **kwargs)
        log.info(
            "data parallel over %d ranks (%s): %d rows of every %d-row minibatch per rank",
            ctx.world_size,
            ctx.backend,
            config.batch_size // ctx.world_size,
            config.batch_size,
        )

    def fit(self, stop_after: int | None = None) -> TrainResult:
        _run_on_main(self.ctx, self._check_outputs)
        return super().fit(stop_after)

    def _train_epoch(self) -> dict[str, Any]:
        cfg, ds, net = self.config, self.dataset, self.network
        active, phase_epoch, phase_epochs = self._phase()
        lr = optim.lr_at(net.opt, phase_epoch, phase_epochs)
        n = ds.x_train.shape[0]
        order = torch.randperm(n, generator=net.generator, device=self.device)
        # One slot per trained layer: only the active one when training greedily.
        loss_sum = torch.zeros(len(cfg.layers) if active is None else 1, device=self.device)
        steps = 0
        t0 = time.perf_counter()
        for start in _progress(
            range(0, n, cfg.batch_size), self.progress, f"epoch {self.epoch + 1}"
        ):
            idx = order[start : start + cfg.batch_size]
            share = data_parallel_step(net, ds.x_train[idx], ds.y_train[idx], lr, self.ctx, active)
            loss_sum += share
            steps += 1
        dist.all_reduce(loss_sum)  # the shares of every step, summed once per epoch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # deliberate: the epoch's time ends here
        seconds = time.perf_counter() - t0
        layer_losses = (loss_sum / steps).tolist()  # host sync, once per epoch
        self.epoch += 1
        record = _epoch_record(self.epoch, layer_losses, lr, seconds, n, self.ctx, "data")
        record["loss"] = self._summary_loss(layer_losses, active)
        if active is not None:
            record["active_layer"] = active + 1
        record.update(self.evaluate())
        record["eval_seconds"] = time.perf_counter() - t0 - seconds
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The accuracies of :meth:`Trainer.evaluate`, each rank predicting a shard."""
        return sharded_accuracies(self.network, self._eval_sets(), self.ctx)

    def _eval_sets(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, str]]:
        ds = self.dataset
        xs, ys = ds.x_train[self._train_eval_idx], ds.y_train[self._train_eval_idx]
        sets = {"train_acc": (xs, ys, "goodness"), "test_acc": (ds.x_test, ds.y_test, "goodness")}
        if self.config.softmax_head:
            sets["train_acc_softmax"] = (xs, ys, "softmax")
            sets["test_acc_softmax"] = (ds.x_test, ds.y_test, "softmax")
        return sets


def _main_only_outputs(ctx: DistContext, kwargs: dict[str, Any]) -> None:
    """Ranks other than 0 write no checkpoint, no metrics and show no progress bar."""
    if not ctx.is_main:
        kwargs["checkpoint_path"] = None
        kwargs["metrics_path"] = None
        kwargs["progress"] = False


def _epoch_record(
    epoch: int,
    layer_losses: list[float],
    lr: float,
    seconds: float,
    n: int,
    ctx: DistContext,
    mode: str,
) -> dict[str, Any]:
    """The keys of a single-process epoch record, plus how the run was spread."""
    return {
        "epoch": epoch,
        "loss": float(sum(layer_losses) / len(layer_losses)),
        "layer_losses": layer_losses,
        "lr": lr,
        "seconds": seconds,
        "samples_per_s": n / seconds,
        "parallel": mode,
        "world_size": ctx.world_size,
    }


# -- the layer pipeline --------------------------------------------------------------------------


def check_pipeline(config: FFConfig, world_size: int) -> None:
    """Raise ``ValueError`` unless ``config`` can run as a layer pipeline on ``world_size``."""
    check_supported_variant(config, "pipeline")
    layers = len(config.layers)
    if world_size != layers:
        raise ValueError(
            f"--parallel pipeline puts layer k on rank k: {layers} layers need exactly "
            f"{layers} ranks (torchrun --nproc-per-node {layers}), got {world_size}"
        )
    if config.negatives != "random" or config.softmax_head:
        raise ValueError(
            "--parallel pipeline trains without the softmax head and with random negatives: "
            "the head and hard negatives need every layer's neutral-pass activities with the "
            "current weights, which no pipeline stage has; pass --negatives random "
            "--no-softmax-head"
        )
    if config.training != "simultaneous":
        raise ValueError(
            "--parallel pipeline overlaps the layers' steps; greedy training steps one layer "
            "at a time, so use --parallel data or none for it"
        )


def first_stage_input(
    net: FFNetwork, x: torch.Tensor, labels: torch.Tensor
) -> tuple[Activations, int]:
    """The first layer's input for raw images: positives, random negatives, normalized.

    Draws from ``net.generator`` exactly as :meth:`FFNetwork.train_step` does without a head.
    """
    neg = net.sample_negative_labels(labels)
    batch = torch.cat([net.embed(x, labels), net.embed(x, neg)])
    return net.backend.normalize(batch, net.objective), x.shape[0]


class _Sender:
    """Point-to-point sends of one stage's outputs, at most one minibatch in flight."""

    def __init__(self, dst: int) -> None:
        self.dst = dst
        self.pending: list[Any] = []
        self.keep: list[torch.Tensor] = []  # the tensors must live until their send completes

    def send(self, act: Activations, n_pos: int) -> None:
        self.wait()
        x, scale = act.x.contiguous(), act.scale.contiguous()
        header = torch.tensor(
            [n_pos, x.shape[0], _DTYPE_CODES[x.dtype]], dtype=torch.int64, device=x.device
        )
        self.keep = [header, x, scale]
        self.pending = [dist.isend(t, self.dst) for t in self.keep]

    def wait(self) -> None:
        for work in self.pending:
            work.wait()
        self.pending, self.keep = [], []


def _recv_activations(src: int, rows: int, width: int, ctx: DistContext) -> tuple[Activations, int]:
    """Receive ``(x, scale, n_pos)`` of a minibatch of ``rows`` rows from rank ``src``."""
    header = torch.empty(3, dtype=torch.int64, device=ctx.device)
    dist.irecv(header, src).wait(ctx.timeout)
    n_pos, n_rows, code = header.tolist()  # host sync: the shapes to receive
    if n_rows != rows:
        raise RuntimeError(
            f"pipeline out of step: rank {ctx.rank} expected {rows} rows from rank {src}, "
            f"got {n_rows}"
        )
    x = torch.empty(rows, width, dtype=_CODE_DTYPES[code], device=ctx.device)
    scale = torch.empty(rows, dtype=torch.float32, device=ctx.device)
    dist.irecv(x, src).wait(ctx.timeout)
    dist.irecv(scale, src).wait(ctx.timeout)
    return Activations(x, scale), n_pos


class PipelineTrainer(Trainer):
    """:class:`Trainer` with layer ``k`` trained on rank ``k`` (see the module docstring).

    Every rank holds the whole network; it trains its own layer and, at the end of each
    epoch, receives the others' so that evaluation and rank 0's checkpoint see all of them.
    """

    def __init__(self, config: FFConfig, dataset: Dataset, ctx: DistContext, **kwargs: Any):
        check_pipeline(config, ctx.world_size)
        self.ctx = ctx
        self.stage = ctx.rank
        _main_only_outputs(ctx, kwargs)
        super().__init__(config, dataset, device=ctx.device, **kwargs)
        log.info(
            "layer pipeline over %d ranks (%s), layer k on rank k", ctx.world_size, ctx.backend
        )

    def fit(self, stop_after: int | None = None) -> TrainResult:
        _run_on_main(self.ctx, self._check_outputs)
        return super().fit(stop_after)

    def _train_epoch(self) -> dict[str, Any]:
        cfg, ds, net, ctx, k = self.config, self.dataset, self.network, self.ctx, self.stage
        lr = optim.lr_at(net.opt, self.epoch, cfg.epochs)
        n = ds.x_train.shape[0]
        last = k + 1 == len(net.layers)
        # Only the first stage draws: permutation and negatives, in single-process order.
        order = torch.randperm(n, generator=net.generator, device=self.device) if k == 0 else None
        sender = None if last else _Sender(k + 1)
        loss_sum = torch.zeros((), device=self.device)
        steps = 0
        t0 = time.perf_counter()
        for start in _progress(
            range(0, n, cfg.batch_size), self.progress, f"epoch {self.epoch + 1}"
        ):
            rows = min(cfg.batch_size, n - start)
            if order is not None:
                idx = order[start : start + rows]
                inp, n_pos = first_stage_input(net, ds.x_train[idx], ds.y_train[idx])
            else:
                inp, n_pos = _recv_activations(k - 1, 2 * rows, net.layers[k].in_features, ctx)
            out = net.backend.step(net.layers[k], inp, n_pos, net.objective, net.opt, lr)
            loss_sum += out.loss
            if sender is not None:
                sender.send(out.out, n_pos)
            steps += 1
        if sender is not None:
            sender.wait()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # deliberate: the epoch's time ends here
        seconds = time.perf_counter() - t0
        self._share_layers()
        losses = [torch.zeros((), device=self.device) for _ in range(ctx.world_size)]
        dist.all_gather(losses, loss_sum / steps)
        layer_losses = torch.stack(losses).tolist()  # host sync, once per epoch
        self.epoch += 1
        record = _epoch_record(self.epoch, layer_losses, lr, seconds, n, ctx, "pipeline")
        record.update(self.evaluate())
        record["eval_seconds"] = time.perf_counter() - t0 - seconds
        return record

    def _share_layers(self) -> None:
        """All-gather every stage's layer (parameters, optimizer and peer state)."""
        states: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(states, _to_cpu(self.network.layers[self.stage].state_dict()))
        for j, state in enumerate(states):
            if j != self.stage:
                self.network.layers[j] = FFLayer.from_state_dict(state, self.device)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Goodness-predictor accuracies, each rank predicting a shard of the images."""
        ds = self.dataset
        xs, ys = ds.x_train[self._train_eval_idx], ds.y_train[self._train_eval_idx]
        sets = {"train_acc": (xs, ys, "goodness"), "test_acc": (ds.x_test, ds.y_test, "goodness")}
        return sharded_accuracies(self.network, sets, self.ctx)


@dataclass
class PipelineSimulation:
    """What :func:`simulate_pipeline` returns."""

    network: FFNetwork
    layer_losses: list[list[float]] = field(default_factory=list)  # per epoch, per layer


@torch.no_grad()
def simulate_pipeline(
    config: FFConfig,
    dataset: Dataset,
    backend: str | Backend = "reference",
    device: str | torch.device = "cpu",
    epochs: int | None = None,
) -> PipelineSimulation:
    """The layer pipeline's delayed schedule, run tick by tick in one process.

    On tick ``s`` layer ``k`` steps on minibatch ``t = s - k`` with the activities layer
    ``k - 1`` produced for ``t`` on tick ``s - 1``; each epoch runs ``T + L - 1`` ticks for
    ``T`` minibatches and ``L`` layers. Randomness is drawn by the first stage in minibatch
    order, as rank 0 of :class:`PipelineTrainer` draws it. Trains ``epochs`` (default: all of
    ``config.epochs``) from the seed's initialization.
    """
    check_pipeline(config, len(config.layers))
    dev = torch.device(device)
    be = backend if isinstance(backend, Backend) else get_backend(backend, dev)
    ds = dataset.to(dev)
    net = FFNetwork(config, ds.num_features, ds.num_classes, device=dev, backend=be)
    n, b, depth = ds.x_train.shape[0], config.batch_size, len(config.layers)
    result = PipelineSimulation(network=net)
    for epoch in range(config.epochs if epochs is None else epochs):
        lr = optim.lr_at(net.opt, epoch, config.epochs)
        order = torch.randperm(n, generator=net.generator, device=dev)
        starts = range(0, n, b)
        inbox: dict[tuple[int, int], tuple[Activations, int]] = {}  # (layer, minibatch) → input
        loss_sum = torch.zeros(depth, device=dev)
        for tick in range(len(starts) + depth - 1):
            # Within a tick the stages touch different layers and minibatches, so any order
            # gives the same result; this one reads each inbox entry before it is replaced.
            for k in reversed(range(depth)):
                t = tick - k
                if not 0 <= t < len(starts):
                    continue
                if k == 0:
                    idx = order[starts[t] : starts[t] + b]
                    inp, n_pos = first_stage_input(net, ds.x_train[idx], ds.y_train[idx])
                else:
                    inp, n_pos = inbox.pop((k, t))
                out = be.step(net.layers[k], inp, n_pos, net.objective, net.opt, lr)
                loss_sum[k] += out.loss
                if k + 1 < depth:
                    inbox[(k + 1, t)] = (out.out, n_pos)
        result.layer_losses.append((loss_sum / len(starts)).tolist())
    return result


# -- the command line ----------------------------------------------------------------------------


def cli_train(args: argparse.Namespace) -> int:
    """``ffkern train --parallel data|pipeline``: the flags of single-process training.

    Returns 0 on success. On any error this rank logs it with its rank number and ends its
    process at once (see "Failures" in the module docstring); it does not return.
    """
    ctx: DistContext | None = None
    try:
        # A --dist-timeout flag, should the command line grow one, wins over the environment.
        ctx = init_distributed(args.device, getattr(args, "dist_timeout", None))
        _configure_logging(ctx)
        trainer = _build_trainer(args, ctx)
        result = trainer.fit(stop_after=args.stop_after)
        if ctx.is_main and result.history:
            last = result.history[-1]
            print(json.dumps({k: last[k] for k in ("epoch", "loss", "train_acc", "test_acc")}))
        dist.destroy_process_group()
        return 0
    except BaseException as exc:  # every failure, even KeyboardInterrupt, must end this rank
        _abort(exc, ctx)


def _abort(exc: BaseException, ctx: DistContext | None) -> NoReturn:
    """Log ``exc`` with the rank and end the process without waiting on the other ranks."""
    if ctx is not None:
        where = f"rank {ctx.rank} of {ctx.world_size}"
    elif "RANK" in os.environ:
        where = f"rank {os.environ['RANK']} of {os.environ.get('WORLD_SIZE', '?')}"
    else:
        where = "this process (not started by torchrun)"
    usage = isinstance(exc, _USAGE_ERRORS)
    if usage:
        log.error("%s: %s", where, exc)
    else:
        log.error("%s failed: %s", where, exc, exc_info=exc)
    print(f"ffkern train: error on {where}: {exc}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    # os._exit skips the process group's teardown, which could block on the failed peers.
    os._exit(2 if usage else 130 if isinstance(exc, KeyboardInterrupt) else 1)


def _build_trainer(args: argparse.Namespace, ctx: DistContext) -> Trainer:
    """The trainer the flags describe, resumed from ``--resume`` when given."""
    from ffkern.cli import run_config

    config, dataset_name = run_config(args)
    dataset = _load_dataset(dataset_name, args.data, args.download, ctx)
    cls = DataParallelTrainer if args.parallel == "data" else PipelineTrainer
    trainer = cls(
        config,
        dataset,
        ctx,
        backend=args.backend,
        precision=args.precision,
        metrics_path=args.metrics,
        checkpoint_path=args.checkpoint,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    if args.resume:
        trainer.resume(args.resume)
    return trainer


def _load_dataset(name: str, data_dir: str | None, download: bool, ctx: DistContext) -> Dataset:
    """Every rank loads the dataset; with ``download``, rank 0 fetches it first, alone.

    A download can outlast the collective timeout, so the other ranks wait for it in a gloo
    group of their own with a timeout of ``DOWNLOAD_TIMEOUT_S``.
    """
    from ffkern.data import load_dataset

    if download:
        patient = dist.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=DOWNLOAD_TIMEOUT_S)
        )
        _run_on_main(ctx, lambda: load_dataset(name, data_dir, download=True), patient)
        dist.destroy_process_group(patient)
    return load_dataset(name, data_dir)
