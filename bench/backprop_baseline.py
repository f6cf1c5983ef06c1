r"""BASELINE, not part of ffkern: ordinary backpropagation training of the same MLP.

The benchmark uses this to put Forward-Forward's cost in context: the same stack of
``nn.Linear`` + ReLU layers, plus a linear softmax head of ``C`` classes, trained end to end with
cross-entropy and ``torch.optim.SGD`` with momentum::

    h_0 = x,   h_l = relu(h_{l-1} W_lᵀ + b_l)     l = 1 .. L
    p   = softmax(h_L W_headᵀ + b_head)
    L   = -(1/B) Σ_i log p_{i, y_i}

A backprop step on ``B`` samples runs every layer's forward (``2 B d_in d_out`` FLOPs), its
weight gradient (the same again) and its input gradient (the same again): ``6 B Σ d_in d_out``,
the sum running over the hidden layers and the head. The input of the first layer needs no
gradient, which autograd notices, so the exact count is ``2 B d_0 d_1`` lower; the benchmark
uses the exact count (:func:`backprop_flops`).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn


def backprop_flops(batch: int, in_features: int, layers: Sequence[int], num_classes: int) -> int:
    """FLOPs of one backprop step: ``6 B Σ d_in d_out - 2 B d_0 d_1`` (no first input grad)."""
    widths = (in_features, *layers, num_classes)
    pairs = sum(d_in * d_out for d_in, d_out in pairwise(widths))
    return 6 * batch * pairs - 2 * batch * widths[0] * widths[1]


class BackpropMLP:
    """An MLP with a softmax head, trained by backpropagation (the benchmark's context row)."""

    def __init__(
        self,
        layers: Sequence[int],
        in_features: int,
        num_classes: int,
        *,
        lr: float = 0.01,
        momentum: float = 0.9,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        if not layers:
            raise ValueError("layers must name at least one layer width, got an empty sequence")
        torch.manual_seed(seed)
        widths = (in_features, *layers)
        modules: list[nn.Module] = []
        for d_in, d_out in pairwise(widths):
            modules += [nn.Linear(d_in, d_out), nn.ReLU()]
        modules.append(nn.Linear(widths[-1], num_classes))
        self.model = nn.Sequential(*modules).to(torch.device(device))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float | None = None) -> torch.Tensor:
        """One SGD step on images ``x`` (B, K) with labels ``y`` (B,); the loss, detached."""
        if lr is not None:
            for group in self.opt.param_groups:
                group["lr"] = lr
        loss = F.cross_entropy(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()
