"""Tests of ffkern.probes: each measure on inputs whose answer is known, and ``ffkern probe``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ffkern import FFConfig, FFNetwork, Trainer, load_dataset
from ffkern.cli import main
from ffkern.probes import (
    class_mean_cosine,
    class_selectivity,
    dead_fraction,
    effective_rank,
    linear_probe,
    linear_probe_accuracy,
    persistence,
    softmax_regression_grad,
    split_length_direction,
)
from ffkern.probes_report import PLOTS


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(autouse=True)
def single_thread():
    """Run each test on one torch thread, then put the thread count back.

    The probes multiply skinny matrices (C = 10 columns); on a loaded 2-core machine the
    intra-op thread pool makes those several times slower, not faster.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -- effective rank and class-mean cosine --------------------------------------------------------


def test_collapsed_representation_has_rank_one_and_cosine_one():
    # Every row points along u, with lengths that differ from row to row (and by class).
    u = torch.rand(37, generator=_gen(0)) + 0.1
    lengths = torch.rand(501, generator=_gen(1)) + 0.5
    x = lengths[:, None] * u
    y = torch.arange(501) % 7
    assert effective_rank(x, centred=True) == pytest.approx(1.0, abs=1e-9)
    assert effective_rank(x, centred=False) == pytest.approx(1.0, abs=1e-9)
    assert class_mean_cosine(x, y, 7) == pytest.approx(1.0, abs=1e-6)


def test_identical_rows_have_no_centred_direction():
    x = torch.rand(1, 13, generator=_gen(2)).repeat(50, 1)
    assert effective_rank(x, centred=True) == 0.0
    assert effective_rank(x, centred=False) == pytest.approx(1.0, abs=1e-9)


def test_orthogonal_class_directions_have_cosine_zero():
    c, d, n = 5, 11, 1000
    y = torch.randint(0, c, (n,), generator=_gen(3))
    scale = torch.rand(n, generator=_gen(4)) + 0.2
    x = torch.zeros(n, d)
    x[torch.arange(n), y] = scale  # class c lives on axis c only
    assert class_mean_cosine(x, y, c) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("d", [7, 40])
def test_isotropic_data_has_rank_near_d(d):
    n = 4001
    x = torch.randn(n, d, generator=_gen(d))
    # The sample covariance of n Gaussian rows has E tr(S²) ≈ d (1 + d / n) for tr S ≈ d, so
    # PR ≈ d / (1 + d / n): 39.6 for d = 40; allow a 4% margin below that, none above d.
    expected = d / (1 + d / n)
    pr = effective_rank(x)
    assert 0.96 * expected < pr <= d


def test_metrics_reject_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        effective_rank(torch.ones(5))
    with pytest.raises(ValueError, match="labels"):
        class_mean_cosine(torch.ones(4, 3), torch.zeros(5, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="at least two classes"):
        class_mean_cosine(torch.ones(4, 3), torch.zeros(4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="shape"):
        persistence(torch.ones(3, 4), torch.ones(4, 3))


# -- persistence ---------------------------------------------------------------------------------


def test_unchanged_weights_have_persistence_one():
    w = torch.randn(33, 127, generator=_gen(5))
    assert torch.allclose(persistence(w, w.clone()), torch.ones(33), atol=1e-6)
    # Scaling a unit's weights does not change its direction.
    assert torch.allclose(persistence(3.0 * w, w), torch.ones(33), atol=1e-6)


def test_independent_weights_have_persistence_near_zero():
    fan_in, units = 2001, 300
    w0 = torch.randn(units, fan_in, generator=_gen(6))
    w1 = torch.randn(units, fan_in, generator=_gen(7))
    cos = persistence(w1, w0)
    # cos of two independent Gaussian vectors is ≈ N(0, 1/fan_in): its mean |.| is
    # √(2/π)/√fan_in, and 300 draws exceed 5 standard deviations with probability ~2e-4.
    sd = 1.0 / math.sqrt(fan_in)
    assert float(cos.abs().max()) < 5 * sd
    assert float(cos.abs().mean()) < 1.2 * math.sqrt(2 / math.pi) * sd


# -- dead units and selectivity ------------------------------------------------------------------


def test_dead_units_counted_exactly():
    h = torch.rand(64, 9, generator=_gen(8)) + 0.01
    h[:, [0, 4, 8]] = 0.0
    h[5, 1] = 0.0  # a unit silent on some rows only is alive
    h[:, 6] = 0.0
    h[63, 6] = 1e-30  # active on one row: alive
    assert dead_fraction(h) == pytest.approx(3 / 9)
    assert dead_fraction(torch.zeros(3, 4)) == 1.0


def test_class_selectivity_of_known_units():
    c, n = 4, 400
    y = torch.arange(n) % c
    h = torch.zeros(n, 3)
    h[:, 0] = (y == 2).float() * 5.0  # responds to class 2 only
    h[:, 1] = 1.5  # the same for every class
    # column 2 silent
    sel = class_selectivity(h, y, c)
    assert torch.allclose(sel, torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)


# -- linear probes -------------------------------------------------------------------------------


def test_softmax_regression_gradient_matches_finite_differences():
    b, k, c = 23, 6, 4
    xt = torch.randn(b, k, generator=_gen(9), dtype=torch.float64)
    y = torch.randint(0, c, (b,), generator=_gen(10))
    onehot = torch.nn.functional.one_hot(y, c).double()
    theta = torch.randn(c, k, generator=_gen(11), dtype=torch.float64)
    decay = torch.full((k,), 0.3, dtype=torch.float64)
    _, grad = softmax_regression_grad(theta, xt, onehot, decay)
    eps = 1e-6
    numeric = torch.zeros_like(theta)
    for i in range(c):
        for j in range(k):
            e = torch.zeros_like(theta)
            e[i, j] = eps
            up, _ = softmax_regression_grad(theta + e, xt, onehot, decay)
            down, _ = softmax_regression_grad(theta - e, xt, onehot, decay)
            numeric[i, j] = (up - down) / (2 * eps)
    assert torch.allclose(grad, numeric, atol=1e-8, rtol=1e-6)


def test_probe_separates_gaussian_blobs():
    c, d, n = 6, 20, 1800
    centres = 3.0 * torch.randn(c, d, generator=_gen(12))
    y = torch.randint(0, c, (n,), generator=_gen(13))
    x = centres[y] + torch.randn(n, d, generator=_gen(14))
    acc = linear_probe_accuracy(x[:1200], y[:1200], x[1200:], y[1200:], c)
    assert acc > 0.97
    probe = linear_probe(x[:1200], y[:1200], c, steps=5)
    assert probe.weight.shape == (c, d)
    with pytest.raises(ValueError, match="features"):
        linear_probe_accuracy(x[:100], y[:100], x[:50, :3], y[:50], c)


def test_label_in_length_only_is_invisible_to_the_direction_probe():
    c, d, n = 4, 16, 800
    u = torch.rand(d, generator=_gen(15)) + 0.1
    y = torch.arange(n) % c  # balanced: exactly n / c rows per class
    h = (1.0 + y.float())[:, None] * u  # one direction; the length is 1, 2, 3 or 4 by class
    length, direction = split_length_direction(h)
    tr, te = slice(0, 600), slice(600, n)
    dir_acc = linear_probe_accuracy(direction[tr], y[tr], direction[te], y[te], c)
    len_acc = linear_probe_accuracy(length[tr, None], y[tr], length[te, None], y[te], c, steps=400)
    assert dir_acc == pytest.approx(1.0 / c)  # identical rows: one class predicted for all
    assert len_acc == 1.0


# -- frozen layers -------------------------------------------------------------------------------


def test_frozen_layer_is_bitwise_unchanged_by_training(digits):
    cfg = FFConfig(
        layers=(24, 24, 24), epochs=1, freeze=(1, 2), train_eval_samples=50, optimizer="adam"
    )
    trainer = Trainer(cfg, digits, backend="reference", device="cpu", progress=False)
    before = [(layer.weight.clone(), layer.bias.clone()) for layer in trainer.network.layers]
    trainer.fit()
    after = trainer.network.layers
    for i in (0, 1):
        assert torch.equal(after[i].weight, before[i][0])
        assert torch.equal(after[i].bias, before[i][1])
    assert not torch.equal(after[2].weight, before[2][0])


# -- the command line ----------------------------------------------------------------------------


def test_cli_writes_report_and_refuses_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "report"
    argv = [
        "probe", "--dataset", "digits", "--layers", "32,32", "--epochs", "2", "--out", str(out),
        "--backend", "reference", "--device", "cpu", "--no-progress",
        "--probe-samples", "400", "--probe-test-samples", "200", "--probe-steps", "40",
    ]  # fmt: skip
    assert main(argv) == 0
    for name in ("report.md", "probes.json", *PLOTS):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert (out / "frozen_layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "probes.json").read_text())
    assert set(data["runs"]) == {"unfrozen", "freeze 1"}  # 1,2 would leave nothing trained
    frozen = data["runs"]["freeze 1"]["persistence"][0]
    assert frozen["frozen"] and frozen["weights_unchanged"] and frozen["mean_persistence"] > 0.999
    assert data["runs"]["unfrozen"]["track"]["epochs"] == [0, 1, 2]
    assert data["timing"]["probe_s"] > 0
    report = (out / "report.md").read_text()
    assert "## 2. Length against direction" in report

    capsys.readouterr()
    stamp = (out / "probes.json").stat().st_mtime_ns
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "probes.json").stat().st_mtime_ns == stamp


def test_cli_probes_a_checkpoint_without_training_it(tmp_path, digits):
    cfg = FFConfig(layers=(20, 20), epochs=1, train_eval_samples=50, optimizer="adam")
    ckpt = tmp_path / "run.pt"
    trainer = Trainer(
        cfg, digits, backend="reference", device="cpu", progress=False, checkpoint_path=ckpt
    )
    trained = trainer.fit().network.layers[1].weight.clone()
    out = tmp_path / "report"
    argv = [
        "probe", "--checkpoint", str(ckpt), "--compare-freeze", "none", "--out", str(out),
        "--backend", "reference", "--device", "cpu", "--no-progress",
        "--probe-samples", "300", "--probe-steps", "30",
    ]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((out / "probes.json").read_text())
    assert data["run_order"] == ["unfrozen"]
    run = data["runs"]["unfrozen"]
    assert not run["trained_here"] and run["epochs"] == 1
    assert run["track"]["epochs"] == [0, 1]
    # Persistence is measured against the initialization the checkpoint's seed reproduces.
    fresh = FFNetwork(cfg, digits.num_features, digits.num_classes).layers[1].weight
    expected = persistence(trained, fresh)
    assert run["persistence"][1]["persistence"] == pytest.approx(expected.tolist(), abs=1e-6)
