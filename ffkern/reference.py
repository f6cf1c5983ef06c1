r"""The reference Forward-Forward layer: closed-form maths in plain torch, no autograd.

This module is the oracle for every fused kernel and the arithmetic of the ``reference`` backend.
It runs in whatever dtype it is given (float64 in the gradient tests, float32 for training).

One FF layer, for a batch of ``N`` rows of which the first ``n_pos`` are positive
(``s_i = +1``) and the rest negative (``s_i = -1``)::

    x̂  = r ⊙ x                       r_i = 1 / sqrt(mean_k x_ik² + ε)   (norm "rms")
                                      r_i = 1 / sqrt(sum_k  x_ik² + ε)   (norm "l2")
    z   = x̂ Wᵀ + b                    (N, D)
    h   = relu(z)
    q_i = Σ_j h_ij²                   row sum of squares
    g_i = q_i            (goodness "sum")   or   q_i / D   (goodness "mean")
    u_i = s_i (g_i - θ) / T
    ℓ_i = softplus(-u_i)              the logistic local loss
    L   = (1/N) Σ_i ℓ_i

The layer hands ``(h, r')`` to the next layer with ``r'`` the normalization scale of ``h``: the
next layer's input is ``r' ⊙ h``, never ``h`` itself, so only the direction of ``h`` goes on.

Gradient. With ``σ`` the logistic function, ``∂ℓ_i/∂g_i = -s_i σ(-u_i) / T`` and
``∂g_i/∂h_ij = κ h_ij`` with ``κ = 2`` ("sum") or ``2/D`` ("mean"). Since ``h_ij · 1[z_ij > 0]
= h_ij``, the pre-activation gradient of the FF loss is a per-row scaling of ``h``::

    c_i   = -κ s_i σ(-u_i) / (T N)
    dz_ij = c_i h_ij

Peer normalization (Hinton's recipe) keeps a running mean activity per unit over positive rows,
``m ← ρ m + (1 - ρ) mean_{i pos} h_i``, and pushes every unit's mean toward the layer's mean.
Its loss is linear in ``h`` with a stopped coefficient, ``L_peer = (λ / n_pos) Σ_{i pos} Σ_j
h_ij · sg(m_j - m̄)``, so it adds, on positive rows only::

    dz_ij += (λ / n_pos) (m_j - m̄) 1[z_ij > 0]

Then ``dW = dzᵀ x̂``, ``db = Σ_i dz_i``. In the absence of peer normalization,
``dW = Hᵀ diag(c ⊙ r) X``: the input scale and the loss gradient are both row coefficients,
which is what lets the fused kernels avoid writing ``x̂`` or ``dz``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]  # averages a tensor over data-parallel ranks

NORMS = ("rms", "l2")
GOODNESS = ("sum", "mean")
OBJECTIVES = ("logistic", "reversed", "symba")


@dataclass(frozen=True)
class LayerObjective:
    """What one FF layer optimises; shared by every layer of a network."""

    goodness: str = "sum"  # "sum" (g = Σ h²) or "mean" (g = mean h²)
    threshold: float | None = None  # θ; None means D for "sum" and 1.0 for "mean"
    temperature: float = 1.0  # T, divides (g - θ) inside the logistic loss
    norm: str = "rms"  # length normalization of every layer's input: "rms" or "l2"
    norm_eps: float = 1e-8  # ε inside the square root of the normalization
    peer_strength: float = 0.03  # λ of peer normalization; 0 turns it off
    peer_momentum: float = 0.9  # ρ of the running mean activity per unit
    objective: str = "logistic"  # "logistic", "reversed" (positives low) or "symba" (pairs)
    symba_alpha: float = 4.0  # α of SymBa's softplus(-α (g⁺ - g⁻))

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not self.symba_alpha > 0:
            raise ValueError(f"symba_alpha must be > 0, got {self.symba_alpha}")
        if self.goodness not in GOODNESS:
            raise ValueError(f"goodness must be one of {GOODNESS}, got {self.goodness!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.norm_eps < 0:
            raise ValueError(f"norm_eps must be >= 0, got {self.norm_eps}")
        if self.peer_strength < 0:
            raise ValueError(f"peer_strength must be >= 0, got {self.peer_strength}")
        if not 0.0 <= self.peer_momentum < 1.0:
            raise ValueError(f"peer_momentum must be in [0, 1), got {self.peer_momentum}")

    def theta(self, width: int) -> float:
        """The goodness threshold θ of a layer with ``width`` units."""
        if self.threshold is not None:
            return float(self.threshold)
        return float(width) if self.goodness == "sum" else 1.0

    def kappa(self, width: int) -> float:
        """``∂g/∂h = κ h``: 2 for sum-of-squares goodness, 2/D for the mean."""
        return 2.0 if self.goodness == "sum" else 2.0 / width


@dataclass
class LayerResult:
    """Everything one reference layer step computes, before any parameter update."""

    loss: torch.Tensor  # () mean logistic loss L over the N rows
    goodness: torch.Tensor  # (N,) g
    h: torch.Tensor  # (N, D) ReLU activities
    out_scale: torch.Tensor  # (N,) r' such that r' ⊙ h is the next layer's input
    coef: torch.Tensor  # (N,) c, the FF part of dz = c ⊙ h
    dz: torch.Tensor  # (N, D) gradient of L (+ L_peer) with respect to z
    dw: torch.Tensor  # (D, K) gradient with respect to W
    db: torch.Tensor  # (D,) gradient with respect to b
    peer_mean: torch.Tensor  # (D,) updated running mean activity (unchanged if λ = 0)


def norm_scale(x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Per-row length-normalization factor ``r`` of ``x`` (N, K): ``r ⊙ x`` has unit RMS or L2."""
    return scale_from_sumsq((x * x).sum(dim=1), x.shape[1], norm, eps)


def scale_from_sumsq(q: torch.Tensor, width: int, norm: str, eps: float) -> torch.Tensor:
    """``r`` from the row sums of squares ``q`` of a (N, width) matrix: no pass over the rows."""
    return torch.rsqrt((q / width if norm == "rms" else q) + eps)


def forward(
    weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-activations and activities ``(z, h)`` for input ``scale ⊙ x``."""
    z = torch.addmm(bias, x * scale[:, None], weight.t())
    return z, torch.relu(z)


def goodness_of(h: torch.Tensor, obj: LayerObjective) -> torch.Tensor:
    """Goodness ``g`` (N,) of activities ``h`` (N, D)."""
    q = (h * h).sum(dim=1)
    return q if obj.goodness == "sum" else q / h.shape[1]


def signs(n: int, n_pos: int, like: torch.Tensor) -> torch.Tensor:
    """``s`` (N,): +1 for the first ``n_pos`` rows, -1 after."""
    s = torch.full((n,), -1.0, dtype=like.dtype, device=like.device)
    s[:n_pos] = 1.0
    return s


def loss_and_coef(
    g: torch.Tensor, n_pos: int, obj: LayerObjective, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The local loss ``L`` of ``obj.objective`` and the row coefficients ``c`` (dz = c ⊙ h).

    - ``logistic``: ``L = mean_i softplus(-s_i (g_i - θ) / T)`` (Hinton's objective);
    - ``reversed``: the same with ``s`` negated: positives are pushed *below* θ;
    - ``symba``: rows ``i`` and ``n_pos + i`` form a (positive, negative) pair and
      ``L = (1/P) Σ_i softplus(-α (g⁺_i - g⁻_i))``, so ``∂L/∂g⁺_i = -α σ(-α Δ_i) / P`` and
      ``∂L/∂g⁻_i = +α σ(-α Δ_i) / P`` with ``Δ_i = g⁺_i - g⁻_i`` (Lee and Song, 2023).
    """
    if obj.objective == "symba":
        return symba_loss_and_coef(g, n_pos, obj, width)
    return logistic_loss_and_coef(g, n_pos, obj, width)


def symba_loss_and_coef(
    g: torch.Tensor, n_pos: int, obj: LayerObjective, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """SymBa's pairwise loss and row coefficients (see :func:`loss_and_coef`)."""
    if 2 * n_pos != g.shape[0]:
        raise ValueError(
            f"the symba objective pairs each positive with one negative: it needs as many "
            f"negatives as positives, got {n_pos} positives and {g.shape[0] - n_pos} negatives"
        )
    a = obj.symba_alpha
    delta = g[:n_pos] - g[n_pos:]
    loss = torch.logaddexp(torch.zeros_like(delta), -a * delta).mean()
    dpos = -a * torch.sigmoid(-a * delta) / n_pos
    coef = obj.kappa(width) * torch.cat([dpos, -dpos])
    return loss, coef


def logistic_loss_and_coef(
    g: torch.Tensor, n_pos: int, obj: LayerObjective, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean logistic loss ``L`` and the row coefficients ``c`` with ``dz = c ⊙ h``.

    With ``obj.objective == "reversed"`` the signs are swapped (positives want low goodness).
    """
    n = g.shape[0]
    s = signs(n, n_pos, g)
    if obj.objective == "reversed":
        s = -s
    u = s * (g - obj.theta(width)) / obj.temperature
    # logaddexp(0, -u) is softplus(-u) without torch.softplus's linear cut-off above 20.
    loss = torch.logaddexp(torch.zeros_like(u), -u).mean()
    coef = -obj.kappa(width) * s * torch.sigmoid(-u) / (obj.temperature * n)
    return loss, coef


def peer_update(
    h: torch.Tensor,
    n_pos: int,
    peer_mean: torch.Tensor,
    obj: LayerObjective,
    reduce: Reduce | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Updated running means ``m`` and the per-unit peer coefficient ``(λ / n_pos)(m - m̄)``.

    ``reduce``, when given, averages the batch's mean positive activity over data-parallel
    ranks, so every rank updates ``m`` with the statistics of the whole minibatch.
    """
    if obj.peer_strength == 0 or n_pos == 0:
        return peer_mean, torch.zeros_like(peer_mean)
    batch_mean = h[:n_pos].mean(dim=0)
    if reduce is not None:
        batch_mean = reduce(batch_mean)
    m = obj.peer_momentum * peer_mean + (1.0 - obj.peer_momentum) * batch_mean
    return m, (obj.peer_strength / n_pos) * (m - m.mean())


def layer_step(
    weight: torch.Tensor,
    bias: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    n_pos: int,
    obj: LayerObjective,
    peer_mean: torch.Tensor,
    reduce: Reduce | None = None,
) -> LayerResult:
    """Forward, loss and closed-form gradients of one FF layer (see the module docstring).

    ``reduce`` is the data-parallel hook of :func:`peer_update`; gradients are returned
    unreduced (the caller all-reduces ``dw`` and ``db`` before its update).
    """
    width = weight.shape[0]
    xn = x * scale[:, None]
    z = torch.addmm(bias, xn, weight.t())
    h = torch.relu(z)
    q = (h * h).sum(dim=1)
    g = q if obj.goodness == "sum" else q / width
    loss, coef = loss_and_coef(g, n_pos, obj, width)
    new_mean, peer = peer_update(h, n_pos, peer_mean, obj, reduce)
    dz = coef[:, None] * h
    if obj.peer_strength and n_pos:
        dz[:n_pos] += peer[None, :] * (z[:n_pos] > 0).to(h.dtype)
    return LayerResult(
        loss=loss,
        goodness=g,
        h=h,
        out_scale=scale_from_sumsq(q, width, obj.norm, obj.norm_eps),
        coef=coef,
        dz=dz,
        dw=dz.t() @ xn,
        db=dz.sum(dim=0),
        peer_mean=new_mean,
    )


def softmax_head_grads(
    weight: torch.Tensor, bias: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy of a linear softmax classifier and its closed-form gradients.

    ``p = softmax(F Wᵀ + b)``, ``L = -(1/B) Σ_i log p_{i,y_i}``, ``∂L/∂logits = (p - Y) / B``.
    Returns ``(loss, probs, dW, db)``.
    """
    logits = torch.addmm(bias, feats, weight.t())
    logp = torch.log_softmax(logits, dim=1)
    loss = -logp.gather(1, labels[:, None]).mean()
    p = logp.exp()
    dlogits = p.clone()
    dlogits[torch.arange(labels.shape[0], device=labels.device), labels] -= 1.0
    dlogits /= labels.shape[0]
    return loss, p, dlogits.t() @ feats, dlogits.sum(dim=0)
