"""Data parallelism and the layer pipeline on two CPU processes (gloo), against one process.

Two real processes run the ``ffkern train`` command line (:func:`ffkern.cli.main`, which hands
``--parallel`` to :func:`ffkern.distributed.cli_train`) for several runs in a row, one
process-group rendezvous per run; the test process trains the single-process references and
compares checkpoints. Four more jobs go through ``torchrun`` itself: a rank that raises, a rank
that hangs, a usage error, and a three-stage pipeline through ``torchrun -m ffkern``.

Tolerances. Data parallelism sums per-shard partial sums of ``dW`` in another order than one
matrix product does, so the weights differ in the last bits after one step (about 1e-7 of
their scale) and FF training amplifies that a little each step. Differences are measured
against each tensor's largest magnitude. After the 48 steps of these runs the weights differ by
under 1e-6 of theirs, and the SGD momentum buffers (running sums of gradients, so with more
cancellation) by up to about 7e-6; ``DP_RTOL`` leaves several times that. The generator
state must match exactly: every rank draws the same permutation and negatives as one process.
Minibatches that split unevenly over the ranks are checked in float64, where rounding is out of
the way, to ``F64_RTOL``. The pipeline runs the same operations on the same shapes as its
single-process simulation (the runs here match it bitwise), so its tolerance only covers a
change of thread count.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from ffkern import FFConfig, FFNetwork, Trainer, load_dataset
from ffkern import distributed as fd
from ffkern.checkpoint import load_checkpoint, read_metrics

DP_RTOL = 5e-5  # of max |tensor|: weights, peer means, optimizer state after 2 epochs (see above)
PIPE_RTOL = 1e-6
JOB_DEADLINE_S = 120  # a whole spawned or torchrun job; a hang fails the test, not the CI
FAIL_BOUND_S = 60  # a failing or hung rank must end its job within this

COMMON = [
    "--dataset", "digits", "--layers", "32,32", "--epochs", "2", "--batch-size", "64",
    "--lr", "0.003", "--seed", "3", "--backend", "reference", "--device", "cpu",
    "--no-progress",
]  # fmt: skip
PIPE_FLAGS = ["--negatives", "random", "--no-softmax-head"]
DP_CONFIG = FFConfig(layers=(32, 32), epochs=2, batch_size=64, lr=0.003, seed=3)
PIPE_CONFIG = DP_CONFIG.replace(negatives="random", softmax_head=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, runs: list[tuple[int, list[str]]]) -> None:
    """One rank: the given ``ffkern`` command lines in turn, one rendezvous port each."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ[fd.TIMEOUT_ENV] = "30"
    torch.set_num_threads(1)  # two ranks on two cores
    from ffkern.cli import main

    for port, argv in runs:
        os.environ["MASTER_PORT"] = str(port)
        if argv[0] == "odd-batches":
            _odd_batches(Path(argv[1]))
        elif main(argv) != 0:
            raise RuntimeError(f"rank {rank}: {argv} returned non-zero")


ODD_BATCH, ODD_STEPS = 7, 20  # shards of 3 and 4 rows: the weighted average is needed
F64_RTOL = 1e-12  # observed about 1e-15 of each tensor's scale after ODD_STEPS steps


def _odd_batch_steps(step: Any) -> FFNetwork:
    """``step(net, x, y, lr)`` on ``ODD_STEPS`` minibatches of ``ODD_BATCH`` rows, in float64.

    In float64 the rounding of the all-reduce is negligible, so any difference in the maths
    (a wrong shard weight, a negative drawn differently) shows far above ``F64_RTOL``.
    """
    ds = load_dataset("digits")
    net = FFNetwork(DP_CONFIG, ds.num_features, ds.num_classes)
    for layer in net.layers:
        layer.weight, layer.bias = layer.weight.double(), layer.bias.double()
        layer.peer_mean = layer.peer_mean.double()
    net.head_weight, net.head_bias = net.head_weight.double(), net.head_bias.double()
    x = ds.x_train.double()
    for s in range(ODD_STEPS):
        rows = slice(s * ODD_BATCH, (s + 1) * ODD_BATCH)
        step(net, x[rows], ds.y_train[rows], DP_CONFIG.lr)
    return net


def _odd_batches(out: Path) -> None:
    """Data-parallel steps on minibatches that split unevenly; rank 0 saves the network."""
    import torch.distributed as dist

    ctx = fd.init_distributed("cpu")
    net = _odd_batch_steps(lambda net, x, y, lr: fd.data_parallel_step(net, x, y, lr, ctx))
    if ctx.is_main:
        torch.save(net.state_dict(), out)
    dist.destroy_process_group()


def _single(config: FFConfig, stop_after: int | None = None, **kwargs: Any) -> Trainer:
    trainer = Trainer(config, load_dataset("digits"), backend="reference", device="cpu",
                      progress=False, **kwargs)  # fmt: skip
    trainer.fit(stop_after=stop_after)
    return trainer


def _assert_close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """``max |got - want| <= rtol · max |want|`` (zero tensors must match exactly)."""
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rtol * scale, f"{name}: max |difference| {err:.3g} > {rtol:.1g} · {scale:.3g}"


def _assert_same_network(got: dict[str, Any], want: dict[str, Any], rtol: float) -> None:
    """Every layer's tensors and step, the head, and the sampling generator (exactly)."""
    assert torch.equal(got["generator"], want["generator"]), "generators differ"
    for i, (g, w) in enumerate(zip(got["layers"], want["layers"], strict=True)):
        assert g["step"] == w["step"], f"layer {i}: step {g['step']} != {w['step']}"
        tensors = {k: (g[k], w[k]) for k in ("weight", "bias", "peer_mean")}
        tensors.update({k: (g["opt_state"][k], w["opt_state"][k]) for k in w["opt_state"]})
        for name, (a, b) in tensors.items():
            _assert_close(f"layer {i} {name}", a, b, rtol)
    for name in ("weight", "bias"):
        _assert_close(f"head {name}", got["head"][name], want["head"][name], rtol)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Single-process references, then one 2-process job running every parallel scenario."""
    d = tmp_path_factory.mktemp("dist")
    single_1 = _single(DP_CONFIG, stop_after=1, checkpoint_path=d / "single1.pt")
    single_2 = _single(DP_CONFIG)
    pipe_ref = fd.simulate_pipeline(PIPE_CONFIG, load_dataset("digits"))
    scenarios = [
        # 2 epochs data parallel, metrics and checkpoint from rank 0 only
        COMMON + ["--parallel", "data", "--checkpoint", str(d / "dp.pt"),
                  "--metrics", str(d / "dp.jsonl")],
        # 1 epoch, to be resumed by one process
        COMMON + ["--parallel", "data", "--stop-after", "1", "--checkpoint", str(d / "dp1.pt")],
        # a single-process checkpoint resumed by two ranks
        ["train", "--resume", str(d / "single1.pt"), "--parallel", "data", "--device", "cpu",
         "--backend", "reference", "--no-progress", "--checkpoint", str(d / "resumed12.pt")],
        # the layer pipeline, 2 layers on 2 ranks
        COMMON + PIPE_FLAGS + ["--parallel", "pipeline", "--checkpoint", str(d / "pipe.pt"),
                               "--metrics", str(d / "pipe.jsonl")],
    ]  # fmt: skip
    scenarios = [["train", *s] if s[0] != "train" else s for s in scenarios]
    scenarios.append(["odd-batches", str(d / "odd.pt")])
    job = [(_free_port(), argv) for argv in scenarios]
    t0 = time.monotonic()
    ctx = mp.start_processes(_worker, args=(job,), nprocs=2, join=False, start_method="spawn")
    while not ctx.join(timeout=1):
        if time.monotonic() - t0 > JOB_DEADLINE_S:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the 2-process job did not finish within {JOB_DEADLINE_S} s")
    return {"dir": d, "single_1": single_1, "single_2": single_2, "pipe_ref": pipe_ref}


def test_data_parallel_equals_one_process_on_the_whole_minibatch(runs: dict[str, Any]) -> None:
    got = load_checkpoint(runs["dir"] / "dp.pt")
    want = runs["single_2"]
    assert got["epoch"] == 2
    _assert_same_network(got["network"], want.network.state_dict(), DP_RTOL)
    records = read_metrics(runs["dir"] / "dp.jsonl")
    assert [r["epoch"] for r in records] == [1, 2], "metrics must be written once, by rank 0"
    for r, w in zip(records, want.history, strict=True):
        assert r["world_size"] == 2
        assert r["loss"] == pytest.approx(w["loss"], rel=1e-5)
        assert r["test_acc"] == pytest.approx(w["test_acc"], abs=1e-6)
        assert r["test_acc_softmax"] == pytest.approx(w["test_acc_softmax"], abs=1e-6)


def test_data_parallel_is_exact_on_shards_of_unequal_size(runs: dict[str, Any]) -> None:
    net = _odd_batch_steps(lambda net, x, y, lr: net.train_step(x, y, lr))
    got = torch.load(runs["dir"] / "odd.pt", weights_only=True)
    assert got["layers"][0]["weight"].dtype == torch.float64
    _assert_same_network(got, net.state_dict(), F64_RTOL)


def test_checkpoint_of_two_ranks_resumes_in_one_process(runs: dict[str, Any]) -> None:
    ck = runs["dir"] / "dp1.pt"
    _assert_same_network(
        load_checkpoint(ck)["network"], runs["single_1"].network.state_dict(), DP_RTOL
    )
    trainer = Trainer(DP_CONFIG, load_dataset("digits"), backend="reference", device="cpu",
                      progress=False)  # fmt: skip
    trainer.resume(ck)
    trainer.fit()
    _assert_same_network(
        trainer.network.state_dict(), runs["single_2"].network.state_dict(), DP_RTOL
    )


def test_checkpoint_of_one_process_resumes_on_two_ranks(runs: dict[str, Any]) -> None:
    got = load_checkpoint(runs["dir"] / "resumed12.pt")
    assert got["epoch"] == 2
    assert [h["epoch"] for h in got["history"]] == [1, 2]
    _assert_same_network(got["network"], runs["single_2"].network.state_dict(), DP_RTOL)


def test_pipeline_equals_its_single_process_schedule(runs: dict[str, Any]) -> None:
    got = load_checkpoint(runs["dir"] / "pipe.pt")
    sim = runs["pipe_ref"]
    _assert_same_network(got["network"], sim.network.state_dict(), PIPE_RTOL)
    records = read_metrics(runs["dir"] / "pipe.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    for r, losses in zip(records, sim.layer_losses, strict=True):
        assert r["layer_losses"] == pytest.approx(losses, rel=1e-6)


def test_pipeline_schedule_computes_what_sequential_training_does(
    runs: dict[str, Any],
) -> None:
    """Nothing flows backwards, so delaying layer k by k minibatches changes no number."""
    trainer = _single(PIPE_CONFIG)
    _assert_same_network(
        runs["pipe_ref"].network.state_dict(), trainer.network.state_dict(), PIPE_RTOL
    )


def test_data_parallel_checkpoint_evaluates_with_ffkern_eval(
    runs: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from ffkern.cli import main

    capsys.readouterr()
    ck = runs["dir"] / "dp.pt"
    assert main(["eval", str(ck), "--json", "--backend", "reference", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    last = read_metrics(runs["dir"] / "dp.jsonl")[-1]
    assert result["epoch"] == 2
    assert result["test_acc"] == pytest.approx(last["test_acc"], abs=1e-6)


# -- failures, through torchrun ------------------------------------------------------------------

FAULTY_LAUNCH = textwrap.dedent(
    """
    import os, sys, time
    from ffkern import distributed
    real_step = distributed.data_parallel_step
    def step(net, x, labels, lr, ctx, active=None):
        if ctx.rank == 1:
            if os.environ["FAULT"] == "raise":
                raise RuntimeError("injected failure in the training step")
            time.sleep(600)
        return real_step(net, x, labels, lr, ctx, active)
    distributed.data_parallel_step = step
    from ffkern.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _torchrun(args: list[str], env: dict[str, str], ranks: int = 2) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(ranks), *args]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=JOB_DEADLINE_S, env={**os.environ, **env}
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


@pytest.mark.parametrize(
    ("fault", "expected"),
    # A hang is reported by whichever rank's timeout expires first (rank 0, unless loading
    # the dataset on it took longer than the timeout).
    [("raise", r"rank 1 of 2 failed: injected failure"), ("hang", r"rank [01] of 2 failed")],
)
def test_a_failing_or_hung_rank_ends_the_job(tmp_path: Path, fault: str, expected: str) -> None:
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY_LAUNCH)
    argv = [str(script), "train", *COMMON, "--parallel", "data"]
    # A raising rank closes its sockets, so its peer fails without waiting for the timeout;
    # a hung one is only noticed by the timeout, kept short here.
    timeout = "60" if fault == "raise" else "5"
    env = {"FAULT": fault, fd.TIMEOUT_ENV: timeout, "OMP_NUM_THREADS": "1"}
    rc, out, seconds = _torchrun(argv, env)
    assert rc != 0, out
    assert re.search(expected, out), out
    assert seconds < FAIL_BOUND_S, f"the job took {seconds:.0f} s to end"


def test_three_stage_pipeline_under_torchrun(tmp_path: Path) -> None:
    """``torchrun -m ffkern``: a middle stage that both receives and sends; rank 0 writes."""
    ck, metrics = tmp_path / "pipe3.pt", tmp_path / "pipe3.jsonl"
    argv = ["-m", "ffkern", "train", *COMMON, "--layers", "32,24,16", *PIPE_FLAGS,
            "--parallel", "pipeline", "--checkpoint", str(ck),
            "--metrics", str(metrics)]  # fmt: skip
    rc, out, _ = _torchrun(argv, {"OMP_NUM_THREADS": "1"}, ranks=3)
    assert rc == 0, out
    assert out.count("epoch   2/2") == 1, "only rank 0 logs at INFO"
    sim = fd.simulate_pipeline(PIPE_CONFIG.replace(layers=(32, 24, 16)), load_dataset("digits"))
    _assert_same_network(load_checkpoint(ck)["network"], sim.network.state_dict(), PIPE_RTOL)
    records = read_metrics(metrics)
    assert len(records) == len(sim.layer_losses) == 2
    for r, losses in zip(records, sim.layer_losses, strict=True):
        assert r["layer_losses"] == pytest.approx(losses, rel=1e-6)


def test_usage_error_under_torchrun_names_the_fix() -> None:
    argv = ["-m", "ffkern", "train", *COMMON, "--layers", "32,32,32", *PIPE_FLAGS,
            "--parallel", "pipeline"]  # fmt: skip
    rc, out, _ = _torchrun(argv, {"OMP_NUM_THREADS": "1"}, ranks=1)
    assert rc != 0
    assert "3 layers need exactly 3 ranks (torchrun --nproc-per-node 3), got 1" in out, out


# -- checks that need no process group -----------------------------------------------------------


@pytest.mark.parametrize(("n", "world"), [(64, 2), (28, 2), (7, 3), (1000, 7), (5, 5)])
def test_shards_cover_the_minibatch_once(n: int, world: int) -> None:
    bounds = [fd.shard_bounds(n, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_data_parallel_refuses_uneven_minibatches() -> None:
    with pytest.raises(ValueError, match="multiple of 3 such as 63 or 66"):
        fd.check_data_parallel(DP_CONFIG, 1500, 3)
    with pytest.raises(ValueError, match="minibatch of 1 rows"):
        fd.check_data_parallel(DP_CONFIG.replace(batch_size=100), 1501, 2)
    fd.check_data_parallel(DP_CONFIG, 1500, 2)


def test_pipeline_refuses_what_it_cannot_overlap() -> None:
    with pytest.raises(ValueError, match="2 layers need exactly 2 ranks"):
        fd.check_pipeline(PIPE_CONFIG, 3)
    with pytest.raises(ValueError, match="--negatives random --no-softmax-head"):
        fd.check_pipeline(DP_CONFIG, 2)
    with pytest.raises(ValueError, match="greedy"):
        fd.check_pipeline(PIPE_CONFIG.replace(training="greedy"), 2)


def test_timeout_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fd.TIMEOUT_ENV, raising=False)
    assert fd.dist_timeout() == fd.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(fd.TIMEOUT_ENV, "7.5")
    assert fd.dist_timeout() == 7.5
    monkeypatch.setenv(fd.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="positive number of seconds"):
        fd.dist_timeout()


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"augment": "jitter"}, "--augment jitter"),
        ({"negatives": "hybrid", "softmax_head": True}, "--negatives hybrid"),
        ({"model": "recurrent"}, "--model recurrent"),
    ],
)
def test_scale_out_refuses_variants_it_does_not_implement(changes, named):
    """Variants that scale-out does not build are refused, never skipped silently."""
    config = FFConfig(layers=(8, 8), batch_size=4, negatives="random", softmax_head=False)
    config = config.replace(**changes)
    with pytest.raises(ValueError, match=named):
        fd.check_data_parallel(config, 100, 2)
    with pytest.raises(ValueError, match=named):
        fd.check_pipeline(config, 2)
