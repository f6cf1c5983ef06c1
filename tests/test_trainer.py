"""Training end to end: accuracy on the bundled digits, exact resume, crash-safe checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ffkern import FFConfig, Trainer, load_dataset
from ffkern import checkpoint as ckpt
from ffkern.checkpoint import load_checkpoint, read_metrics

SMALL = FFConfig(layers=(32, 24), epochs=4, batch_size=100, lr=0.003, seed=7)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _weights(trainer: Trainer) -> list[torch.Tensor]:
    net = trainer.network
    out = []
    for layer in net.layers:
        out += [layer.weight, layer.bias, layer.peer_mean, *layer.opt_state.values()]
    return out + [net.head_weight, net.head_bias, *net.head_state.values()]


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(digits, tmp_path):
    straight = Trainer(SMALL, digits, backend="reference", device="cpu", progress=False)
    straight.fit()

    path = tmp_path / "run.pt"
    first = Trainer(
        SMALL, digits, backend="reference", device="cpu", checkpoint_path=path, progress=False
    )
    first.fit(stop_after=2)
    assert load_checkpoint(path)["epoch"] == 2

    resumed = Trainer(
        SMALL, digits, backend="reference", device="cpu", checkpoint_path=path, progress=False
    )
    resumed.resume(path)
    resumed.fit()
    assert resumed.epoch == straight.epoch == 4
    for a, b in zip(_weights(resumed), _weights(straight), strict=True):
        assert torch.equal(a, b)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    # The run really trained: weights moved from their initialization.
    fresh = Trainer(SMALL, digits, backend="reference", device="cpu", progress=False)
    assert not torch.equal(fresh.network.layers[0].weight, straight.network.layers[0].weight)


def test_a_killed_checkpoint_write_leaves_the_previous_one_readable(digits, tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    trainer = Trainer(
        SMALL, digits, backend="reference", device="cpu", checkpoint_path=path, progress=False
    )
    trainer.fit(stop_after=1)
    before = path.read_bytes()

    def dies_mid_write(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ckpt.torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        trainer.save(path)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]  # no temp file left


def test_corrupt_or_foreign_checkpoints_are_rejected(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable ffkern checkpoint"):
        load_checkpoint(bad)
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not an ffkern checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


def test_existing_outputs_are_never_overwritten_by_a_new_run(digits, tmp_path):
    metrics = tmp_path / "m.jsonl"
    metrics.write_text('{"epoch": 1}\n')
    trainer = Trainer(SMALL, digits, backend="reference", metrics_path=metrics, progress=False)
    with pytest.raises(FileExistsError, match="already exists"):
        trainer.fit()
    assert metrics.read_text() == '{"epoch": 1}\n'


def test_metrics_log_has_one_record_per_epoch(digits, tmp_path):
    metrics = tmp_path / "m.jsonl"
    Trainer(
        SMALL.replace(epochs=2), digits, backend="reference", metrics_path=metrics, progress=False
    ).fit()
    records = read_metrics(metrics)
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("epoch", "loss", "train_acc", "test_acc", "seconds", "samples_per_s"):
        assert all(key in r for r in records)
    assert all(0.0 <= r["test_acc"] <= 1.0 and r["samples_per_s"] > 0 for r in records)


def test_frozen_layer_is_bitwise_unchanged(digits):
    trainer = Trainer(
        SMALL.replace(epochs=1, freeze=(1,)), digits, backend="reference", progress=False
    )
    w0 = trainer.network.layers[0].weight.clone()
    w1 = trainer.network.layers[1].weight.clone()
    trainer.fit()
    assert torch.equal(trainer.network.layers[0].weight, w0)
    assert not torch.equal(trainer.network.layers[1].weight, w1)


def test_greedy_training_trains_one_layer_per_phase(digits):
    cfg = SMALL.replace(epochs=1, training="greedy")
    trainer = Trainer(cfg, digits, backend="reference", progress=False)
    w1 = trainer.network.layers[1].weight.clone()
    trainer.fit(stop_after=1)
    assert torch.equal(trainer.network.layers[1].weight, w1)  # phase 1 trains layer 1 only
    trainer.fit()
    assert not torch.equal(trainer.network.layers[1].weight, w1)
    assert [r["active_layer"] for r in trainer.history] == [1, 2]
    for record in trainer.history:  # the loss is the active layer's, not a mean with zeros
        assert len(record["layer_losses"]) == 1
        assert record["loss"] == record["layer_losses"][0] > 0


def test_end_to_end_digits_accuracy(digits):
    """Hinton's recipe on the bundled digits reaches at least 93% test accuracy.

    The run takes a few seconds on an idle 2-core CPU (timings live in bench/, not in tests).
    """
    cfg = FFConfig(layers=(200, 200), epochs=20, lr=0.003, seed=0)
    history = Trainer(cfg, digits, backend="reference", device="cpu", progress=False).fit().history
    assert history[-1]["test_acc"] >= 0.93, history[-1]
    assert history[-1]["test_acc_softmax"] >= 0.90, history[-1]


def test_checkpoint_is_written_in_the_documented_format(digits, tmp_path):
    path = Path(tmp_path) / "c.pt"
    Trainer(
        SMALL.replace(epochs=1), digits, backend="reference", checkpoint_path=path, progress=False
    ).fit()
    data = load_checkpoint(path)
    assert data["format"] == "ffkern-checkpoint" and data["epoch"] == 1
    assert FFConfig.from_dict(data["config"]) == SMALL.replace(epochs=1)
    assert set(data["network"]) >= {"layers", "head", "generator"}
