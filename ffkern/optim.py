"""Optimizers written as closed-form in-place updates, with no ``torch.optim``.

SGD with momentum ``μ`` and weight decay ``λ`` (PyTorch's convention, dampening 0)::

    g' = g + λ p
    v  = μ v + g'          (v starts at zero, so the first step sets v = g')
    p  = p - η v

Adam (Kingma and Ba, with PyTorch's placement of ``ε`` and L2 weight decay)::

    g' = g + λ p
    m  = β1 m + (1 - β1) g'
    v  = β2 v + (1 - β2) g'²
    p  = p - η / (1 - β1^t) · m / (sqrt(v) / sqrt(1 - β2^t) + ε)

Learning-rate schedules: ``constant``, and ``hinton`` (Hinton's FF recipe): the full rate for the
first half of the epochs, then a linear decay, ``η_e = η · min(1, 2 (E - e) / E)`` for epoch
``e`` in ``0 .. E-1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "hinton")


@dataclass(frozen=True)
class OptimConfig:
    """Hyper-parameters of the per-layer optimizer."""

    name: str = "sgd"  # "sgd" (with momentum) or "adam"
    lr: float = 0.01  # base learning rate η
    momentum: float = 0.9  # SGD momentum μ
    weight_decay: float = 0.0  # L2 coefficient λ, added to the gradient of weights and biases
    betas: tuple[float, float] = (0.9, 0.999)  # Adam β1, β2
    eps: float = 1e-8  # Adam ε
    schedule: str = "hinton"  # "constant" or "hinton"

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be a positive finite number, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        b1, b2 = self.betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"Adam betas must lie in [0, 1), got {self.betas}")

    def state_names(self) -> tuple[str, ...]:
        """Names of the per-parameter state tensors this optimizer keeps."""
        return ("momentum",) if self.name == "sgd" else ("exp_avg", "exp_avg_sq")


def lr_at(cfg: OptimConfig, epoch: int, epochs: int) -> float:
    """The learning rate for 0-based ``epoch`` out of ``epochs``."""
    if cfg.schedule == "constant":
        return cfg.lr
    return cfg.lr * min(1.0, 2.0 * (epochs - epoch) / epochs)


def init_state(cfg: OptimConfig, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zero-initialised optimizer state for one parameter tensor."""
    return {name: torch.zeros_like(param) for name in cfg.state_names()}


def update_(
    cfg: OptimConfig,
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, torch.Tensor],
    lr: float,
    step: int,
) -> None:
    """Apply one optimizer step to ``param`` in place; ``step`` counts from 1."""
    if cfg.weight_decay:
        grad = grad.add(param, alpha=cfg.weight_decay)
    if cfg.name == "sgd":
        buf = state["momentum"]
        buf.mul_(cfg.momentum).add_(grad)
        param.add_(buf, alpha=-lr)
        return
    beta1, beta2 = cfg.betas
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bias1 = 1.0 - beta1**step
    bias2 = 1.0 - beta2**step
    denom = (v.sqrt() / math.sqrt(bias2)).add_(cfg.eps)
    param.addcdiv_(m, denom, value=-lr / bias1)
