"""The benchmark's own correctness: its baseline is the same algorithm, its FLOP counts are right.

A throughput comparison is only meaningful if the autograd baseline trains exactly what ffkern
trains. The cross-check copies one initialization into both, takes two training steps (the
second exercises the momentum buffers) on the same positives and negatives, and compares every
layer's loss and updated parameters. The FLOP formulas are checked against torch's own FLOP
counter, and a micro run of ``main`` checks the JSON rows carry the documented keys.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import throughput  # noqa: E402
from autograd_baseline import AutogradFF  # noqa: E402
from backprop_baseline import BackpropMLP, backprop_flops  # noqa: E402

from ffkern import FFConfig, FFNetwork  # noqa: E402

# float64 on both sides; what differs is only torch's softplus, linear above 20 (an error of
# log1p(e^-20) ≈ 2e-9 per row), hence tolerances well above float64 rounding.
RTOL, ATOL = 1e-7, 1e-9


def _pair(layers: tuple[int, ...], in_features: int, classes: int, lr: float):
    config = FFConfig(
        layers=layers,
        softmax_head=False,
        negatives="random",
        peer_strength=0.0,
        schedule="constant",
        lr=lr,
        momentum=0.9,
    )
    net = FFNetwork(config, in_features, classes, device="cpu", seed=3)
    base = AutogradFF(layers, in_features, classes, lr=lr, momentum=0.9, seed=5)
    for layer, linear in zip(net.layers, base.layers, strict=True):
        layer.weight = layer.weight.double()
        layer.bias = (0.1 * torch.randn(layer.out_features)).double()  # non-zero biases
        layer.peer_mean = layer.peer_mean.double()
        linear.double()
        with torch.no_grad():
            linear.weight.copy_(layer.weight)
            linear.bias.copy_(layer.bias)
    return net, base


def test_autograd_baseline_matches_ffkern_reference():
    torch.manual_seed(0)
    layers, k, c, b, lr = (23, 17, 9), 31, 5, 13, 0.05
    net, base = _pair(layers, k, c, lr)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.rand(b, k, generator=gen, dtype=torch.float64)
        y = torch.randint(0, c, (b,), generator=gen)
        wrong = (y + torch.randint(1, c, (b,), generator=gen)) % c
        batch = torch.cat([net.embed(x, y), net.embed(x, wrong)])
        ours = net.train_layers(batch, b, lr)
        theirs = torch.stack(base.train_step_on(batch, b, lr))
        torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=ATOL)
    for layer, linear in zip(net.layers, base.layers, strict=True):
        torch.testing.assert_close(layer.weight, linear.weight.detach(), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(layer.bias, linear.bias.detach(), rtol=RTOL, atol=ATOL)
    # Guard against a vacuous pass: the two steps really moved the weights.
    fresh, _ = _pair(layers, k, c, lr)
    moved = (net.layers[0].weight - fresh.layers[0].weight.double()).abs().max()
    assert moved > 1e-4


def test_baseline_label_overlay_matches_ffkern_embedding():
    net, base = _pair((8,), 12, 4, 0.01)
    x = torch.rand(6, 12, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    from autograd_baseline import overlay_labels

    torch.testing.assert_close(overlay_labels(x, y, 4), net.embed(x, y))
    wrong = base.negatives(y)
    assert bool((wrong != y).all()) and bool(((wrong >= 0) & (wrong < 4)).all())


def test_ff_flop_formula_counts_the_autograd_baselines_matmuls():
    layers, k, b = (6, 5), 7, 3
    assert throughput.ff_flops(b, layers, k) == 8 * b * (7 * 6 + 6 * 5) == 1728
    base = AutogradFF(layers, k, 3, seed=0)
    x, y = torch.rand(b, k), torch.randint(0, 3, (b,))
    with FlopCounterMode(display=False) as counter:
        base.train_step(x, y)
    assert counter.get_total_flops() == throughput.ff_flops(b, layers, k)


def test_backprop_flop_formula_counts_autograds_matmuls():
    layers, k, c, b = (6, 5), 7, 3, 4
    expected = 6 * b * (7 * 6 + 6 * 5 + 5 * 3) - 2 * b * 7 * 6
    assert backprop_flops(b, k, layers, c) == expected
    mlp = BackpropMLP(layers, k, c, seed=0)
    x, y = torch.rand(b, k), torch.randint(0, c, (b,))
    with FlopCounterMode(display=False) as counter:
        mlp.train_step(x, y)
    assert counter.get_total_flops() == expected


ROW_KEYS = {f.name for f in dataclasses.fields(throughput.Row)}
DOCUMENTED_ROW_KEYS = {
    "impl",
    "layers",
    "batch",
    "precision",
    "status",
    "ms_per_step",
    "samples_per_s",
    "us_per_sample",
    "flops_per_step",
    "tflops",
    "floor_fraction",
    "speedup_vs_autograd",
    "speedup_vs_reference",
    "peak_mib",
    "reps",
}


def test_main_writes_json_rows_with_documented_keys(tmp_path):
    out = tmp_path / "bench.json"
    plot = tmp_path / "bench.png"
    argv = ["--config", "micro", "--quick", "--device", "cpu", "--json", str(out)]
    has_mpl = True
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        has_mpl = False
    if has_mpl:
        argv += ["--plot", str(plot)]
    result = throughput.main(argv)
    data = json.loads(out.read_text())
    assert data["rows"] == json.loads(json.dumps(result["rows"]))
    assert DOCUMENTED_ROW_KEYS <= ROW_KEYS
    impls = {row["impl"] for row in data["rows"]}
    assert {"reference", "autograd", "backprop"} <= impls
    for row in data["rows"]:
        assert set(row) == ROW_KEYS
        assert row["status"] == "ok", row
        assert row["ms_per_step"] > 0 and row["samples_per_s"] > 0 and row["peak_mib"] >= 0
        assert 0 < row["floor_fraction"] and row["reps"] >= throughput.MIN_REPS
        assert row["samples_per_s"] == pytest.approx(row["batch"] / (row["ms_per_step"] / 1e3))
    autograd = [r for r in data["rows"] if r["impl"] == "autograd"]
    assert all(r["speedup_vs_autograd"] == pytest.approx(1.0) for r in autograd)
    for key in ("cpu", "cpu_cores", "torch", "triton", "git_commit"):
        assert key in data["machine"]
    assert data["floors_flops"]["fp32"] > 0
    assert [r["impl"] for r in data["layer_step"]][:2] == ["matmul-pair", "reference"]
    if has_mpl:
        assert plot.stat().st_size > 1000


def test_gpu_check_dry_run_sets_up_imports(tmp_path):
    """The GPU script's import set-up works without pip, and it exits 0 without CUDA."""
    script = REPO / "bench" / "gpu_check.sh"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OUT": str(tmp_path)}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    proc = subprocess.run(
        ["bash", str(script), "--dry-run", "--imports-only"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ffkern.kernels ->" in proc.stdout
