"""The closed-form optimizers against torch.optim on the same gradients."""

from __future__ import annotations

import pytest
import torch

from ffkern import optim
from ffkern.optim import OptimConfig


def _run_both(cfg: OptimConfig, steps: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    grads = [torch.randn(7, 5, generator=gen, dtype=torch.float64) for _ in range(steps)]

    ours = p0.clone()
    state = optim.init_state(cfg, ours)
    for t, g in enumerate(grads, start=1):
        optim.update_(cfg, ours, g, state, cfg.lr, t)

    theirs = p0.clone().requires_grad_()
    if cfg.name == "sgd":
        opt = torch.optim.SGD(
            [theirs], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.Adam(
            [theirs], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    for g in grads:
        theirs.grad = g.clone()
        opt.step()
    return ours, theirs.detach()


@pytest.mark.parametrize("wd", [0.0, 0.01])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_matches_torch_optim(wd, momentum):
    cfg = OptimConfig(name="sgd", lr=0.1, momentum=momentum, weight_decay=wd)
    ours, theirs = _run_both(cfg)
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-14)
    assert not torch.equal(ours, _run_both(cfg, steps=0)[0])  # the steps did move p


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adam_matches_torch_optim(wd):
    cfg = OptimConfig(name="adam", lr=0.01, betas=(0.8, 0.95), weight_decay=wd)
    ours, theirs = _run_both(cfg, steps=7)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


def test_hinton_schedule_is_constant_then_linear():
    cfg = OptimConfig(lr=1.0, schedule="hinton")
    rates = [optim.lr_at(cfg, e, 10) for e in range(10)]
    assert rates[:6] == [1.0] * 6
    assert rates[6:] == pytest.approx([0.8, 0.6, 0.4, 0.2])
    assert optim.lr_at(OptimConfig(lr=0.3, schedule="constant"), 9, 10) == 0.3


def test_optim_config_rejects_bad_values():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        OptimConfig(name="rmsprop")
    with pytest.raises(ValueError, match="positive finite"):
        OptimConfig(lr=-1.0)
    with pytest.raises(ValueError, match="momentum must be in"):
        OptimConfig(momentum=1.0)
