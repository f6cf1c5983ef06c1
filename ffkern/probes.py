r"""Probes of what a Forward-Forward network keeps: in its lengths, its directions, its units.

An FF layer hands the next layer only the *direction* of its activity ``h`` (the normalized
output ``ĥ = r' ⊙ h``); the *length* goes into the goodness ``g = Σ_j h_j²`` (or its mean) and
is what the layer is trained on. This module measures, layer by layer, where the label
information sits, and how much of the random initialization survives training.

Every measure is a plain function of tensors, on whatever device they live, with no autograd
and no per-sample Python loop:

- :func:`linear_probe` / :func:`linear_probe_accuracy`: a multinomial logistic regression on
  standardized features. With ``X̃`` the standardized features plus a column of ones, ``Θ`` the
  (C, K + 1) weights and ``Y`` the one-hot labels of ``B`` rows::

      P  = softmax(X̃ Θᵀ)                        (B, C) class probabilities
      J  = -(1/B) Σ_i log P_{i, y_i} + (λ/2) ‖W‖²   (λ: L2, not applied to the bias column)
      ∇J = (P - Y)ᵀ X̃ / B + λ [W, 0]               closed form, no autograd

  minimized by Nesterov's accelerated gradient with step ``1/L`` for a fixed number of steps.
  ``L = ½ σ_max(X̃)² / B + λ`` bounds the curvature: the Hessian of the cross-entropy with
  respect to one row's logits, ``diag(p) - p pᵀ``, has no eigenvalue above ½.
- :func:`effective_rank`: the participation ratio ``PR = (Σ_k λ_k)² / Σ_k λ_k²`` of the
  eigenvalues ``λ`` of the covariance (``centred=True``) or the uncentred second moment of the
  rows. ``Σ λ = tr S`` and ``Σ λ² = ‖S‖_F²``, so no eigendecomposition is needed. PR is 1 for a
  representation spread along one direction and ``d`` for an isotropic one in ``d`` dimensions.
- :func:`class_mean_cosine`: the mean over ordered pairs ``a ≠ b`` of classes of
  ``cos(μ_a, μ_b)``, with ``μ_c`` the mean row of class ``c``. 1 when every class points the
  same way; 0 for orthogonal class directions. Rows of ReLU outputs are non-negative, so the
  uncentred value is positive even for a useful representation: compare it with the random
  initial network's, not with 0.
- :func:`dead_fraction`: the share of units that are zero on every row.
- :func:`persistence`: per unit, ``cos(w_j, w_j⁰)`` between its weight vector now and at
  initialization. Two independent Gaussian vectors of fan-in ``K`` have a cosine of mean 0 and
  standard deviation ``1/√K``.
- :func:`class_selectivity`: per unit, ``(μ_max - μ_rest) / (μ_max + μ_rest)`` with ``μ_max``
  the largest class mean of the unit's activity and ``μ_rest`` the mean of the other class
  means; 0 for a unit that responds equally to every class (or never), 1 for one that responds
  to a single class only.

:func:`run_probes` puts them together: it trains the configured network (or takes a trained
one), the same run with chosen layers frozen at their initialization, probes every layer after
every epoch, and returns one JSON-ready dictionary that :mod:`ffkern.probes_report` turns into
``report.md``, ``probes.json`` and PNG plots. ``ffkern probe`` is its command line.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ffkern.config import FFConfig
from ffkern.data import Dataset
from ffkern.model import FFNetwork, build_network
from ffkern.trainer import Trainer, format_epoch

log = logging.getLogger(__name__)

__all__ = [
    "LayerView",
    "ProbeSettings",
    "class_mean_cosine",
    "class_selectivity",
    "dead_fraction",
    "effective_rank",
    "layer_views",
    "linear_probe",
    "linear_probe_accuracy",
    "persistence",
    "run_probes",
    "softmax_regression_grad",
    "split_length_direction",
]

FORMAT = "ffkern-probes"
VERSION = 1


# ------------------------------------------------------------------------------------------------
# Metrics on tensors
# ------------------------------------------------------------------------------------------------


def _check_rows(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must be a non-empty 2-D (rows, features) tensor, got {x.shape}")


def _check_labels(y: torch.Tensor, n: int, num_classes: int, name: str) -> None:
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D tensor of {n} labels, got shape {tuple(y.shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")


@dataclass(frozen=True)
class LinearProbe:
    """A fitted multinomial logistic regression on standardized features."""

    mean: torch.Tensor  # (K,) feature means of the fitting rows
    std: torch.Tensor  # (K,) feature standard deviations (1 where a feature is constant)
    weight: torch.Tensor  # (C, K) weights on the standardized features
    bias: torch.Tensor  # (C,)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) logits of rows ``x`` (N, K)."""
        return torch.addmm(self.bias, (x.float() - self.mean) / self.std, self.weight.t())

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) predicted classes."""
        return self.logits(x).argmax(dim=1)


def linear_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    steps: int = 100,
    l2: float = 1e-3,
) -> LinearProbe:
    """Fit a softmax regression to rows ``x`` (B, K) with labels ``y`` (B,), full batch.

    Features are standardized first (an affine map, so it changes what the L2 penalty and a
    fixed step budget favour, not what the model can express). Then ``steps`` iterations of
    Nesterov's method with step ``1/L`` on the objective of the module docstring.
    """
    _check_rows(x, "x")
    _check_labels(y, x.shape[0], num_classes, "y")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    x = x.float()
    b, k = x.shape
    mean = x.mean(dim=0)
    std = x.std(dim=0, correction=0)
    # A feature whose spread is float32 rounding of a constant (relative 1e-6 of its RMS) is
    # constant: dividing by that spread would turn rounding noise into signal.
    rms = (x * x).mean(dim=0).sqrt()
    varies = std > 1e-6 * rms + 1e-12
    std = torch.where(varies, std, torch.ones_like(std))
    xt = torch.cat([(x - mean) / std, torch.ones(b, 1, device=x.device)], dim=1)  # X̃ (B, K+1)
    onehot = torch.zeros(b, num_classes, device=x.device)
    onehot[torch.arange(b, device=x.device), y] = 1.0
    # L = ½ σ_max(X̃)² / B + λ, with σ_max² from a power iteration on X̃ᵀX̃. The iteration
    # approaches σ_max² from below, hence the 10% margin; the ½ bound itself is loose except
    # where the probabilities concentrate on two classes.
    sigma_sq = _top_singular_value_sq(xt, seed=b * 131 + k)
    step = 1.0 / (0.5 * 1.1 * sigma_sq / b + l2)  # one host sync: the step is a Python float
    decay = torch.ones(k + 1, device=x.device) * l2
    decay[k] = 0.0  # the bias column is not penalized
    theta = torch.zeros(num_classes, k + 1, device=x.device)  # Θ = [W, b]
    look = theta.clone()
    t_prev = 1.0
    for _ in range(steps):
        _, grad = softmax_regression_grad(look, xt, onehot, decay)  # ∇J at the look-ahead
        nxt = look - step * grad
        t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t_prev * t_prev))
        look = nxt + ((t_prev - 1.0) / t_next) * (nxt - theta)
        theta, t_prev = nxt, t_next
    return LinearProbe(mean=mean, std=std, weight=theta[:, :k].clone(), bias=theta[:, k].clone())


def softmax_regression_grad(
    theta: torch.Tensor, xt: torch.Tensor, onehot: torch.Tensor, decay: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Objective ``J`` and its gradient ``∇J = (P - Y)ᵀ X̃ / B + decay ⊙ Θ`` in closed form.

    ``theta`` (C, K) holds the weights of the features ``xt`` (B, K) (a constant column gives
    the bias), ``onehot`` (B, C) the labels, ``decay`` (K,) the per-feature L2 penalty, so that
    ``J = -(1/B) Σ_i log P_{i, y_i} + ½ Σ_ck decay_k Θ_ck²``.
    """
    # Logits are formed transposed, (C, B) = Θ X̃ᵀ: with C ≪ K this product and the gradient's
    # (P - Y)ᵀ X̃ both read X̃ row-major, about twice as fast on the CPU as X̃ Θᵀ.
    logp_t = torch.log_softmax(theta @ xt.t(), dim=0)  # (C, B)
    y_t = onehot.t()
    loss = -(y_t * logp_t).sum() / xt.shape[0] + 0.5 * (decay * theta * theta).sum()
    grad = (logp_t.exp() - y_t) @ xt / xt.shape[0] + theta * decay
    return loss, grad


def _top_singular_value_sq(x: torch.Tensor, seed: int, iters: int = 30) -> float:
    """``σ_max(x)²`` by power iteration on ``xᵀx`` from a seeded random start."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(x.shape[1], generator=gen).to(x.device)
    v = v / v.norm()
    est = torch.zeros((), device=x.device)
    for _ in range(iters):
        w = x.t() @ (x @ v)
        est = w.norm()
        v = w / est.clamp_min(1e-30)
    return float(est)


def linear_probe_accuracy(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    num_classes: int,
    steps: int = 100,
    l2: float = 1e-3,
) -> float:
    """Held-out accuracy of a :func:`linear_probe` fitted on the training rows (a host sync)."""
    _check_rows(x_test, "x_test")
    _check_labels(y_test, x_test.shape[0], num_classes, "y_test")
    if x_test.shape[1] != x_train.shape[1]:
        raise ValueError(
            f"x_train has {x_train.shape[1]} features but x_test has {x_test.shape[1]}"
        )
    probe = linear_probe(x_train, y_train, num_classes, steps=steps, l2=l2)
    return float((probe.predict(x_test) == y_test).float().mean())


def effective_rank(x: torch.Tensor, centred: bool = True) -> float:
    """Participation ratio ``(Σλ)² / Σλ²`` of the (centred or uncentred) covariance of ``x``.

    ``S = Xᵀ X / N`` with ``X`` the rows, minus their mean when ``centred``. Computed from
    ``tr S = ‖X‖_F² / N`` and ``‖S‖_F = ‖X Xᵀ‖_F / N`` (whichever Gram matrix is smaller). A
    matrix with no variance at all (every row equal, centred) has no direction: returns 0.
    """
    _check_rows(x, "x")
    x = x.double()
    if centred:
        x = x - x.mean(dim=0)
    gram = x.t() @ x if x.shape[1] <= x.shape[0] else x @ x.t()  # same non-zero eigenvalues
    total = torch.linalg.matrix_norm(x) ** 2  # Σλ (times N)
    squares = torch.linalg.matrix_norm(gram) ** 2  # Σλ² (times N²)
    if float(squares) <= 0.0:
        return 0.0
    return float(total * total / squares)


def class_mean_cosine(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> float:
    """Mean over pairs of different classes of ``cos(μ_a, μ_b)``; absent classes are skipped.

    Raises ``ValueError`` when fewer than two classes occur in ``y``.
    """
    _check_rows(x, "x")
    _check_labels(y, x.shape[0], num_classes, "y")
    mu, present = _class_means(x.float(), y, num_classes)
    mu = mu[present]
    if mu.shape[0] < 2:
        raise ValueError("class_mean_cosine needs rows of at least two classes")
    norms = mu.norm(dim=1).clamp_min(1e-12)
    unit = mu / norms[:, None]
    cos = unit @ unit.t()
    m = mu.shape[0]
    return float((cos.sum() - cos.diagonal().sum()) / (m * (m - 1)))


def dead_fraction(h: torch.Tensor) -> float:
    """Share of the columns (units) of ``h`` (N, D) that are zero on every row."""
    _check_rows(h, "h")
    alive = (h != 0).any(dim=0)
    return float(1.0 - alive.float().mean())


def persistence(weight: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """Per-unit cosine ``cos(w_j, w_j⁰)`` (D,) between rows of ``weight`` and ``initial`` (D, K).

    A unit whose weights are zero has cosine 0 with anything.
    """
    _check_rows(weight, "weight")
    if weight.shape != initial.shape:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} but initial has {tuple(initial.shape)}"
        )
    w, w0 = weight.double(), initial.double().to(weight.device)
    dots = (w * w0).sum(dim=1)
    norms = w.norm(dim=1) * w0.norm(dim=1)
    return torch.where(norms > 0, dots / norms.clamp_min(1e-300), torch.zeros_like(dots)).float()


def class_selectivity(h: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-unit ``(μ_max - μ_rest) / (μ_max + μ_rest)`` (D,) of activities ``h`` (N, D) ≥ 0.

    ``μ_c`` is the unit's mean activity over the rows of class ``c`` (classes absent from ``y``
    are left out), ``μ_max`` the largest and ``μ_rest`` the mean of the others. Units silent on
    every row get 0.
    """
    _check_rows(h, "h")
    _check_labels(y, h.shape[0], num_classes, "y")
    mu, present = _class_means(h.float(), y, num_classes)
    mu = mu[present]  # (C', D)
    if mu.shape[0] < 2:
        raise ValueError("class_selectivity needs rows of at least two classes")
    top = mu.max(dim=0).values
    rest = (mu.sum(dim=0) - top) / (mu.shape[0] - 1)
    denom = top + rest
    return torch.where(denom > 0, (top - rest) / denom.clamp_min(1e-30), torch.zeros_like(top))


def split_length_direction(h: torch.Tensor, norm: str = "rms") -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_j h_j², ĥ)``: each row's squared length (the "sum" goodness) and its direction.

    ``ĥ`` is the row scaled to unit RMS (``norm="rms"``) or unit L2 length (``"l2"``), as the
    next FF layer receives it. Rows of zeros keep zero direction.
    """
    _check_rows(h, "h")
    if norm not in ("rms", "l2"):
        raise ValueError(f"norm must be 'rms' or 'l2', got {norm!r}")
    sq = (h.float() ** 2).sum(dim=1)
    mean_sq = sq / h.shape[1] if norm == "rms" else sq
    scale = torch.where(mean_sq > 0, torch.rsqrt(mean_sq.clamp_min(1e-30)), torch.zeros_like(sq))
    return sq, h.float() * scale[:, None]


def _class_means(
    x: torch.Tensor, y: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, K) class means of the rows of ``x`` and a (C,) mask of the classes present."""
    sums = torch.zeros(num_classes, x.shape[1], device=x.device, dtype=x.dtype)
    sums.index_add_(0, y, x)
    counts = torch.bincount(y, minlength=num_classes).to(x.dtype)
    return sums / counts.clamp_min(1.0)[:, None], counts > 0


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation (ties broken by position; NaN when either is constant)."""
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    return _pearson(ra, rb)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else float("nan")


# ------------------------------------------------------------------------------------------------
# What a network shows the probes
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeSettings:
    """How the probes sample, fit and threshold; one knob a line."""

    probe_samples: int = 1000  # training images the probes are fitted on (a fixed subset)
    test_samples: int = 2000  # test images the probes are scored on (a fixed subset)
    steps: int = 100  # Nesterov steps of every linear probe (within ~1% of 800 on digits)
    l2: float = 1e-3  # L2 penalty λ of every linear probe
    persist_threshold: float = 0.5  # a unit "survives" when cos(w, w⁰) is at least this
    seed: int = 0  # seeds the choice of the subsets

    def __post_init__(self) -> None:
        for name in ("probe_samples", "test_samples", "steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {self.l2}")
        if not -1.0 <= self.persist_threshold <= 1.0:
            raise ValueError(f"persist_threshold must be in [-1, 1], got {self.persist_threshold}")


@dataclass
class ProbeData:
    """The fixed image subsets every probe of a report sees."""

    x_train: torch.Tensor  # (B, K) images the probes are fitted on
    y_train: torch.Tensor  # (B,)
    x_test: torch.Tensor  # (T, K) images the probes are scored on
    y_test: torch.Tensor  # (T,)
    num_classes: int

    @classmethod
    def from_dataset(cls, dataset: Dataset, settings: ProbeSettings) -> ProbeData:
        gen = torch.Generator().manual_seed(settings.seed)
        n_tr = min(settings.probe_samples, dataset.x_train.shape[0])
        n_te = min(settings.test_samples, dataset.x_test.shape[0])
        tr = torch.randperm(dataset.x_train.shape[0], generator=gen)[:n_tr].to(dataset.device)
        te = torch.randperm(dataset.x_test.shape[0], generator=gen)[:n_te].to(dataset.device)
        return cls(
            dataset.x_train[tr],
            dataset.y_train[tr],
            dataset.x_test[te],
            dataset.y_test[te],
            dataset.num_classes,
        )


@dataclass
class LayerView:
    """One layer's response to a batch: its activities on the neutral pass, and goodness."""

    h: torch.Tensor  # (N, D) ReLU activities on the neutral-label pass
    normalized: torch.Tensor  # (N, D) what the next layer receives (the direction)
    goodness: torch.Tensor  # (N,) the layer's goodness on the neutral-label pass
    label_goodness: torch.Tensor | None  # (N, C) goodness with each candidate label, or None
    active: torch.Tensor | None  # (D,) bool: unit active on some row, neutral or labelled pass


@torch.no_grad()
def layer_views(net: FFNetwork, x: torch.Tensor, with_labels: bool = True) -> list[LayerView]:
    """Every layer's :class:`LayerView` for images ``x`` (N, K), in evaluation-sized chunks.

    ``with_labels`` also runs each image with each of the ``C`` labels (C times the work) for
    the per-label goodness and the activity mask used by :func:`dead_fraction`.
    """
    n_layers, c = len(net.layers), net.num_classes
    chunk = max(1, net.config.eval_batch_size)
    parts: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in range(n_layers)]
    active = [torch.zeros(ly.out_features, dtype=torch.bool, device=x.device) for ly in net.layers]
    for start in range(0, x.shape[0], chunk):
        xb = x[start : start + chunk]
        for i, (g, act) in enumerate(net.forward_layers(net.embed(xb, None))):
            parts[i].append((act.x.float(), act.normalized(), g.float()))
            active[i] |= (act.x != 0).any(dim=0)
        if not with_labels:
            continue
        b = xb.shape[0]
        labels = torch.arange(c, device=x.device).repeat_interleave(b)
        for i, (g, act) in enumerate(net.forward_layers(net.embed(xb.repeat(c, 1), labels))):
            parts[i][-1] = (*parts[i][-1], g.float().reshape(c, b).t())
            active[i] |= (act.x != 0).any(dim=0)
    views = []
    for i in range(n_layers):
        cols = list(zip(*parts[i], strict=True))
        views.append(
            LayerView(
                h=torch.cat(cols[0]),
                normalized=torch.cat(cols[1]),
                goodness=torch.cat(cols[2]),
                label_goodness=torch.cat(cols[3]) if with_labels else None,
                active=active[i] if with_labels else None,
            )
        )
    return views


def _probe(tr: torch.Tensor, te: torch.Tensor, data: ProbeData, settings: ProbeSettings) -> float:
    return linear_probe_accuracy(
        tr, data.y_train, te, data.y_test, data.num_classes, settings.steps, settings.l2
    )


def analyse_layers(
    net: FFNetwork, data: ProbeData, settings: ProbeSettings
) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    """Every length/direction measure of every layer, and each layer's per-unit selectivity.

    Per layer (1-based ``layer``):

    - ``direction_probe_acc``: linear probe on the normalized output of the neutral pass;
    - ``length_probe_acc``: the same probe on the neutral pass's goodness alone (1 feature),
      i.e. what the length says about the image when the label is not given;
    - ``label_goodness_probe_acc``: the probe on the layer's goodness for each of the C labels
      (C features): everything the lengths say, read out by a learned linear map;
    - ``goodness_acc``: argmax over labels of that layer's goodness, no fitting: the goodness
      predictor restricted to this one layer;
    - ``class_mean_cosine``, ``effective_rank`` (centred) and ``effective_rank_uncentred`` of the
      neutral-pass normalized outputs of the test images;
    - ``dead_fraction``: units never active on any pass (neutral or labelled) of the test images.
    """
    tr_views = layer_views(net, data.x_train, with_labels=True)
    te_views = layer_views(net, data.x_test, with_labels=True)
    out, selectivity = [], []
    for i, (tr, te) in enumerate(zip(tr_views, te_views, strict=True)):
        tr_lg, te_lg, te_active = _labelled(tr), _labelled(te), _active(te)
        good_pred = te_lg.argmax(dim=1)
        out.append(
            {
                "layer": i + 1,
                "width": int(te.h.shape[1]),
                "frozen": bool(net.layers[i].frozen),
                "direction_probe_acc": _probe(tr.normalized, te.normalized, data, settings),
                "length_probe_acc": _probe(
                    tr.goodness[:, None], te.goodness[:, None], data, settings
                ),
                "label_goodness_probe_acc": _probe(tr_lg, te_lg, data, settings),
                "goodness_acc": float((good_pred == data.y_test).float().mean()),
                "class_mean_cosine": class_mean_cosine(
                    te.normalized, data.y_test, data.num_classes
                ),
                "effective_rank": effective_rank(te.normalized, centred=True),
                "effective_rank_uncentred": effective_rank(te.normalized, centred=False),
                "dead_fraction": float(1.0 - te_active.float().mean()),
                "mean_goodness": float(te.goodness.mean()),
            }
        )
        selectivity.append(class_selectivity(tr.h, data.y_train, data.num_classes))
    return out, selectivity


def _labelled(view: LayerView) -> torch.Tensor:
    if view.label_goodness is None:
        raise ValueError("this LayerView was made with with_labels=False: no per-label goodness")
    return view.label_goodness


def _active(view: LayerView) -> torch.Tensor:
    if view.active is None:
        raise ValueError("this LayerView was made with with_labels=False: no activity mask")
    return view.active


def track_epoch(
    net: FFNetwork, data: ProbeData, settings: ProbeSettings, initial: Sequence[torch.Tensor]
) -> dict[str, list[float]]:
    """The per-epoch measures of every layer: direction probe, persistence statistics."""
    tr_views = layer_views(net, data.x_train, with_labels=False)
    te_views = layer_views(net, data.x_test, with_labels=False)
    keys = ("probe_acc", "persistence_mean", "persistence_median", "persistence_min")
    out: dict[str, list[float]] = {key: [] for key in (*keys, "survivor_share")}
    for layer, w0, tr, te in zip(net.layers, initial, tr_views, te_views, strict=True):
        cos = persistence(layer.weight, w0)
        out["probe_acc"].append(_probe(tr.normalized, te.normalized, data, settings))
        out["persistence_mean"].append(float(cos.mean()))
        out["persistence_median"].append(float(cos.median()))
        out["persistence_min"].append(float(cos.min()))
        out["survivor_share"].append(float((cos >= settings.persist_threshold).float().mean()))
    return out


def persistence_summary(
    net: FFNetwork,
    initial: Sequence[torch.Tensor],
    sel_init: Sequence[torch.Tensor],
    sel_final: Sequence[torch.Tensor],
    data: ProbeData,
    settings: ProbeSettings,
) -> list[dict[str, Any]]:
    """Per layer: which units kept their initial direction, and were they the selective ones.

    A unit *survives* when ``cos(w, w⁰) ≥ persist_threshold``. Reported: the survivors' share,
    the mean selectivity (at initialization and at the end) of survivors and of the others,
    rank and linear correlations of selectivity with the final persistence, and the direction
    probe restricted to the survivors against the same number of randomly chosen other units.
    ``median_split`` makes the same comparison between the more persistent half of the units
    and the less persistent half, which stays informative when the threshold keeps all or none.
    """
    views_tr = layer_views(net, data.x_train, with_labels=False)
    views_te = layer_views(net, data.x_test, with_labels=False)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    out = []
    for i, layer in enumerate(net.layers):
        cos = persistence(layer.weight, initial[i])
        surv = cos >= settings.persist_threshold
        s0, s1 = sel_init[i], sel_final[i]
        n_surv = int(surv.sum())
        entry: dict[str, Any] = {
            "layer": i + 1,
            "frozen": bool(layer.frozen),
            "weights_unchanged": bool(torch.equal(layer.weight, initial[i].to(layer.weight))),
            "mean_persistence": float(cos.mean()),
            "survivors": n_surv,
            "survivor_share": n_surv / cos.shape[0],
            "selectivity_init_survivors": _masked_mean(s0, surv),
            "selectivity_init_others": _masked_mean(s0, ~surv),
            "selectivity_final_survivors": _masked_mean(s1, surv),
            "selectivity_final_others": _masked_mean(s1, ~surv),
            "spearman_selectivity_init_vs_persistence": _spearman(s0, cos),
            "pearson_selectivity_init_vs_persistence": _pearson(s0, cos),
            "spearman_selectivity_final_vs_persistence": _spearman(s1, cos),
            "survivor_probe_acc": None,
            "other_probe_acc": None,
            "median_split": None,
            "persistence": cos.tolist(),
            "selectivity_init": s0.tolist(),
            "selectivity_final": s1.tolist(),
        }
        # The threshold may keep every unit or none; the split at the median persistence
        # always compares two halves.
        order = cos.argsort(descending=True)
        half = cos.shape[0] // 2
        top, bottom = order[:half], order[cos.shape[0] - half :]
        if half > 0 and not layer.frozen:
            tr, te = views_tr[i].normalized, views_te[i].normalized
            entry["median_split"] = {
                "persistence_cut": float(cos[order[half - 1]]),
                "selectivity_init_top": float(s0[top].mean()),
                "selectivity_init_bottom": float(s0[bottom].mean()),
                "selectivity_final_top": float(s1[top].mean()),
                "selectivity_final_bottom": float(s1[bottom].mean()),
                "probe_acc_top": _probe(tr[:, top], te[:, top], data, settings),
                "probe_acc_bottom": _probe(tr[:, bottom], te[:, bottom], data, settings),
            }
        others = (~surv).nonzero().squeeze(1).cpu()
        if 0 < n_surv <= others.shape[0]:
            pick = others[torch.randperm(others.shape[0], generator=gen)[:n_surv]]
            cols_s = surv.nonzero().squeeze(1)
            cols_o = pick.to(cols_s.device)
            tr, te = views_tr[i].normalized, views_te[i].normalized
            entry["survivor_probe_acc"] = _probe(tr[:, cols_s], te[:, cols_s], data, settings)
            entry["other_probe_acc"] = _probe(tr[:, cols_o], te[:, cols_o], data, settings)
        out.append(entry)
    return out


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float | None:
    return float(x[mask].mean()) if bool(mask.any()) else None


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------


def run_name(freeze: Sequence[int]) -> str:
    """``"unfrozen"`` or ``"freeze 1,2"``."""
    return "freeze " + ",".join(map(str, freeze)) if freeze else "unfrozen"


def probe_run(
    trainer: Trainer,
    data: ProbeData,
    settings: ProbeSettings,
    initial: Sequence[torch.Tensor] | None = None,
    train: bool = True,
) -> dict[str, Any]:
    """Probe ``trainer``'s network at initialization, after every epoch, and at the end.

    ``train=False`` probes the network as it is (a loaded checkpoint), with ``initial`` the
    weights it was initialized with; the per-epoch track then has the initial network and the
    final one only. The epoch loop is the trainer's own (:meth:`Trainer._train_epoch`), with
    the probes run between epochs and timed separately.
    """
    net, cfg = trainer.network, trainer.config
    init_w = [w.clone() for w in initial] if initial is not None else None
    if init_w is None:
        if trainer.epoch != 0:
            raise ValueError("a trained network needs its initial weights passed as `initial`")
        init_w = [layer.weight.clone() for layer in net.layers]
    probe_s = 0.0

    t0 = time.perf_counter()
    init_net = net if train else _initial_network(trainer, init_w)
    layers_init, sel_init = analyse_layers(init_net, data, settings)
    epochs = [0]
    track = [track_epoch(init_net, data, settings, init_w)]
    probe_s += time.perf_counter() - t0

    if train:
        total = cfg.total_epochs
        while trainer.epoch < total:
            record = trainer._train_epoch()
            trainer.history.append(record)
            log.info(format_epoch(record, total))
            t0 = time.perf_counter()
            epochs.append(trainer.epoch)
            track.append(track_epoch(net, data, settings, init_w))
            probe_s += time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        epochs.append(trainer.epoch)
        track.append(track_epoch(net, data, settings, init_w))
        probe_s += time.perf_counter() - t0

    t0 = time.perf_counter()
    layers_final, sel_final = analyse_layers(net, data, settings)
    persist = persistence_summary(net, init_w, sel_init, sel_final, data, settings)
    probe_s += time.perf_counter() - t0
    final_eval = trainer.evaluate()

    history = trainer.history
    train_s = float(sum(r.get("seconds", 0.0) for r in history)) if train else 0.0
    eval_s = float(sum(r.get("eval_seconds", 0.0) for r in history)) if train else 0.0
    return {
        "freeze": list(cfg.freeze),
        "trained_here": train,
        "epochs": trainer.epoch,
        "final": final_eval,
        "history": history,
        "layers_init": layers_init,
        "layers_final": layers_final,
        "persistence": persist,
        "track": {
            "epochs": epochs,
            **{key: [t[key] for t in track] for key in track[0]},
        },
        "timing": {
            "train_s": train_s,
            "trainer_eval_s": eval_s,
            "probe_s": probe_s,
            "probe_over_train": probe_s / train_s if train_s > 0 else None,
        },
    }


def _initial_network(trainer: Trainer, initial: Sequence[torch.Tensor]) -> FFNetwork:
    """A fresh network of ``trainer``'s configuration carrying the ``initial`` weights."""
    net = build_network(
        trainer.config,
        trainer.network.in_features,
        trainer.network.num_classes,
        device=trainer.device,
        backend=trainer.backend,
        image_shape=trainer.dataset.image_shape,
    )
    for layer, w0 in zip(net.layers, initial, strict=True):
        layer.weight = w0.to(trainer.device).clone()
    return net


def default_freeze_sets(n_layers: int) -> list[tuple[int, ...]]:
    """``(1,)`` and ``(1, 2)``, each kept only if at least one later layer is still trained."""
    return [s for s in ((1,), (1, 2)) if max(s) < n_layers]


def run_probes(
    config: FFConfig,
    dataset: Dataset,
    settings: ProbeSettings | None = None,
    compare_freeze: Sequence[Sequence[int]] | None = None,
    backend: str = "auto",
    device: str | torch.device | None = None,
    checkpoint: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train and probe ``config`` on ``dataset``, and each ``compare_freeze`` variant of it.

    The first run is ``config`` itself (trained here, or the ``checkpoint`` payload of
    :func:`ffkern.checkpoint.load_checkpoint`, probed as saved). Every set in
    ``compare_freeze`` (default :func:`default_freeze_sets`) adds a run of the same
    configuration and seed with those 1-based layers kept at their initialization, so the runs
    share their initial weights. Returns a JSON-ready dictionary; see :mod:`ffkern.probes_report`.
    """
    settings = settings if settings is not None else ProbeSettings()
    if getattr(config, "model", "feedforward") != "feedforward":
        raise ValueError(
            f"the probes read one goodness and one output per layer of the feedforward "
            f"network; model {config.model!r} is not supported"
        )
    sets = (
        default_freeze_sets(len(config.layers))
        if compare_freeze is None
        else [tuple(int(i) for i in s) for s in compare_freeze]
    )
    # The configured run first, then every other freeze set, always with an unfrozen baseline.
    freezes: list[tuple[int, ...]] = [config.freeze]
    for s in [(), *sets]:
        if s not in freezes:
            freezes.append(s)
    configs = [config.replace(freeze=s) for s in freezes]
    started = time.perf_counter()
    runs: dict[str, Any] = {}
    data: ProbeData | None = None
    input_acc = None
    for k, cfg in enumerate(configs):
        trainer = Trainer(cfg, dataset, backend=backend, device=device, progress=progress)
        if data is None:
            data = ProbeData.from_dataset(trainer.dataset, settings)
            input_acc = _input_probe(trainer.network, data, settings)
        name = run_name(cfg.freeze)
        log.info("probe run %d/%d: %s", k + 1, len(configs), name)
        if k == 0 and checkpoint is not None:
            initial = [layer.weight.clone() for layer in trainer.network.layers]
            trainer.network.load_state_dict(checkpoint["network"])
            trainer.epoch = int(checkpoint["epoch"])
            trainer.history = list(checkpoint.get("history", []))
            runs[name] = probe_run(trainer, data, settings, initial=initial, train=False)
        else:
            runs[name] = probe_run(trainer, data, settings)
    total_s = time.perf_counter() - started
    train_s = sum(r["timing"]["train_s"] for r in runs.values())
    probe_s = sum(r["timing"]["probe_s"] for r in runs.values())
    return {
        "format": FORMAT,
        "version": VERSION,
        "dataset": dataset.name,
        "num_classes": dataset.num_classes,
        "config": config.to_dict(),
        "run_order": list(runs),  # the configured run first (JSON objects keep no order)
        "settings": asdict(settings),
        "probe_rows": {"train": int(data.y_train.shape[0]), "test": int(data.y_test.shape[0])}
        if data is not None
        else None,
        "input_probe_acc": input_acc,
        "chance_acc": 1.0 / dataset.num_classes,
        "runs": runs,
        "timing": {
            "total_s": total_s,
            "train_s": train_s,
            "probe_s": probe_s,
            "probe_over_train": probe_s / train_s if train_s > 0 else None,
        },
    }


def _input_probe(net: FFNetwork, data: ProbeData, settings: ProbeSettings) -> float:
    """The probe on the first layer's input (neutral label, normalized): the pixels' share."""
    obj = net.objective
    tr = net.backend.normalize(net.embed(data.x_train, None), obj).normalized()
    te = net.backend.normalize(net.embed(data.x_test, None), obj).normalized()
    return _probe(tr, te, data, settings)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

# Defaults of ``ffkern probe``, chosen to finish in a few minutes on a 2-core CPU for digits.
# They differ from ``ffkern train``'s (Hinton's SGD at lr 0.01), which on digits leaves the
# goodness predictor near 20% after 30 epochs; Adam at 1e-3 reaches about 94% in 12.
PROBE_DEFAULTS: dict[str, Any] = {
    "layers": (500, 500, 500),
    "epochs": 20,
    "optimizer": "adam",
    "lr": 1e-3,
    "train_eval_samples": 300,  # the trainer's training-accuracy subset; the report ignores it
}


def _freeze_sets(text: str) -> list[tuple[int, ...]] | None:
    """``"1;1,2"`` → [(1,), (1, 2)]; ``"none"`` → []; ``"auto"`` → None (the defaults)."""
    text = text.strip().lower()
    if text == "auto":
        return None
    if text in ("none", ""):
        return []
    try:
        return [tuple(int(v) for v in part.split(",") if v.strip()) for part in text.split(";")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected layer sets such as '1;1,2', 'auto' or 'none', got {text!r}"
        ) from None


def add_cli(subparsers: Any) -> None:
    """Add ``ffkern probe`` to the ``ffkern`` command line."""
    from ffkern.cli import add_config_arguments, add_data_arguments

    p = subparsers.add_parser(
        "probe",
        help="train (or load) a network and report what its layers keep",
        description=(
            "Frozen random layers, label information in the length against the direction, "
            "persistence of the initial features, per-layer linear probes over training. "
            "Writes report.md, probes.json and PNG plots into --out. Defaults differ from "
            "ffkern train: 500,500,500, 20 epochs, Adam at lr 1e-3."
        ),
    )
    add_data_arguments(p)
    add_config_arguments(p)
    p.set_defaults(**PROBE_DEFAULTS)
    p.add_argument("--out", metavar="DIR", required=True, help="report folder")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--checkpoint", metavar="PATH", help="probe this checkpoint, do not train it")
    p.add_argument(
        "--compare-freeze",
        type=_freeze_sets,
        default=None,
        metavar="SETS",
        help="frozen variants to compare with the configured run (--freeze, default none), "
        "e.g. '1;1,2'; default auto: 1 and 1,2 where a later layer is still trained; 'none' "
        "for no variant. An unfrozen run is always included",
    )
    d = ProbeSettings()
    p.add_argument("--probe-samples", type=int, default=d.probe_samples, help="probe fit rows")
    p.add_argument("--probe-test-samples", type=int, default=d.test_samples, help="probe rows")
    p.add_argument("--probe-steps", type=int, default=d.steps, help="steps of each probe")
    p.add_argument("--probe-l2", type=float, default=d.l2, help="L2 penalty of each probe")
    p.add_argument("--persist-threshold", type=float, default=d.persist_threshold)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_probe)


def cmd_probe(args: argparse.Namespace) -> int:
    """``ffkern probe``: run :func:`run_probes` and write the report folder."""
    from ffkern.cli import config_from_args
    from ffkern.data import load_dataset
    from ffkern.probes_report import check_out_dir, write_report

    out = Path(args.out)
    check_out_dir(out, args.overwrite)
    settings = ProbeSettings(
        probe_samples=args.probe_samples,
        test_samples=args.probe_test_samples,
        steps=args.probe_steps,
        l2=args.probe_l2,
        persist_threshold=args.persist_threshold,
    )
    checkpoint = None
    if args.checkpoint:
        from ffkern.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(args.checkpoint)
        config = FFConfig.from_dict(checkpoint["config"])
        name = checkpoint["dataset"]
    else:
        config, name = config_from_args(args), args.dataset
    dataset = load_dataset(name, args.data, download=args.download)
    result = run_probes(
        config,
        dataset,
        settings=settings,
        compare_freeze=args.compare_freeze,
        backend=args.backend,
        device=args.device,
        checkpoint=checkpoint,
        progress=not args.no_progress,
    )
    result["arguments"] = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in vars(args).items()
        if not k.startswith("_") and k != "func" and k != "compare_freeze"
    }
    paths = write_report(result, out, overwrite=args.overwrite)
    for path in paths:
        print(path)
    return 0
