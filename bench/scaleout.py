r"""Data-parallel scale-out of FF training: samples/s on 1 and more ranks, and the efficiency.

Run ``python bench/scaleout.py`` (CPU ranks 1 and 2, or every GPU count up to the machine's),
``--quick`` for a short run, ``--json PATH`` to save the rows. Each row is its own ``torchrun``
job, so every row pays its start-up outside the timed region.

What is timed
-------------
One step is one data-parallel training step on a global minibatch of ``B`` positive images of
``K`` random features (10 classes), prepared before timing: on ``N`` ranks
:func:`ffkern.distributed.data_parallel_step` (each rank trains on ``B / N`` rows; gradients,
peer statistics and the softmax head's gradients are all-reduced, the head's probabilities
all-gathered for hard negatives); on one rank plain :meth:`ffkern.FFNetwork.train_step`, with
no process group, since that is what scale-out is measured against. The recipe is Hinton's
(hard negatives, softmax head, peer normalization), the one ``--parallel data`` trains.
Throughput is ``B / t`` positive images per second for the median ``t`` over windows of
``STEPS_PER_WINDOW`` steps (each window starts after a barrier and, on a GPU, ends with a
device synchronization), after warm-up steps.

Fairness on a CPU
-----------------
The ranks of a CPU row share one machine, so each rank gets ``cores / N`` intra-op threads
(``torch.set_num_threads`` and ``OMP_NUM_THREADS``): every row uses the same cores. Two ratios
are shown:

``vs 1 rank``
    throughput over that of one process using every core. On a CPU the ideal is 1.0 (the same
    cores do the same work); above it, ranks beat intra-op threading on these shapes.
``efficiency``
    throughput over ``N ×`` the throughput of one rank with ``cores / N`` threads: how close
    ``N`` ranks come to ``N`` independent copies of one rank's share of the machine. On GPUs
    (one rank per device) this is the usual scaling efficiency, ``T_N / (N · T_1)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("bench.scaleout")

STEPS_PER_WINDOW = 5  # steps between two clock reads
WARMUP_STEPS = 3


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _load_average() -> float:
    """One-minute load average (0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def worker(args: argparse.Namespace) -> None:
    """One rank of one row: time the steps, and rank 0 writes ``{samples_per_s, ...}``."""
    import torch.distributed as dist

    from ffkern import FFConfig, FFNetwork, get_backend
    from ffkern import distributed as fd

    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ctx = fd.init_distributed(args.device) if world > 1 else None
    device = ctx.device if ctx is not None else _device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    config = FFConfig(layers=args.layers, batch_size=args.batch, lr=0.01, seed=0)
    net = FFNetwork(config, args.features, 10, device=device,
                    backend=get_backend(args.backend, device))  # fmt: skip
    gen = torch.Generator().manual_seed(1)  # the same global minibatch on every rank
    x = torch.rand(args.batch, args.features, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)

    def step() -> None:
        if ctx is None:
            net.train_step(x, y, config.lr)
        else:
            fd.data_parallel_step(net, x, y, config.lr, ctx)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # deliberate: a window ends when the GPU is done
        if ctx is not None:
            dist.barrier()

    for _ in range(WARMUP_STEPS):
        step()
    times = []
    for _ in range(args.windows):
        sync()
        t0 = time.perf_counter()
        for _ in range(STEPS_PER_WINDOW):
            step()
        sync()
        times.append((time.perf_counter() - t0) / STEPS_PER_WINDOW)
    if ctx is None or ctx.is_main:
        t = statistics.median(times)
        out = {"step_s": t, "samples_per_s": args.batch / t, "device": str(device)}
        Path(args.out).write_text(json.dumps(out))
    if ctx is not None:
        dist.destroy_process_group()


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_row(args: argparse.Namespace, ranks: int, threads: int) -> dict[str, Any]:
    """Launch one row as a ``torchrun`` job and return its measurement."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        worker_args = [
            __file__, "--worker", "--out", str(out), "--threads", str(threads),
            "--layers", ",".join(map(str, args.layers)), "--batch", str(args.batch),
            "--features", str(args.features), "--windows", str(args.windows),
            "--device", args.device, "--backend", args.backend,
        ]  # fmt: skip
        if ranks == 1:
            cmd = [sys.executable, *worker_args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(ranks), *worker_args]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"row with {ranks} ranks failed (exit {proc.returncode}):\n"
                f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
            )
        row = json.loads(out.read_text())
    row.update(ranks=ranks, threads_per_rank=threads)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="500,500", help="hidden widths (default 500,500)")
    p.add_argument("--batch", type=int, default=512, help="global minibatch (positives)")
    p.add_argument("--features", type=int, default=784, help="input features K")
    p.add_argument("--ranks", help="comma-separated rank counts (default: 1,2 or GPU counts)")
    p.add_argument("--windows", type=int, default=7, help="timed windows per row (median)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--backend", default="auto", help="ffkern backend (default auto)")
    p.add_argument("--quick", action="store_true", help="3 windows, smaller layers")
    p.add_argument("--json", metavar="PATH", help="save the rows as JSON")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.layers = tuple(int(w) for w in str(args.layers).split(","))
    if args.worker:
        worker(args)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.windows = 3
        args.layers = tuple(min(w, 256) for w in args.layers)
    gpus = torch.cuda.device_count() if _device(args.device).type == "cuda" else 0
    if args.ranks:
        counts = [int(r) for r in args.ranks.split(",")]
    elif gpus:
        counts = sorted({1, *(n for n in (2, 4, 8) if n <= gpus), gpus})
    else:
        counts = [1, 2]
    if gpus and max(counts) > gpus:
        raise SystemExit(f"--ranks asks for {max(counts)} ranks but only {gpus} GPUs are here")
    if args.batch % max(counts):
        raise SystemExit(f"--batch {args.batch} must be a multiple of every rank count {counts}")
    cores = _cores()
    load_before = _load_average()
    rows = []
    if gpus:
        for n in counts:
            rows.append(run_row(args, n, max(1, cores // n)))
            log.info("%d ranks: %.0f samples/s", n, rows[-1]["samples_per_s"])
        base = rows[0]["samples_per_s"]
        for r in rows:
            r["vs_1_rank"] = r["samples_per_s"] / base
            r["efficiency"] = r["samples_per_s"] / (r["ranks"] * base)
    else:
        full = run_row(args, 1, cores)
        rows.append(full)
        share_base: dict[int, float] = {}
        for n in counts:
            threads = max(1, cores // n)
            if n == 1 and threads == cores:
                continue
            if threads not in share_base and threads != cores:
                one = run_row(args, 1, threads)
                rows.append(one)
                share_base[threads] = one["samples_per_s"]
            if n > 1:
                rows.append(run_row(args, n, threads))
            log.info("%d ranks x %d threads measured", n, threads)
        share_base.setdefault(cores, full["samples_per_s"])
        for r in rows:
            r["vs_1_rank"] = r["samples_per_s"] / full["samples_per_s"]
            base = share_base.get(r["threads_per_rank"], full["samples_per_s"])
            r["efficiency"] = r["samples_per_s"] / (r["ranks"] * base)
    load = max(load_before, _load_average())
    header = (
        f"data-parallel FF step, layers {'x'.join(map(str, args.layers))}, K={args.features}, "
        f"global batch {args.batch}, device {rows[0]['device']}, {cores} cores, "
        f"load average {load:.1f}"
    )
    if not gpus and load > 0.5 * cores:
        log.warning(
            "the machine was busy (load average %.1f on %d cores): other processes compete "
            "for the cores, so the CPU rows are noisy and multi-threaded rows suffer most",
            load,
            cores,
        )
    print(header)
    print(f"{'ranks':>5} {'thr/rank':>8} {'step ms':>9} {'samples/s':>10} {'vs 1 rank':>9} "
          f"{'efficiency':>10}")  # fmt: skip
    for r in rows:
        print(
            f"{r['ranks']:>5} {r['threads_per_rank']:>8} {1e3 * r['step_s']:>9.2f} "
            f"{r['samples_per_s']:>10.0f} {r['vs_1_rank']:>9.2f} {r['efficiency']:>10.2f}"
        )
    if args.json:
        payload = {"header": header, "load_average": load, "cores": cores, "rows": rows}
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
