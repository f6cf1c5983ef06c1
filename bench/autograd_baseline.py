r"""BASELINE, not part of ffkern: Forward-Forward training the way public FF code is written.

This file exists only so the benchmark has something honest to compare ffkern against. It is
written the way Forward-Forward trainers are usually written: one ``torch.nn.Linear`` and a ReLU
per layer, the local loss assembled from autograd ops, one ``.backward()`` per layer on an input
that has been detached from the previous layer, and one ``torch.optim.SGD`` with momentum per
layer. It deliberately imports nothing from ffkern, so that the cross-check in
``tests/test_bench.py`` compares two independent implementations of the same algorithm.

The maths is ffkern's layer with peer normalization off and temperature 1. For a layer of ``D``
units fed ``N`` rows, of which the first ``n_pos`` are positive (``s_i = +1``) and the others
negative (``s_i = -1``)::

    x̂_i = x_i / sqrt(mean_k x_ik² + ε)     RMS normalization of the layer input
    h    = relu(x̂ Wᵀ + b)                   (N, D)
    g_i  = Σ_j h_ij²                         sum-of-squares goodness
    ℓ_i  = softplus(-s_i (g_i - θ)),  θ = D  threshold equal to the number of units
    L    = (1/N) Σ_i ℓ_i

``L`` is differentiated by autograd with respect to ``W`` and ``b`` only (the input is detached,
so no input gradient is computed), and SGD with momentum ``μ`` (PyTorch's convention: ``v = μ v
+ ∇``, ``p = p - η v``) updates the layer. The next layer receives ``h``, detached.

Positives and negatives go through each layer as one concatenated batch of ``2B`` rows. Public
code often runs two separate forwards; one batch does the same arithmetic with fewer kernel
launches, so it only makes the baseline stronger.

Negatives follow Hinton's supervised recipe: the first ``C`` input features are overwritten by
a one-hot label, the true label for a positive and a uniformly drawn wrong label for its
negative.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn


def overlay_labels(x: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A copy of ``x`` (B, K) whose first ``num_classes`` features hold ``one_hot(labels)``."""
    out = x.clone()
    out[:, :num_classes] = F.one_hot(labels, num_classes).to(x.dtype)
    return out


class AutogradFF:
    """A Forward-Forward MLP trained layer-locally with autograd (the benchmark's baseline)."""

    def __init__(
        self,
        layers: Sequence[int],
        in_features: int,
        num_classes: int,
        *,
        lr: float = 0.01,
        momentum: float = 0.9,
        eps: float = 1e-8,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        if not layers:
            raise ValueError("layers must name at least one layer width, got an empty sequence")
        if in_features < num_classes:
            raise ValueError(
                f"in_features ({in_features}) must be >= num_classes ({num_classes}) to hold "
                f"the one-hot label overlay"
            )
        self.device = torch.device(device)
        self.num_classes = num_classes
        self.eps = eps
        torch.manual_seed(seed)
        widths = (in_features, *layers)
        self.layers = [nn.Linear(d_in, d_out).to(self.device) for d_in, d_out in pairwise(widths)]
        self.opts = [
            torch.optim.SGD(layer.parameters(), lr=lr, momentum=momentum) for layer in self.layers
        ]
        self._gen = torch.Generator(device=self.device).manual_seed(seed + 1)

    def negatives(self, labels: torch.Tensor) -> torch.Tensor:
        """A wrong label for every row: ``(y + r) mod C`` with ``r`` uniform in ``1 .. C-1``."""
        shift = torch.randint(
            1, self.num_classes, labels.shape, device=labels.device, generator=self._gen
        )
        return (labels + shift) % self.num_classes

    def layer_step(
        self, index: int, inp: torch.Tensor, n_pos: int, lr: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Train layer ``index`` on ``inp`` (N, K) for one step; return ``(loss, h)`` detached.

        The first ``n_pos`` rows of ``inp`` are positive. ``loss`` is computed with the
        parameters before the update; ``h`` is the layer's output before the update too.
        """
        layer, opt = self.layers[index], self.opts[index]
        if lr is not None:
            for group in opt.param_groups:
                group["lr"] = lr
        x = inp.detach()
        x_hat = x / torch.sqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps)
        h = torch.relu(layer(x_hat))
        goodness = h.pow(2).sum(dim=1)
        sign = torch.ones_like(goodness)
        sign[n_pos:] = -1.0
        loss = F.softplus(-sign * (goodness - layer.out_features)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach(), h.detach()

    def train_step_on(
        self, inp: torch.Tensor, n_pos: int, lr: float | None = None
    ) -> list[torch.Tensor]:
        """One step of every layer on prepared rows ``inp`` (positives first); the losses."""
        losses = []
        h = inp
        for index in range(len(self.layers)):
            loss, h = self.layer_step(index, h, n_pos, lr)
            losses.append(loss)
        return losses

    def train_step(
        self, x: torch.Tensor, y: torch.Tensor, lr: float | None = None
    ) -> list[torch.Tensor]:
        """One FF step on images ``x`` (B, K) with labels ``y`` (B,): B positives, B negatives."""
        pos = overlay_labels(x, y, self.num_classes)
        neg = overlay_labels(x, self.negatives(y), self.num_classes)
        return self.train_step_on(torch.cat([pos, neg]), x.shape[0], lr)
