"""The FF variants: objectives against autograd, hybrid masks, jitter, and end-to-end runs.

Autograd appears here only as an oracle. Gradient checks run in float64 with fresh random
inputs and a threshold near the typical goodness, so both sides of every softplus are used.
"""

from __future__ import annotations

import json
import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from oracles import GRAD_RTOL, oracle_loss, oracle_peer, rel_err

from ffkern import FFConfig, FFNetwork, Trainer, get_backend, load_dataset, reference
from ffkern.cli import main
from ffkern.data import write_idx
from ffkern.reference import LayerObjective
from ffkern.variants import augment, hybrid


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests run many tiny matrix products, which torch's thread pool only slows down
    (100x on a busy 2-core machine); the previous setting is restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


SHAPES = [(2, 5, 3), (14, 33, 17), (130, 10, 64)]  # (N rows, K in, D out); N even for symba


def typical_threshold(x, w, b, goodness):
    """θ at the median goodness of the random layer, so rows fall on both sides of it."""
    h = torch.relu(x @ w.t() + b)
    g = (h * h).sum(1) if goodness == "sum" else (h * h).mean(1)
    return float(g.median())


# ------------------------------------------------------------------------------------------------
# Objectives: symba and reversed, both goodness forms, against autograd
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("objective", ["reversed", "symba"])
@pytest.mark.parametrize("goodness", ["sum", "mean"])
@pytest.mark.parametrize("peer", [0.0, 0.03])
def test_objective_gradients_match_autograd(shape, objective, goodness, peer):
    n, k, d = shape
    gen = torch.Generator().manual_seed(
        zlib.crc32(repr((shape, objective, goodness, peer)).encode())
    )
    dt = torch.float64
    x = torch.randn(n, k, generator=gen, dtype=dt)
    w = torch.randn(d, k, generator=gen, dtype=dt) / k**0.5
    # A positive bias keeps most units alive even with 2 rows and 3 units (no zero fixture).
    b = 0.5 + 0.1 * torch.randn(d, generator=gen, dtype=dt)
    peer_mean = torch.rand(d, generator=gen, dtype=dt)
    scale = reference.norm_scale(x, "rms", 1e-8)
    theta = typical_threshold(x * scale[:, None], w, b, goodness)
    # α = 1.5 keeps symba's pairs away from saturation at these goodness scales.
    obj = LayerObjective(
        goodness=goodness,
        threshold=theta,
        temperature=0.7,
        peer_strength=peer,
        objective=objective,
        symba_alpha=1.5 if goodness == "sum" else 4.0,
    )
    n_pos = n // 2

    res = reference.layer_step(w, b, x, scale, n_pos, obj, peer_mean)

    wa, ba = w.clone().requires_grad_(), b.clone().requires_grad_()
    z = (x * scale[:, None]) @ wa.t() + ba
    z.retain_grad()
    h = torch.relu(z)
    loss = oracle_loss(h, n_pos, obj)
    (loss + oracle_peer(h, n_pos, obj, peer_mean)[0]).backward()
    assert rel_err(res.loss, loss.detach()) <= 1e-12
    assert res.dw.abs().max() > 1e-8, "degenerate fixture: no gradient"
    assert rel_err(res.dz, z.grad) <= GRAD_RTOL
    assert rel_err(res.dw, wa.grad) <= GRAD_RTOL
    assert rel_err(res.db, ba.grad) <= GRAD_RTOL


def test_objective_coefficient_signs():
    """reversed pushes positives down and negatives up; symba pairs them with opposite signs."""
    gen = torch.Generator().manual_seed(3)
    g = torch.rand(12, generator=gen, dtype=torch.float64) * 20
    _, c_rev = reference.loss_and_coef(g, 6, LayerObjective(objective="reversed"), 10)
    assert (c_rev[:6] > 0).all() and (c_rev[6:] < 0).all()
    _, c_sym = reference.loss_and_coef(g, 6, LayerObjective(objective="symba"), 10)
    assert (c_sym[:6] < 0).all() and torch.equal(c_sym[6:], -c_sym[:6])
    with pytest.raises(ValueError, match="as many negatives as positives"):
        reference.loss_and_coef(g, 5, LayerObjective(objective="symba"), 10)


def net_with_scores(objective: str, scores: torch.Tensor) -> FFNetwork:
    net = FFNetwork(FFConfig(layers=(8, 8), objective=objective), 16, 4)
    net.goodness_scores = lambda x: scores[: x.shape[0]]  # type: ignore[method-assign]
    return net


def test_reversed_predicts_the_lowest_goodness():
    scores = torch.tensor([[3.0, 1.0, 2.0, 5.0], [0.5, 4.0, 0.1, 2.0]])
    x = torch.rand(2, 16)
    assert net_with_scores("reversed", scores).predict(x).tolist() == [1, 2]
    assert net_with_scores("logistic", scores).predict(x).tolist() == [3, 1]
    assert net_with_scores("symba", scores).predict(x).tolist() == [3, 1]


# ------------------------------------------------------------------------------------------------
# Hybrid negatives
# ------------------------------------------------------------------------------------------------


def blur_oracle(bits: np.ndarray, passes: int) -> np.ndarray:
    """Straightforward blur: loops over pixels, edge pixels repeated, float64."""
    m = bits.astype(np.float64)
    taps = (0.25, 0.5, 0.25)
    for _ in range(passes):
        for axis in (2, 1):  # along each row (columns mix), then along each column
            out = np.zeros_like(m)
            size = m.shape[axis]
            for i in range(size):
                for off, tap in zip((-1, 0, 1), taps, strict=True):
                    j = min(max(i + off, 0), size - 1)
                    src = m[:, :, j] if axis == 2 else m[:, j, :]
                    if axis == 2:
                        out[:, :, i] += tap * src
                    else:
                        out[:, i, :] += tap * src
            m = out
    return m


@pytest.mark.parametrize(("h", "w"), [(8, 8), (7, 13), (28, 28), (1, 5)])
@pytest.mark.parametrize("passes", [0, 1, 6])
def test_blur_matches_straightforward_implementation(h, w, passes):
    gen = torch.Generator().manual_seed(h * 100 + w + passes)
    bits = torch.randint(0, 2, (5, h, w), generator=gen)
    ours = hybrid.blur_masks(bits.float(), passes)
    expected = blur_oracle(bits.numpy(), passes)
    # Up to 6 passes every value is a multiple of 2^-24: float32 holds it exactly.
    np.testing.assert_array_equal(ours.numpy().astype(np.float64), expected)
    np.testing.assert_array_equal((ours > 0.5).numpy(), expected > 0.5)


def test_masks_are_thresholded_blurred_random_bits():
    gen = torch.Generator().manual_seed(11)
    state = gen.get_state()
    masks = hybrid.make_masks(40, 28, 28, 6, gen, "cpu")
    gen.set_state(state)
    bits = torch.randint(0, 2, (40, 28, 28), generator=gen)
    assert masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    expected = blur_oracle(bits.numpy(), 6) > 0.5
    assert not (expected.all(axis=(1, 2)) | ~expected.any(axis=(1, 2))).any()
    np.testing.assert_array_equal(masks.numpy(), expected)
    # Large regions: after 6 passes most pixels agree with their right-hand neighbour, unlike
    # the raw bits (about half).
    same = (masks[:, :, 1:] == masks[:, :, :-1]).float().mean()
    assert same > 0.85
    assert 0.3 < masks.mean() < 0.7


@pytest.mark.parametrize(("h", "w"), [(6, 5), (1, 4), (3, 1)])
def test_constant_masks_are_replaced_by_a_split(h, w):
    gen = torch.Generator().manual_seed(8)
    state = gen.get_state()
    masks = hybrid.make_masks(500, h, w, 6, gen, "cpu")
    gen.set_state(state)
    bits = torch.randint(0, 2, (500, h, w), generator=gen)
    thresholded = torch.from_numpy(blur_oracle(bits.numpy(), 6) > 0.5).float()
    flat = masks.flatten(1)
    assert ((flat.sum(1) > 0) & (flat.sum(1) < h * w)).all(), "a mask has only one value"
    replaced = (thresholded.flatten(1).sum(1) % (h * w)) == 0
    assert replaced.any()
    assert torch.equal(masks[~replaced], thresholded[~replaced])
    # A replacement keeps the first columns (rows when W = 1) and drops the rest.
    for m in masks[replaced]:
        line = m[0] if w > 1 else m[:, 0]
        cut = int(line.sum())
        assert torch.equal(line, (torch.arange(line.numel()) < cut).float())
        assert (m == (m[:1] if w > 1 else m[:, :1])).all()
    with pytest.raises(ValueError, match="at least two pixels"):
        hybrid.make_masks(3, 1, 1, 6, gen, "cpu")


def test_cyclic_partners_never_pair_an_image_with_itself():
    gen = torch.Generator().manual_seed(5)
    for b in (2, 3, 7, 100):
        for _ in range(20):
            p = hybrid.cyclic_partners(b, gen, torch.device("cpu"))
            assert sorted(p.tolist()) == list(range(b))
            assert (p != torch.arange(b)).all()
    with pytest.raises(ValueError, match="batch must be >= 2, got 1"):
        hybrid.cyclic_partners(1, gen, torch.device("cpu"))


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 6, 5)])
def test_hybrids_mix_two_different_images_under_one_mask(shape):
    c, h, w = shape
    b = 9
    # Pixel value = image index * 1000 + pixel index, so each value names its source image.
    x = (torch.arange(b)[:, None] * 1000 + torch.arange(c * h * w)[None, :]).float()
    gen = torch.Generator().manual_seed(2)
    mixed = hybrid.make_hybrids(x, shape, 6, gen).reshape(b, c, h, w)
    source = torch.div(mixed, 1000, rounding_mode="floor").long()
    pixel = (mixed - 1000 * source).long()
    assert torch.equal(pixel, torch.arange(c * h * w).reshape(1, c, h, w).expand(b, -1, -1, -1))
    for i in range(b):
        used = set(source[i].unique().tolist())
        assert len(used) == 2 and i in used, f"hybrid {i} is made of images {used}"
        # One mask for all channels.
        mask = source[i] == i
        assert (mask == mask[:1]).all()


def test_hybrids_of_real_images_contain_both():
    ds = load_dataset("digits")
    gen = torch.Generator().manual_seed(0)
    x = ds.x_train[:200]
    neg = hybrid.make_hybrids(x, ds.image_shape, 6, gen)
    assert neg.shape == x.shape
    assert not torch.equal(neg, x)
    with pytest.raises(ValueError, match=r"x must be \(B, 64\)"):
        hybrid.make_hybrids(x[:, :10], ds.image_shape, 6, gen)


# ------------------------------------------------------------------------------------------------
# Jitter
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dy", "dx"), [(0, 0), (1, 2), (-2, 1), (2, -2), (-1, -1), (3, 0), (0, -9)]
)
def test_shift_moves_one_bright_pixel(dy, dx):
    c, h, w = 3, 6, 7
    x = torch.zeros(1, c * h * w)
    img = x.view(1, c, h, w)
    img[0, 1, 2, 3] = 5.0
    out = augment.shift_images(x, (c, h, w), torch.tensor([dy]), torch.tensor([dx]))
    out = out.view(c, h, w)
    r, k = 2 + dy, 3 + dx
    if 0 <= r < h and 0 <= k < w:
        assert out[1, r, k] == 5.0
        assert out.count_nonzero() == 1
    else:
        assert out.count_nonzero() == 0, "a pixel shifted out of the frame must vanish"
    assert x.view(c, h, w)[1, 2, 3] == 5.0, "the input was modified"


def test_shift_zero_fills_and_moves_every_channel():
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(4, 2 * 5 * 5, generator=gen) + 0.5  # no zeros, so zero fill shows
    dy, dx = torch.tensor([1, -2, 0, 2]), torch.tensor([0, 1, -1, 2])
    out = augment.shift_images(x, (2, 5, 5), dy, dx).view(4, 2, 5, 5)
    img = x.view(4, 2, 5, 5)
    for i in range(4):
        expected = torch.zeros(2, 5, 5)
        for r in range(5):
            for k in range(5):
                sr, sk = r - int(dy[i]), k - int(dx[i])
                if 0 <= sr < 5 and 0 <= sk < 5:
                    expected[:, r, k] = img[i, :, sr, sk]
        assert torch.equal(out[i], expected)


def test_jitter_offsets_cover_the_range_and_stay_within_it():
    n, s = 400, 2
    x = torch.zeros(n, 81)
    x.view(n, 9, 9)[:, 4, 4] = 1.0
    out = augment.jitter(x, (1, 9, 9), s, torch.Generator().manual_seed(0)).view(n, 9, 9)
    assert (out.sum(dim=(1, 2)) == 1).all()
    pos = out.flatten(1).argmax(1)
    offsets = {(int(p) // 9 - 4, int(p) % 9 - 4) for p in pos}
    assert offsets == {(a, b) for a in range(-s, s + 1) for b in range(-s, s + 1)}


def test_jitter_is_applied_before_the_label_is_written(monkeypatch):
    cfg = FFConfig(layers=(8,), augment="jitter", negatives="random", softmax_head=False)
    net = FFNetwork(cfg, 64, 10, image_shape=(1, 8, 8))
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(6, 64, generator=gen) + 0.1
    labels = torch.tensor([0, 3, 9, 5, 5, 1])
    seen = {}
    monkeypatch.setattr(net, "train_layers", lambda batch, n_pos, *a, **k: seen.update(batch=batch))
    state = net.generator.get_state()
    net.train_step(x, labels, 0.01)
    net.generator.set_state(state)
    shifted = augment.jitter(x, (1, 8, 8), 2, net.generator)
    assert not torch.equal(shifted, x)
    pos, neg = seen["batch"][:6], seen["batch"][6:]
    assert torch.equal(pos[:, :10], torch.eye(10)[labels]), "label pixels moved or changed"
    assert torch.equal(pos[:, 10:], shifted[:, 10:])
    assert torch.equal(neg[:, 10:], shifted[:, 10:])
    assert (neg[:, :10].argmax(1) != labels).all()


# ------------------------------------------------------------------------------------------------
# The unsupervised network
# ------------------------------------------------------------------------------------------------


def test_unsupervised_network_writes_no_label_and_uses_the_last_three_layers(monkeypatch):
    cfg = FFConfig(layers=(8, 7, 6, 5, 4), negatives="hybrid")
    net = FFNetwork(cfg, 64, 10, image_shape=(1, 8, 8))
    assert list(net.scored_layers) == [2, 3, 4]
    assert net.head_weight.shape == (10, 6 + 5 + 4)
    assert net.default_method == "softmax"
    small = FFNetwork(cfg.replace(layers=(8, 7)), 64, 10)
    assert list(small.scored_layers) == [0, 1]
    x = torch.rand(5, 64) + 0.1
    assert net.embed(x, None) is x
    with pytest.raises(ValueError, match="has no label input"):
        net.embed(x, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="no label input to score"):
        net.predict(x, "goodness")
    seen = {}
    monkeypatch.setattr(
        net, "train_layers", lambda batch, n_pos, *a, **k: seen.update(batch=batch, n=n_pos)
    )
    net.train_step(x, torch.arange(5), 0.01)
    assert seen["n"] == 5 and torch.equal(seen["batch"][:5], x)
    assert not torch.equal(seen["batch"][5:], x)


def test_unsupervised_head_gradient_does_not_reach_the_layers():
    cfg = FFConfig(layers=(16, 16), negatives="hybrid")
    net = FFNetwork(cfg, 64, 10)
    before = [layer.weight.clone() for layer in net.layers]
    x = torch.rand(10, 64) + 0.1
    net._train_head(x, torch.arange(10), 0.1, None)
    assert all(torch.equal(a, layer.weight) for a, layer in zip(before, net.layers, strict=True))
    assert net.head_weight.abs().sum() > 0


def test_config_validation():
    with pytest.raises(ValueError, match="softmax head is its only predictor"):
        FFConfig(negatives="hybrid", softmax_head=False)
    with pytest.raises(ValueError, match="applies only with negatives='hybrid'"):
        FFConfig(extra={"hybrid.blur_passes": 2})
    with pytest.raises(ValueError, match="unknown variant setting 'jitter.shift'"):
        FFConfig(augment="jitter", extra={"jitter.shift": 2})
    with pytest.raises(ValueError, match="must be int"):
        FFConfig(augment="jitter", extra={"jitter.max_shift": 1.5})
    with pytest.raises(ValueError, match="augment must be one of"):
        FFConfig(augment="flip")
    with pytest.raises(ValueError, match="training='simultaneous'"):
        FFConfig(model="recurrent", training="greedy")
    with pytest.raises(ValueError, match="needs labelled negatives"):
        FFConfig(model="recurrent", negatives="hybrid")
    with pytest.raises(ValueError, match="score_first <= score_last <= iterations"):
        FFConfig(model="recurrent", extra={"recurrent.score_last": 9})
    with pytest.raises(ValueError, match="use ffkern.model.build_network"):
        FFNetwork(FFConfig(model="recurrent"), 64, 10)
    cfg = FFConfig(negatives="hybrid", augment="jitter", extra={"jitter.max_shift": 1})
    assert (cfg.blur_passes, cfg.max_shift) == (6, 1)
    assert FFConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="pass image_shape"):
        FFNetwork(cfg, 60, 10).train_step(torch.rand(4, 60), torch.arange(4), 0.01)


def test_resume_is_bitwise_for_hybrid_with_jitter(tmp_path):
    ds = load_dataset("digits")
    cfg = FFConfig(
        layers=(16, 16), epochs=2, negatives="hybrid", augment="jitter", train_eval_samples=50
    )
    whole = Trainer(cfg, ds, backend="reference", progress=False).fit().network
    first = Trainer(cfg, ds, backend="reference", progress=False, checkpoint_path=tmp_path / "c.pt")
    first.fit(stop_after=1)
    again = Trainer(cfg, ds, backend="reference", progress=False)
    again.resume(tmp_path / "c.pt")
    resumed = again.fit().network
    for a, b in zip(whole.layers, resumed.layers, strict=True):
        assert torch.equal(a.weight, b.weight)
    assert torch.equal(whole.head_weight, resumed.head_weight)


# ------------------------------------------------------------------------------------------------
# The triton backend (Triton's interpreter on the CPU) against the reference, network level
# ------------------------------------------------------------------------------------------------


def triton_backend_or_skip():
    try:
        return get_backend("triton", "cpu")
    except (ImportError, ValueError) as exc:  # no triton, or the interpreter is off
        pytest.skip(f"the triton backend cannot run here: {exc}")


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
@pytest.mark.parametrize(
    "changes",
    [
        {"objective": "symba"},
        {"objective": "reversed", "goodness": "mean"},
        {"objective": "reversed", "negatives": "hybrid", "augment": "jitter"},
    ],
    ids=["symba", "reversed-mean", "reversed-hybrid-jitter"],
)
def test_triton_matches_reference_for_the_variants(changes):
    backend = triton_backend_or_skip()
    cfg = FFConfig(layers=(16, 12), optimizer="adam", lr=0.01, **changes)
    nets = [
        FFNetwork(cfg, 64, 10, backend=b, image_shape=(1, 8, 8))
        for b in (get_backend("reference", "cpu"), backend)
    ]
    ds = load_dataset("digits")
    for step in range(2):
        x, y = ds.x_train[20 * step : 20 * step + 20], ds.y_train[20 * step : 20 * step + 20]
        ref_loss, tri_loss = (net.train_step(x, y, 0.01) for net in nets)
        torch.testing.assert_close(tri_loss, ref_loss, atol=2e-5, rtol=1e-4)
    for a, b in zip(nets[0].layers, nets[1].layers, strict=True):
        # float32 on both sides, differing only in summation order (see test_triton_backend).
        torch.testing.assert_close(b.weight, a.weight, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(b.bias, a.bias, atol=2e-5, rtol=1e-4)
    x = ds.x_test[:30]
    torch.testing.assert_close(nets[1].features(x), nets[0].features(x), atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# End to end through the CLI: digits, and small fake Fashion-MNIST and CIFAR-10 files
# ------------------------------------------------------------------------------------------------

VARIANTS = {
    "hybrid": ["--negatives", "hybrid"],
    "hybrid-symba-jitter": ["--negatives", "hybrid", "--objective", "symba", "--augment", "jitter"],
    "symba-sum": ["--objective", "symba"],
    "symba-mean": ["--objective", "symba", "--goodness", "mean", "--symba-alpha", "2"],
    "reversed-sum": ["--objective", "reversed"],
    "reversed-mean": ["--objective", "reversed", "--goodness", "mean"],
    "jitter": ["--augment", "jitter", "--max-shift", "1"],
    "recurrent": ["--model", "recurrent", "--iterations", "6", "--score-to", "4"],
    "recurrent-jitter-reversed": [
        "--model", "recurrent", "--augment", "jitter", "--objective", "reversed",
        "--negatives", "random", "--iterations", "5",
    ],
}  # fmt: skip


def run_cli(tmp_path: Path, *args: str) -> tuple[dict, list[dict]]:
    metrics = tmp_path / "metrics.jsonl"
    argv = ["--log-level", "WARNING", "train", "--layers", "32,32", "--epochs", "2"]
    argv += ["--no-progress", "--metrics", str(metrics), "--overwrite", *args]
    assert main(argv) == 0
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return records[-1], records


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cli_variants_on_digits(tmp_path, capsys, variant):
    last, records = run_cli(tmp_path, *VARIANTS[variant])
    assert len(records) == 2
    assert all(np.isfinite(r["loss"]) for r in records)
    assert 0.0 <= last["test_acc"] <= 1.0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["epoch"] == 2
    if variant.startswith("hybrid"):
        assert "test_acc_softmax" not in last  # the head is the default predictor
    else:
        assert "test_acc_softmax" in last


def test_hybrid_learns_on_digits(tmp_path):
    """Guard that unsupervised FF is not a no-op: the head on its features beats chance."""
    last, _ = run_cli(tmp_path, "--negatives", "hybrid", "--optimizer", "adam", "--lr", "0.003")
    # Chance is 10%; seeds 0-2 reach 76-80% here.
    assert last["test_acc"] > 0.4


def test_cli_rejects_a_setting_for_another_variant(tmp_path, capsys):
    argv = ["train", "--layers", "8", "--epochs", "1", "--blur-passes", "3", "--no-progress"]
    assert main(argv) == 2
    assert "applies only with negatives='hybrid'" in capsys.readouterr().err


def write_fake_fashion(folder: Path, n_train: int = 40, n_test: int = 20) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    names = {
        "train-images-idx3-ubyte": rng.integers(1, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(1, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in names.items():
        write_idx(folder / name, array)


def write_fake_cifar(folder: Path, per_batch: int = 6) -> None:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(1, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))


@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar10"])
@pytest.mark.parametrize("variant", ["hybrid", "symba-sum", "jitter", "recurrent"])
def test_cli_variants_on_fake_files(tmp_path, dataset, variant):
    folder = tmp_path / dataset
    (write_fake_fashion if dataset == "fashion-mnist" else write_fake_cifar)(folder)
    args = [*VARIANTS[variant], "--dataset", dataset, "--data", str(folder)]
    last, _ = run_cli(tmp_path, *args, "--batch-size", "10", "--train-eval-samples", "20")
    assert np.isfinite(last["loss"]) and 0.0 <= last["test_acc"] <= 1.0


def test_masks_and_jitter_use_the_image_shape_of_cifar():
    x = torch.rand(4, 3 * 32 * 32) + 0.1
    gen = torch.Generator().manual_seed(0)
    neg = hybrid.make_hybrids(x, (3, 32, 32), 6, gen).view(4, 3, 32, 32)
    from_a = neg == x.view(4, 3, 32, 32)
    assert (from_a == from_a[:, :1]).all(), "the mask must be shared across channels"
    dy, dx = torch.tensor([1, 0, -1, 2]), torch.tensor([0, 2, 0, -2])
    out = augment.shift_images(x, (3, 32, 32), dy, dx).view(4, 3, 32, 32)
    assert torch.equal(out[0, :, 1:, :], x.view(4, 3, 32, 32)[0, :, :-1, :])
    assert (out[0, :, 0, :] == 0).all()
