"""The ``reference`` backend: the closed-form maths of :mod:`ffkern.reference`, unfused."""

from __future__ import annotations

import torch

from ffkern import optim, reference
from ffkern.backends.base import Activations, Backend, FFLayer, StepOutput
from ffkern.optim import OptimConfig
from ffkern.reference import LayerObjective, Reduce


class ReferenceBackend(Backend):
    """Plain torch ops on any device; float32 (or whatever dtype the layer holds)."""

    name = "reference"

    def forward(
        self, layer: FFLayer, inp: Activations, obj: LayerObjective
    ) -> tuple[torch.Tensor, Activations]:
        _, h = reference.forward(layer.weight, layer.bias, inp.x, inp.scale)
        q = (h * h).sum(dim=1)
        g = q if obj.goodness == "sum" else q / h.shape[1]
        return g, Activations(h, reference.scale_from_sumsq(q, h.shape[1], obj.norm, obj.norm_eps))

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
        if layer.frozen:
            g, out = self.forward(layer, inp, obj)
            loss, _ = reference.loss_and_coef(g, n_pos, obj, layer.out_features)
            return StepOutput(loss=loss, goodness=g, out=out)
        res = reference.layer_step(
            layer.weight, layer.bias, inp.x, inp.scale, n_pos, obj, layer.peer_mean, reduce
        )
        layer.peer_mean = res.peer_mean
        dw, db = (res.dw, res.db) if reduce is None else (reduce(res.dw), reduce(res.db))
        apply_update(layer, dw, db, opt, lr)
        return StepOutput(
            loss=res.loss, goodness=res.goodness, out=Activations(res.h, res.out_scale)
        )


def ensure_opt_state(layer: FFLayer, opt: OptimConfig) -> None:
    """Create zero optimizer state for ``layer`` if it has none for ``opt``."""
    for pname in ("weight", "bias"):
        for sname in opt.state_names():
            key = f"{pname}.{sname}"
            if key not in layer.opt_state:  # allocate once, not on every step
                layer.opt_state[key] = torch.zeros_like(getattr(layer, pname))


def apply_update(
    layer: FFLayer, dw: torch.Tensor, db: torch.Tensor, opt: OptimConfig, lr: float
) -> None:
    """One optimizer step of the layer's weight and bias from their gradients."""
    ensure_opt_state(layer, opt)
    layer.step += 1
    for pname, grad in (("weight", dw), ("bias", db)):
        state = {s: layer.opt_state[f"{pname}.{s}"] for s in opt.state_names()}
        optim.update_(opt, getattr(layer, pname), grad, state, lr, layer.step)
