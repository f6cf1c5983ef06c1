"""Closed-form reference gradients against torch.autograd, an independent oracle (tests only)."""

from __future__ import annotations

import zlib

import pytest
import torch
from oracles import oracle_loss, oracle_peer, rel_err

from ffkern import reference
from ffkern.reference import LayerObjective

SHAPES = [(1, 5, 3), (7, 33, 17), (130, 10, 64), (2, 1, 1)]  # (N rows, K in, D out)


def autograd_layer_loss(w, b, x, scale, n_pos, obj, peer_mean):
    """The same local loss written with autograd ops: L_ff + L_peer (stopped coefficient)."""
    z = (x * scale[:, None]) @ w.t() + b
    h = torch.relu(z)
    loss = oracle_loss(h, n_pos, obj)
    return loss, loss + oracle_peer(h, n_pos, obj, peer_mean)[0], z


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("goodness", ["sum", "mean"])
@pytest.mark.parametrize("peer", [0.0, 0.03])
@pytest.mark.parametrize("norm", ["rms", "l2"])
def test_layer_gradients_match_autograd(shape, goodness, peer, norm):
    n, k, d = shape
    # crc32 of the case's name: a fixed seed per case (hash() of a str changes between runs).
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, goodness, peer, norm)).encode()))
    dt = torch.float64
    x = torch.randn(n, k, generator=gen, dtype=dt)
    # A threshold near the typical goodness keeps both branches of the loss in play.
    obj = LayerObjective(
        goodness=goodness, threshold=None, temperature=0.7, norm=norm, peer_strength=peer
    )
    scale = reference.norm_scale(x, norm, obj.norm_eps)
    w = torch.randn(d, k, generator=gen, dtype=dt) / k**0.5
    b = 0.1 * torch.randn(d, generator=gen, dtype=dt)
    peer_mean = torch.rand(d, generator=gen, dtype=dt)
    n_pos = (n + 1) // 2

    res = reference.layer_step(w, b, x, scale, n_pos, obj, peer_mean)

    wa, ba = w.clone().requires_grad_(), b.clone().requires_grad_()
    loss, total, z = autograd_layer_loss(wa, ba, x, scale, n_pos, obj, peer_mean)
    z.retain_grad()
    total.backward()
    assert rel_err(res.loss, loss.detach()) <= 1e-12
    assert rel_err(res.dz, z.grad) <= 1e-10
    assert rel_err(res.dw, wa.grad) <= 1e-10
    assert rel_err(res.db, ba.grad) <= 1e-10
    assert torch.allclose(res.out_scale, reference.norm_scale(res.h, norm, obj.norm_eps))


def test_gradients_are_not_trivially_zero():
    """Guard: the fixture really exercises both loss branches and non-zero gradients."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 20, generator=gen, dtype=torch.float64)
    obj = LayerObjective()
    w = torch.randn(30, 20, generator=gen, dtype=torch.float64) / 20**0.5
    res = reference.layer_step(
        w,
        torch.zeros(30, dtype=torch.float64),
        x,
        reference.norm_scale(x, "rms", 1e-8),
        32,
        obj,
        torch.zeros(30, dtype=torch.float64),
    )
    assert res.dw.abs().max() > 1e-6
    assert (res.coef[:32] < 0).all() and (res.coef[32:] > 0).all()


def test_softmax_head_gradients_match_autograd():
    gen = torch.Generator().manual_seed(1)
    dt = torch.float64
    feats = torch.randn(9, 13, generator=gen, dtype=dt)
    labels = torch.randint(0, 4, (9,), generator=gen)
    w = torch.randn(4, 13, generator=gen, dtype=dt, requires_grad=True)
    b = torch.randn(4, generator=gen, dtype=dt, requires_grad=True)
    loss, p, dw, db = reference.softmax_head_grads(w.detach(), b.detach(), feats, labels)
    ref = torch.nn.functional.cross_entropy(feats @ w.t() + b, labels)
    ref.backward()
    assert rel_err(loss, ref.detach()) <= 1e-12
    assert rel_err(dw, w.grad) <= 1e-10
    assert rel_err(db, b.grad) <= 1e-10
    assert torch.allclose(p.sum(1), torch.ones(9, dtype=dt))


def test_objective_rejects_bad_values():
    with pytest.raises(ValueError, match="goodness must be one of"):
        LayerObjective(goodness="max")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        LayerObjective(temperature=0.0)
    with pytest.raises(ValueError, match="norm must be one of"):
        LayerObjective(norm="batch")
