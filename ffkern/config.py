"""The configuration of an FF network and its training run, one knob a line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ffkern.optim import OptimConfig
from ffkern.reference import LayerObjective

NEGATIVES = ("hard", "random")
TRAINING = ("simultaneous", "greedy")


@dataclass(frozen=True)
class FFConfig:
    """Everything that defines a supervised Forward-Forward run (Hinton's recipe by default)."""

    # -- network ------------------------------------------------------------------------------
    layers: tuple[int, ...] = (1000, 1000, 1000)  # hidden widths, input to output
    # -- the local objective of every layer ---------------------------------------------------
    goodness: str = "sum"  # "sum" (g = Σ h², θ = units) or "mean" (g = mean h²)
    threshold: float | None = None  # θ; None: number of units ("sum") or 1.0 ("mean")
    temperature: float = 1.0  # T in softplus(∓(g - θ) / T)
    norm: str = "rms"  # length normalization of each layer's input: "rms" or "l2"
    norm_eps: float = 1e-8  # ε in r = 1 / sqrt(mean x² + ε)
    peer_strength: float = 0.03  # peer normalization λ (Hinton: 0.03); 0 turns it off
    peer_momentum: float = 0.9  # running mean of unit activity: m ← ρ m + (1 - ρ) mean h
    objective: str = "logistic"  # "logistic" (Hinton), "reversed" or "symba"
    symba_alpha: float = 4.0  # α of the symba objective
    # -- labels and negative data -------------------------------------------------------------
    label_scale: float = 1.0  # value of the one-hot label pixels written over the first pixels
    negatives: str = "hard"  # "hard": wrong labels drawn ∝ the model's predictions; "random"
    softmax_head: bool = True  # train a linear softmax on a neutral-label pass alongside
    # -- how layers are trained ---------------------------------------------------------------
    training: str = "simultaneous"  # all layers on every minibatch, or "greedy" layer by layer
    freeze: tuple[int, ...] = ()  # 1-based layers kept at their random initialization
    # -- optimization -------------------------------------------------------------------------
    optimizer: str = "sgd"  # "sgd" (momentum) or "adam", both written without torch.optim
    lr: float = 0.01  # base learning rate of the FF layers and the softmax head
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 0.0  # L2 weight decay
    schedule: str = "hinton"  # "hinton": constant for half the epochs, then linear decay
    epochs: int = 60  # epochs (per layer when training greedily)
    batch_size: int = 100  # positive samples per minibatch (as many negatives are made)
    seed: int = 0  # seeds initialization, shuffling and negative sampling
    # -- evaluation ---------------------------------------------------------------------------
    train_eval_samples: int = 10000  # training accuracy is measured on this fixed subset
    eval_batch_size: int = 1000  # images per evaluation chunk (each is scored for every label)
    extra: dict[str, Any] = field(default_factory=dict)  # variant-specific settings

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(w) for w in self.layers))
        object.__setattr__(self, "freeze", tuple(int(i) for i in self.freeze))
        if not self.layers or any(w < 1 for w in self.layers):
            raise ValueError(f"layers must be one or more positive widths, got {self.layers}")
        for i in self.freeze:
            if not 1 <= i <= len(self.layers):
                raise ValueError(
                    f"freeze names layer {i}, but layers are numbered 1..{len(self.layers)}"
                )
        if self.negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {NEGATIVES}, got {self.negatives!r}")
        if self.training not in TRAINING:
            raise ValueError(f"training must be one of {TRAINING}, got {self.training!r}")
        if self.negatives == "hard" and not self.softmax_head:
            raise ValueError(
                "negatives='hard' draws wrong labels from the softmax head's predictions; "
                "enable softmax_head or use negatives='random'"
            )
        for name in ("epochs", "batch_size", "train_eval_samples", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.label_scale <= 0:
            raise ValueError(f"label_scale must be > 0, got {self.label_scale}")
        self.layer_objective()  # validates the objective's fields
        self.optim()  # validates the optimizer's fields

    def layer_objective(self) -> LayerObjective:
        """The local objective every layer optimises."""
        return LayerObjective(
            goodness=self.goodness,
            threshold=self.threshold,
            temperature=self.temperature,
            norm=self.norm,
            norm_eps=self.norm_eps,
            peer_strength=self.peer_strength,
            peer_momentum=self.peer_momentum,
            objective=self.objective,
            symba_alpha=self.symba_alpha,
        )

    def optim(self) -> OptimConfig:
        """The optimizer of the FF layers and the softmax head."""
        return OptimConfig(
            name=self.optimizer,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            schedule=self.schedule,
        )

    @property
    def total_epochs(self) -> int:
        """Epochs of the whole run: ``epochs`` per layer when greedy."""
        return self.epochs * (len(self.layers) if self.training == "greedy" else 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only (lists for tuples), as stored in checkpoints."""
        out = dataclasses.asdict(self)
        out["layers"] = list(self.layers)
        out["freeze"] = list(self.freeze)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FFConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown FFConfig fields {unknown}; known fields: {sorted(known)}")
        data = dict(data)
        for key in ("layers", "freeze"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    def replace(self, **changes: Any) -> FFConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)
