"""The backend seam: one Forward-Forward layer step behind a small interface.

A backend owns the arithmetic of a layer: the forward pass on positives and negatives together,
the local loss, its closed-form gradient and the parameter update. The trainer only moves
:class:`Activations` from layer to layer, so a fused implementation can replace the reference
one without the trainer changing.

Activations travel as an unnormalized matrix plus a per-row scale, ``x̂ = scale ⊙ x``, so a
fused backend can fold the previous layer's length normalization into its own matrix product
instead of writing the normalized copy to memory.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch

from ffkern.optim import OptimConfig
from ffkern.reference import LayerObjective, Reduce


@dataclass
class Activations:
    """A layer input: the rows ``scale[:, None] * x`` (N, K)."""

    x: torch.Tensor  # (N, K) float32 (or bfloat16 for a reduced-precision backend)
    scale: torch.Tensor  # (N,) float32 per-row normalization factor

    def normalized(self) -> torch.Tensor:
        """The normalized rows as one float32 matrix (materializes a copy)."""
        return self.x.float() * self.scale[:, None]

    def rows(self, sl: slice) -> Activations:
        """The rows ``sl`` of these activations."""
        return Activations(self.x[sl], self.scale[sl])


@dataclass
class FFLayer:
    """Parameters and training state of one FF layer (float32 master copies)."""

    weight: torch.Tensor  # (D, K)
    bias: torch.Tensor  # (D,)
    peer_mean: torch.Tensor  # (D,) running mean activity per unit over positive rows
    opt_state: dict[str, torch.Tensor] = field(default_factory=dict)  # "weight.momentum", ...
    step: int = 0  # updates applied so far (Adam's t after the next update is step + 1)
    frozen: bool = False  # a frozen layer is evaluated but never updated

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def state_dict(self) -> dict[str, object]:
        return {
            "weight": self.weight,
            "bias": self.bias,
            "peer_mean": self.peer_mean,
            "opt_state": dict(self.opt_state),
            "step": self.step,
            "frozen": self.frozen,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, object], device: torch.device) -> FFLayer:
        opt = {k: v.to(device) for k, v in state["opt_state"].items()}  # type: ignore[union-attr]
        return cls(
            weight=state["weight"].to(device),  # type: ignore[union-attr]
            bias=state["bias"].to(device),  # type: ignore[union-attr]
            peer_mean=state["peer_mean"].to(device),  # type: ignore[union-attr]
            opt_state=opt,
            step=int(state["step"]),  # type: ignore[arg-type]
            frozen=bool(state["frozen"]),
        )


@dataclass
class StepOutput:
    """What a layer step returns to the trainer (computed with the pre-update parameters)."""

    loss: torch.Tensor  # () float32 mean local loss; stays on the device (no host sync)
    goodness: torch.Tensor  # (N,) float32
    out: Activations  # input of the next layer


class Backend(abc.ABC):
    """One FF layer's forward and training step."""

    name: str = "abstract"

    def normalize(self, x: torch.Tensor, obj: LayerObjective) -> Activations:
        """The first layer's input: raw rows ``x`` (N, K) with their normalization scale."""
        from ffkern.reference import norm_scale

        return Activations(x, norm_scale(x, obj.norm, obj.norm_eps))

    @abc.abstractmethod
    def forward(
        self, layer: FFLayer, inp: Activations, obj: LayerObjective
    ) -> tuple[torch.Tensor, Activations]:
        """Goodness (N,) and the next layer's input, with no update."""

    @abc.abstractmethod
    def step(
        self,
        layer: FFLayer,
        inp: Activations,
        n_pos: int,
        obj: LayerObjective,
        opt: OptimConfig,
        lr: float,
        reduce: Reduce | None = None,
    ) -> StepOutput:
        """Forward, loss, gradient and one optimizer update of ``layer`` in place.

        The first ``n_pos`` rows of ``inp`` are positive, the rest negative. The update uses
        learning rate ``lr`` and increments ``layer.step``; the peer running mean is updated
        when ``obj.peer_strength > 0``. A frozen layer gets the forward only.

        ``reduce`` (data parallelism) averages a tensor over ranks. When given, it is applied
        to the batch's mean positive activity (before the peer running mean is updated) and to
        ``dW`` and ``db`` (before the update), so every rank applies the same update as one
        process would on the whole minibatch. A fused backend then has to materialize ``dW``.
        """

    def describe(self) -> str:
        """One line naming the backend and its precision, for logs."""
        return self.name
