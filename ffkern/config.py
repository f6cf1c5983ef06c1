"""The configuration of an FF network and its training run, one knob a line.

Variant settings that only one variant reads live in ``FFConfig.extra`` under a namespaced key,
with the default used when the key is absent (see :data:`EXTRA_SETTINGS`)::

    "hybrid.blur_passes"     int    6    blur passes of the hybrid-negative masks
    "jitter.max_shift"       int    2    largest shift, in pixels, of jitter augmentation
    "recurrent.iterations"   int    8    synchronous iterations per run (training and testing)
    "recurrent.damping"      float  0.3  weight of the old state: s ← d s + (1 - d) relu(z)
    "recurrent.score_first"  int    3    first iteration (1-based) whose goodness is scored
    "recurrent.score_last"   int    5    last iteration (1-based, inclusive) that is scored

A key is accepted only while its variant is selected (``negatives="hybrid"``,
``augment="jitter"``, ``model="recurrent"``), so a setting cannot be silently ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ffkern.optim import OptimConfig
from ffkern.reference import LayerObjective
from ffkern.variants.augment import AUGMENTS

NEGATIVES = ("hard", "random", "hybrid")
TRAINING = ("simultaneous", "greedy")
MODELS = ("feedforward", "recurrent")

# extra key -> (type, default, the variant that reads it: (FFConfig field, value))
EXTRA_SETTINGS: dict[str, tuple[type, int | float, tuple[str, str]]] = {
    "hybrid.blur_passes": (int, 6, ("negatives", "hybrid")),
    "jitter.max_shift": (int, 2, ("augment", "jitter")),
    "recurrent.iterations": (int, 8, ("model", "recurrent")),
    "recurrent.damping": (float, 0.3, ("model", "recurrent")),
    "recurrent.score_first": (int, 3, ("model", "recurrent")),
    "recurrent.score_last": (int, 5, ("model", "recurrent")),
}
_EXTRA_PREFIXES = tuple(sorted({key.split(".")[0] + "." for key in EXTRA_SETTINGS}))


@dataclass(frozen=True)
class RecurrentSettings:
    """The recurrent network's run: ``iterations`` damped updates, goodness scored over
    iterations ``score_first..score_last`` (1-based, inclusive)."""

    iterations: int = 8  # T: synchronous updates after the bottom-up initialization
    damping: float = 0.3  # d in s ← d s + (1 - d) relu(z)
    score_first: int = 3  # first scored iteration (1-based)
    score_last: int = 5  # last scored iteration (1-based, inclusive)

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"recurrent.iterations must be >= 1, got {self.iterations}")
        if not 0.0 <= self.damping < 1.0:
            raise ValueError(f"recurrent.damping must be in [0, 1), got {self.damping}")
        if not 1 <= self.score_first <= self.score_last <= self.iterations:
            raise ValueError(
                "the scored iterations must satisfy 1 <= score_first <= score_last <= "
                f"iterations, got score_first={self.score_first}, score_last={self.score_last}"
                f", iterations={self.iterations}"
            )


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
    negatives: str = "hard"  # "hard": wrong labels ∝ the head's predictions; "random"; or
    # "hybrid": unsupervised FF, negatives are masked mixtures of two images, no label input
    softmax_head: bool = True  # train a linear softmax on a neutral-label pass alongside
    augment: str = "none"  # "jitter": shift each positive image by up to ±2 pixels
    model: str = "feedforward"  # "feedforward" (Hinton §3) or "recurrent" (top-down, §4)
    # -- how layers are trained ---------------------------------------------------------------
    training: str = "simultaneous"  # all layers on every minibatch, or "greedy" layer by layer
    freeze: tuple[int, ...] = ()  # 1-based layers kept at their random initialization
    # -- optimization -------------------------------------------------------------------------
    optimizer: str = "sgd"  # "sgd" (momentum) or "adam", both written without torch.optim
    lr: float = 0.001  # base learning rate of the FF layers and the softmax head (SGD)
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
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {self.augment!r}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.negatives == "hybrid" and not self.softmax_head:
            raise ValueError(
                "negatives='hybrid' trains without labels, so the softmax head is its only "
                "predictor; enable softmax_head"
            )
        if self.model == "recurrent" and self.negatives == "hybrid":
            raise ValueError(
                "model='recurrent' feeds the label in at the top; it needs labelled negatives "
                "('hard' or 'random'), got negatives='hybrid'"
            )
        if self.model == "recurrent" and self.training != "simultaneous":
            raise ValueError(
                "model='recurrent' trains every layer at every iteration; it needs "
                f"training='simultaneous', got {self.training!r}"
            )
        self._check_extra()
        for name in ("epochs", "batch_size", "train_eval_samples", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.label_scale <= 0:
            raise ValueError(f"label_scale must be > 0, got {self.label_scale}")
        self.layer_objective()  # validates the objective's fields
        self.optim()  # validates the optimizer's fields

    def _check_extra(self) -> None:
        for key, value in self.extra.items():
            if not key.startswith(_EXTRA_PREFIXES):
                continue  # not a variant setting of this module
            if key not in EXTRA_SETTINGS:
                known = sorted(k for k in EXTRA_SETTINGS if k.startswith(key.split(".")[0]))
                raise ValueError(f"unknown variant setting {key!r} in extra; known: {known}")
            kind, _, (field_name, needed) = EXTRA_SETTINGS[key]
            if getattr(self, field_name) != needed:
                raise ValueError(
                    f"extra[{key!r}] applies only with {field_name}={needed!r}, but "
                    f"{field_name}={getattr(self, field_name)!r}"
                )
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or (kind is int and not isinstance(value, int)):
                raise ValueError(
                    f"extra[{key!r}] must be {kind.__name__}, got {value!r} "
                    f"({type(value).__name__})"
                )
        if self.blur_passes < 0:
            raise ValueError(f"hybrid.blur_passes must be >= 0, got {self.blur_passes}")
        if self.max_shift < 0:
            raise ValueError(f"jitter.max_shift must be >= 0, got {self.max_shift}")
        self.recurrent()  # validates the recurrent settings

    def setting(self, key: str) -> int | float:
        """The variant setting ``key`` of :data:`EXTRA_SETTINGS`: ``extra[key]`` or its default."""
        if key not in EXTRA_SETTINGS:
            raise KeyError(f"unknown variant setting {key!r}; known: {sorted(EXTRA_SETTINGS)}")
        kind, default, _ = EXTRA_SETTINGS[key]
        return kind(self.extra.get(key, default))

    @property
    def unsupervised(self) -> bool:
        """True for hybrid negatives: no label in the input, prediction by the softmax head."""
        return self.negatives == "hybrid"

    @property
    def blur_passes(self) -> int:
        """Blur passes of the hybrid-negative masks (``extra["hybrid.blur_passes"]``)."""
        return int(self.setting("hybrid.blur_passes"))

    @property
    def max_shift(self) -> int:
        """Largest jitter shift in pixels (``extra["jitter.max_shift"]``)."""
        return int(self.setting("jitter.max_shift"))

    def recurrent(self) -> RecurrentSettings:
        """The recurrent network's settings (``extra["recurrent.*"]``)."""
        return RecurrentSettings(
            iterations=int(self.setting("recurrent.iterations")),
            damping=float(self.setting("recurrent.damping")),
            score_first=int(self.setting("recurrent.score_first")),
            score_last=int(self.setting("recurrent.score_last")),
        )

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
