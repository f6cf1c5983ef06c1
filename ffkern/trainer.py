"""The training loop: shuffle, step every layer, evaluate, log, checkpoint. No autograd.

The network class follows ``config.model`` (:func:`ffkern.model.build_network`) and gets the
dataset's ``(C, H, W)`` image shape, which hybrid negatives and jitter need.

Host-device synchronisation happens once per epoch (reading the accumulated loss and the
accuracies), never per minibatch. Checkpoints are written at the end of an epoch and hold
everything the next epoch depends on, so a resumed run is bitwise the run that was not stopped
(on the CPU, where the matrix products are deterministic).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ffkern import optim
from ffkern.backends import Backend, get_backend
from ffkern.checkpoint import MetricsLog, load_checkpoint, save_checkpoint
from ffkern.config import FFConfig
from ffkern.data import Dataset, validate_arrays
from ffkern.model import FFNetwork, build_network

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for, but CUDA is not available here")
    return device


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns."""

    network: FFNetwork
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Trains an :class:`FFNetwork` on a :class:`Dataset` held on the training device."""

    def __init__(
        self,
        config: FFConfig,
        dataset: Dataset,
        backend: str | Backend = "auto",
        device: str | torch.device | None = None,
        precision: str = "fp32",
        metrics_path: str | os.PathLike[str] | None = None,
        checkpoint_path: str | os.PathLike[str] | None = None,
        progress: bool = True,
        overwrite: bool = False,
    ) -> None:
        self.config = config
        self.device = resolve_device(device)
        for split, x, y in (
            ("train", dataset.x_train, dataset.y_train),
            ("test", dataset.x_test, dataset.y_test),
        ):
            validate_arrays(x, y, dataset.num_classes, f"{dataset.name} {split}")
        self.dataset = dataset.to(self.device)
        self.backend = (
            backend
            if isinstance(backend, Backend)
            else get_backend(backend, self.device, precision)
        )
        self.metrics_path = Path(metrics_path) if metrics_path is not None else None
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.progress = progress
        self.overwrite = overwrite
        self.network: FFNetwork = build_network(
            config,
            dataset.num_features,
            dataset.num_classes,
            device=self.device,
            backend=self.backend,
            image_shape=dataset.image_shape,
        )
        self.epoch = 0  # epochs completed
        self.history: list[dict[str, Any]] = []
        # Training accuracy is measured on a fixed subset so its cost does not grow with N.
        n_eval = min(config.train_eval_samples, dataset.x_train.shape[0])
        pick = torch.randperm(dataset.x_train.shape[0], generator=torch.Generator().manual_seed(0))
        self._train_eval_idx = pick[:n_eval].to(self.device)

    # -- checkpoints ---------------------------------------------------------------------------

    def resume(self, path: str | os.PathLike[str]) -> None:
        """Load a checkpoint of this run; training continues after its last epoch."""
        data = load_checkpoint(path)
        saved = FFConfig.from_dict(data["config"])
        if saved.replace(epochs=self.config.epochs) != self.config:
            raise ValueError(
                f"checkpoint {path} was made with a different configuration; resume with the "
                f"same settings (only --epochs may change). Saved: {saved}"
            )
        if saved.epochs != self.config.epochs:
            log.warning(
                "resuming with epochs=%d instead of the checkpoint's %d: the learning-rate "
                "schedule changes, so the run will differ from one that was never stopped",
                self.config.epochs,
                saved.epochs,
            )
        if data["dataset"] != self.dataset.name:
            raise ValueError(
                f"checkpoint {path} was trained on {data['dataset']!r}, not {self.dataset.name!r}"
            )
        self.network.load_state_dict(data["network"])
        self.epoch = int(data["epoch"])
        self.history = list(data["history"])
        log.info("resumed from %s after epoch %d", path, self.epoch)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a checkpoint of the current state atomically."""
        save_checkpoint(
            path,
            {
                "config": self.config.to_dict(),
                "dataset": self.dataset.name,
                "image_shape": list(self.dataset.image_shape),
                "epoch": self.epoch,
                "network": self.network.state_dict(),
                "history": self.history,
                "backend": self.backend.name,
            },
        )

    # -- the loop ------------------------------------------------------------------------------

    def fit(self, stop_after: int | None = None) -> TrainResult:
        """Train to ``config.total_epochs`` (or stop after epoch ``stop_after``)."""
        self._check_outputs()
        metrics = MetricsLog(self.metrics_path) if self.metrics_path is not None else None
        total = self.config.total_epochs
        last = total if stop_after is None else min(total, stop_after)
        log.info(
            "training %s on %s: %d epochs, batch %d, backend %s, device %s",
            "x".join(map(str, self.config.layers)),
            self.dataset.name,
            total,
            self.config.batch_size,
            self.backend.describe(),
            self.device,
        )
        while self.epoch < last:
            record = self._train_epoch()
            self.history.append(record)
            if self.checkpoint_path is not None:
                self.save(self.checkpoint_path)
            if metrics is not None:
                metrics.append(record)
            log.info(format_epoch(record, total))
        return TrainResult(network=self.network, history=self.history)

    def _check_outputs(self) -> None:
        """Refuse to overwrite a user's files from an unrelated earlier run."""
        if self.overwrite or self.epoch > 0:
            return
        for path, what in ((self.checkpoint_path, "checkpoint"), (self.metrics_path, "metrics")):
            if path is not None and path.exists():
                raise FileExistsError(
                    f"{what} file {path} already exists; pass --resume to continue that run, "
                    "choose another path, or pass --overwrite"
                )

    def _phase(self) -> tuple[int | None, int, int]:
        """(active layer or None, epoch within the phase, epochs in the phase)."""
        if self.config.training == "greedy":
            return (
                self.epoch // self.config.epochs,
                self.epoch % self.config.epochs,
                self.config.epochs,
            )
        return None, self.epoch, self.config.epochs

    def _train_epoch(self) -> dict[str, Any]:
        cfg, ds, net = self.config, self.dataset, self.network
        active, phase_epoch, phase_epochs = self._phase()
        lr = optim.lr_at(net.opt, phase_epoch, phase_epochs)
        n = ds.x_train.shape[0]
        order = torch.randperm(n, generator=net.generator, device=self.device)
        starts = range(0, n, cfg.batch_size)
        loss_sum: torch.Tensor | float = 0.0  # per trained layer (only the active one if greedy)
        steps = 0
        t0 = time.perf_counter()
        for start in _progress(starts, self.progress, f"epoch {self.epoch + 1}"):
            if cfg.unsupervised and n - start < 2:
                continue  # a hybrid needs two images; a final batch of one is skipped
            idx = order[start : start + cfg.batch_size]
            losses = net.train_step(ds.x_train[idx], ds.y_train[idx], lr, active=active)
            loss_sum = loss_sum + losses
            steps += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # deliberate: the epoch's time ends here
        seconds = time.perf_counter() - t0
        layer_losses = (loss_sum / steps).tolist()  # host sync, once per epoch
        self.epoch += 1
        record: dict[str, Any] = {
            "epoch": self.epoch,
            "loss": self._summary_loss(layer_losses, active),
            "layer_losses": layer_losses,
            "lr": lr,
            "seconds": seconds,
            "samples_per_s": n / seconds,
        }
        if active is not None:
            record["active_layer"] = active + 1
        record.update(self.evaluate())
        record["eval_seconds"] = time.perf_counter() - t0 - seconds
        return record

    def _summary_loss(self, layer_losses: list[float], active: int | None) -> float:
        """The epoch's loss: the active layer's when greedy, else the mean over unfrozen layers.

        Frozen layers are left out because their loss is large and cannot improve, which
        would make runs with different frozen layers incomparable.
        """
        if active is not None:
            return float(layer_losses[0])
        layers = self.network.layers
        trained = [v for v, layer in zip(layer_losses, layers, strict=False) if not layer.frozen]
        picked = trained or layer_losses
        return float(sum(picked) / len(picked))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Accuracies of both predictors on the training subset and the test set.

        ``train_acc`` and ``test_acc`` are those of the network's default predictor (goodness,
        or the softmax head for unsupervised FF); ``*_softmax`` are added for the head when it
        is not already the default.
        """
        ds, net = self.dataset, self.network
        xs, ys = ds.x_train[self._train_eval_idx], ds.y_train[self._train_eval_idx]
        out = {
            "train_acc": accuracy(net.predict(xs), ys),
            "test_acc": accuracy(net.predict(ds.x_test), ds.y_test),
        }
        if self.config.softmax_head and net.default_method != "softmax":
            out["train_acc_softmax"] = accuracy(net.predict(xs, "softmax"), ys)
            out["test_acc_softmax"] = accuracy(net.predict(ds.x_test, "softmax"), ds.y_test)
        return out


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of correct predictions (a host sync)."""
    return float((pred == labels).float().mean().item())


def format_epoch(record: dict[str, Any], total: int) -> str:
    """The fixed-format log line of one epoch."""
    line = (
        f"epoch {record['epoch']:>3}/{total}  loss {record['loss']:.4f}  "
        f"train_acc {100 * record['train_acc']:6.2f}%  test_acc {100 * record['test_acc']:6.2f}%"
    )
    if "test_acc_softmax" in record:
        line += f"  softmax {100 * record['test_acc_softmax']:6.2f}%"
    loss_ok = math.isfinite(record["loss"])
    line += f"  {record['samples_per_s']:9.0f} samples/s  {record['seconds']:6.2f} s" + (
        "" if loss_ok else "  (loss is not finite)"
    )
    return line


def _progress(items: range, enabled: bool, desc: str) -> Any:
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="batch", leave=False, disable=None)
