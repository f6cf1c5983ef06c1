"""Independent autograd oracles of the FF local losses, shared by the gradient tests.

These restate the losses with plain autograd ops, never importing ffkern's maths, so that the
closed-form gradients in ``ffkern`` are checked against something written separately.
"""

from __future__ import annotations

import torch

from ffkern.reference import LayerObjective

GRAD_RTOL = 1e-10  # float64 closed form against float64 autograd: rounding only


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖``."""
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def softplus(u: torch.Tensor) -> torch.Tensor:
    """Exact softplus (F.softplus is linear above 20 and differs there by about 2e-9)."""
    return torch.logaddexp(torch.zeros_like(u), u)


def oracle_loss(h: torch.Tensor, n_pos: int, obj: LayerObjective) -> torch.Tensor:
    """The local loss of ``obj`` from activities ``h`` (N, D), first ``n_pos`` rows positive."""
    width = h.shape[1]
    q = (h * h).sum(1)
    g = q if obj.goodness == "sum" else q / width
    if obj.objective == "symba":
        return softplus(-obj.symba_alpha * (g[:n_pos] - g[n_pos:])).mean()
    theta = obj.threshold if obj.threshold is not None else (width if obj.goodness == "sum" else 1)
    s = torch.where(torch.arange(h.shape[0]) < n_pos, 1.0, -1.0).to(h.dtype)
    if obj.objective == "reversed":
        s = -s
    return softplus(-s * (g - theta) / obj.temperature).mean()


def oracle_peer(
    h: torch.Tensor, n_pos: int, obj: LayerObjective, peer_mean: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Peer normalization's loss (stopped coefficient) and the updated running mean."""
    if not obj.peer_strength or not n_pos:
        return torch.zeros((), dtype=h.dtype), peer_mean
    m = obj.peer_momentum * peer_mean + (1 - obj.peer_momentum) * h[:n_pos].detach().mean(0)
    return obj.peer_strength / n_pos * (h[:n_pos] * (m - m.mean())).sum(), m
