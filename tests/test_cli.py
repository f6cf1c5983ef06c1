"""The ffkern command line: a real run, and bad input that fails with a message naming it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ffkern import Dataset, FFConfig, Trainer
from ffkern.data import write_idx


def ffkern(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ffkern", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def _mnist_folder(folder: Path, n: int = 30, labels: np.ndarray | None = None) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n), ("t10k", n // 3)):
        write_idx(
            folder / f"{split}-images-idx3-ubyte.gz",
            rng.integers(1, 256, (count, 6, 5), dtype=np.uint8),
        )
        lab = labels if labels is not None and split == "train" else rng.integers(0, 10, count)
        write_idx(folder / f"{split}-labels-idx1-ubyte", lab.astype(np.uint8))
    return folder


def test_train_then_eval_a_checkpoint(tmp_path):
    ck, metrics = tmp_path / "run.pt", tmp_path / "m.jsonl"
    run = ffkern(
        "train",
        "--layers",
        "16,16",
        "--epochs",
        "2",
        "--no-progress",
        "--checkpoint",
        str(ck),
        "--metrics",
        str(metrics),
        "--device",
        "cpu",
    )
    assert run.returncode == 0, run.stderr
    assert "epoch   2/2" in run.stderr  # the per-epoch log line
    assert json.loads(run.stdout.strip().splitlines()[-1])["epoch"] == 2
    assert len(metrics.read_text().splitlines()) == 2

    ev = ffkern("eval", str(ck), "--json", "--device", "cpu")
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    assert result["dataset"] == "digits" and 0.0 <= result["test_acc"] <= 1.0
    last = json.loads(metrics.read_text().splitlines()[-1])
    assert result["test_acc"] == pytest.approx(last["test_acc"])

    again = ffkern(
        "train",
        "--layers",
        "16,16",
        "--epochs",
        "3",
        "--no-progress",
        "--checkpoint",
        str(ck),
        "--resume",
        str(ck),
        "--device",
        "cpu",
    )
    assert again.returncode == 0, again.stderr
    assert "epoch   3/3" in again.stderr


def test_mnist_format_folder_trains(tmp_path):
    folder = _mnist_folder(tmp_path / "mnist")
    run = ffkern(
        "train",
        "--dataset",
        "mnist",
        "--data",
        str(folder),
        "--layers",
        "8",
        "--epochs",
        "1",
        "--no-progress",
        "--device",
        "cpu",
    )
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
        (["train", "--layers", "10,abc"], "comma-separated integers"),
        (["train", "--layers", "0", "--epochs", "1"], "positive widths"),
        (["train", "--batch-size", "0"], "batch_size must be a positive integer"),
        (["train", "--dataset", "imagenet"], "invalid choice: 'imagenet'"),
        (["eval", "/nonexistent/run.pt"], "no checkpoint at /nonexistent/run.pt"),
    ],
)
def test_bad_arguments_fail_with_a_message(args, message):
    run = ffkern(*args)
    assert run.returncode == 2
    assert message in run.stderr


def test_missing_dataset_files_are_named(tmp_path):
    run = ffkern("train", "--dataset", "mnist", "--data", str(tmp_path), "--epochs", "1")
    assert run.returncode == 2
    assert "train-images-idx3-ubyte" in run.stderr


def test_labels_out_of_range_are_rejected(tmp_path):
    labels = np.zeros(30, dtype=np.uint8)
    labels[4] = 12
    folder = _mnist_folder(tmp_path / "m", labels=labels)
    run = ffkern("train", "--dataset", "mnist", "--data", str(folder), "--epochs", "1")
    assert run.returncode == 2
    assert "outside the range [0, 10)" in run.stderr


def test_image_and_label_counts_must_agree(tmp_path):
    folder = _mnist_folder(tmp_path / "m")
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros(29, dtype=np.uint8))
    run = ffkern("train", "--dataset", "mnist", "--data", str(folder), "--epochs", "1")
    assert run.returncode == 2
    assert "30" in run.stderr and "29" in run.stderr


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_data_is_rejected_by_the_trainer(bad):
    x = torch.rand(20, 16)
    x[3, 5] = bad
    ds = Dataset(
        "toy", x, torch.arange(20) % 4, torch.rand(8, 16), torch.arange(8) % 4, 4, (1, 4, 4)
    )
    with pytest.raises(ValueError, match="NaN|Inf"):
        Trainer(FFConfig(layers=(8,), epochs=1), ds, backend="reference", progress=False)


def test_labels_outside_the_class_count_are_rejected_by_the_trainer():
    ds = Dataset(
        "toy",
        torch.rand(20, 16),
        torch.arange(20) % 5,
        torch.rand(8, 16),
        torch.arange(8) % 4,
        4,
        (1, 4, 4),
    )
    with pytest.raises(ValueError, match="outside the range"):
        Trainer(FFConfig(layers=(8,), epochs=1), ds, backend="reference", progress=False)
