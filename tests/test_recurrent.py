"""The recurrent FF network: its layer loss and whole-run gradients against autograd, its
dynamics against a straightforward re-implementation, and which iterations predict.

Autograd is only the oracle. The whole-network checks run with float64 as torch's default
dtype, so the network itself computes in float64 and agrees with the oracle to 1e-10.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from oracles import GRAD_RTOL, oracle_loss, oracle_peer, rel_err

from ffkern import FFConfig
from ffkern.model import build_network
from ffkern.reference import LayerObjective
from ffkern.variants.recurrent import RecurrentFFNetwork, recurrent_layer_step


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests run many tiny matrix products, which torch's thread pool only slows down
    (100x on a busy 2-core machine); the previous setting is restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def rms_normalize(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt((v * v).mean(1, keepdim=True) + 1e-8)


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# ------------------------------------------------------------------------------------------------
# One layer at one iteration: both input streams
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["logistic", "reversed", "symba"])
@pytest.mark.parametrize("goodness", ["sum", "mean"])
@pytest.mark.parametrize("peer", [0.0, 0.03])
@pytest.mark.parametrize(("n", "k_below", "k_above", "d"), [(2, 3, 4, 5), (40, 33, 10, 17)])
def test_layer_gradients_match_autograd(objective, goodness, peer, n, k_below, k_above, d):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((objective, goodness, peer, n)).encode()))
    dt = torch.float64
    below = rms_normalize(torch.randn(n, k_below, generator=gen, dtype=dt))
    above = rms_normalize(torch.randn(n, k_above, generator=gen, dtype=dt))
    w_up = torch.randn(d, k_below, generator=gen, dtype=dt) / (k_below + k_above) ** 0.5
    w_down = torch.randn(d, k_above, generator=gen, dtype=dt) / (k_below + k_above) ** 0.5
    # A positive bias keeps most units alive even with 2 rows and 3 units (no zero fixture).
    b = 0.5 + 0.1 * torch.randn(d, generator=gen, dtype=dt)
    peer_mean = torch.rand(d, generator=gen, dtype=dt)
    h0 = torch.relu(below @ w_up.t() + above @ w_down.t() + b)
    g0 = (h0 * h0).sum(1) if goodness == "sum" else (h0 * h0).mean(1)
    obj = LayerObjective(
        goodness=goodness,
        threshold=float(g0.median()),
        peer_strength=peer,
        objective=objective,
        symba_alpha=2.0,
    )
    n_pos = n // 2

    res = recurrent_layer_step(w_up, w_down, b, below, above, n_pos, obj, peer_mean)

    u = w_up.clone().requires_grad_()
    v = w_down.clone().requires_grad_()
    bb = b.clone().requires_grad_()
    h = torch.relu(below @ u.t() + above @ v.t() + bb)
    loss = oracle_loss(h, n_pos, obj)
    peer_loss, new_mean = oracle_peer(h, n_pos, obj, peer_mean)
    (loss + peer_loss).backward()
    assert rel_err(res.loss, loss.detach()) <= 1e-12
    assert res.dw_down.abs().max() > 1e-8, "degenerate fixture: no top-down gradient"
    assert rel_err(res.dw_up, u.grad) <= GRAD_RTOL
    assert rel_err(res.dw_down, v.grad) <= GRAD_RTOL
    assert rel_err(res.db, bb.grad) <= GRAD_RTOL
    assert torch.allclose(res.peer_mean, new_mean, rtol=1e-12, atol=0)


def test_layer_rejects_mismatched_streams():
    with pytest.raises(ValueError, match="same rows, got 4 and 3"):
        recurrent_layer_step(
            torch.zeros(2, 3), torch.zeros(2, 1), torch.zeros(2), torch.zeros(4, 3),
            torch.zeros(3, 1), 2, LayerObjective(), torch.zeros(2),
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# The whole run: dynamics and accumulated gradients
# ------------------------------------------------------------------------------------------------


def oracle_run(net: RecurrentFFNetwork, x, codes, n_pos, obj, iterations, damping):
    """A straightforward re-implementation of a training run, with autograd for gradients.

    Returns the goodness (T, L, N) of iterations 1..T, the per-layer mean losses and the
    autograd gradients of ``(1/T) Σ_t Σ_l (L_l^t + L_peer)`` for each [U | V] and b.
    """
    n_layers = len(net.layers)
    weights = [layer.weight.clone().requires_grad_() for layer in net.layers]
    biases = [layer.bias.clone().requires_grad_() for layer in net.layers]
    means = [layer.peer_mean.clone() for layer in net.layers]
    kb = [net.below_width(i) for i in range(n_layers)]
    image, top = rms_normalize(x), rms_normalize(codes)
    # Iteration 0: bottom-up only.
    states, below = [], image
    for i in range(n_layers):
        s = torch.relu(below @ weights[i][:, : kb[i]].t() + biases[i]).detach()
        states.append(s)
        below = rms_normalize(s)
    total = 0.0
    goods = torch.zeros(iterations, n_layers, x.shape[0])
    losses = torch.zeros(n_layers)
    for t in range(iterations):
        ys = [image, *[rms_normalize(s) for s in states], top]  # all from step t - 1
        new_states = []
        for i in range(n_layers):
            below, above = ys[i], ys[i + 2]
            z = below @ weights[i][:, : kb[i]].t() + above @ weights[i][:, kb[i] :].t()
            h = torch.relu(z + biases[i])
            goods[t, i] = (h * h).sum(1).detach()
            loss = oracle_loss(h, n_pos, obj)
            peer_loss, means[i] = oracle_peer(h, n_pos, obj, means[i])
            total = total + (loss + peer_loss) / iterations
            losses[i] += loss.detach() / iterations
            new_states.append(damping * states[i] + (1 - damping) * h.detach())
        states = new_states
    total.backward()
    return goods, losses, [w.grad for w in weights], [b.grad for b in biases]


@pytest.mark.parametrize("objective", ["logistic", "symba"])
@pytest.mark.parametrize("peer", [0.0, 0.03])
def test_training_run_matches_autograd(float64_default, objective, peer):
    iterations, damping = 4, 0.3
    cfg = FFConfig(
        layers=(9, 7, 6),
        model="recurrent",
        negatives="random",
        softmax_head=False,
        objective=objective,
        symba_alpha=1.0,
        peer_strength=peer,
        momentum=0.0,
        schedule="constant",
        extra={"recurrent.iterations": iterations, "recurrent.score_last": 4},
    )
    net = build_network(cfg, 20, 5, seed=3)
    assert isinstance(net, RecurrentFFNetwork)
    assert [layer.weight.shape for layer in net.layers] == [(9, 27), (7, 15), (6, 12)]
    gen = torch.Generator().manual_seed(4)
    for layer in net.layers:
        layer.bias = 0.3 * torch.randn(layer.bias.shape, generator=gen)
        layer.peer_mean = torch.rand(layer.peer_mean.shape, generator=gen)
    x = torch.rand(6, 20, generator=gen) + 0.1
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    neg = torch.tensor([1, 0, 3, 4, 0, 2])
    codes = torch.cat([torch.eye(5)[labels], torch.eye(5)[neg]])
    batch = torch.cat([x, x])
    obj = cfg.layer_objective()

    goods, losses, dws, dbs = oracle_run(net, batch, codes, 6, obj, iterations, damping)
    trace, _ = net.run(batch, codes, iterations)
    before = [(layer.weight.clone(), layer.bias.clone()) for layer in net.layers]
    out = net.train_layers(batch, 6, 1.0, codes=codes)  # SGD, no momentum, lr 1: Δp = -grad

    assert rel_err(trace, goods) <= 1e-12
    assert rel_err(out, losses) <= 1e-12
    for i, layer in enumerate(net.layers):
        w0, b0 = before[i]
        assert dws[i][:, net.below_width(i) :].abs().max() > 1e-8
        assert rel_err(w0 - layer.weight, dws[i]) <= GRAD_RTOL, f"layer {i} weight"
        assert rel_err(b0 - layer.bias, dbs[i]) <= GRAD_RTOL, f"layer {i} bias"
        assert layer.step == 1


def test_frozen_layer_is_not_updated(float64_default):
    cfg = FFConfig(
        layers=(8, 8), model="recurrent", negatives="random", softmax_head=False, freeze=(1,)
    )
    net = build_network(cfg, 16, 4)
    w = [layer.weight.clone() for layer in net.layers]
    net.train_step(torch.rand(5, 16) + 0.1, torch.arange(5) % 4, 0.1)
    assert torch.equal(net.layers[0].weight, w[0])
    assert not torch.equal(net.layers[1].weight, w[1])


# ------------------------------------------------------------------------------------------------
# Prediction: which iterations count
# ------------------------------------------------------------------------------------------------


def recurrent_net(**extra) -> RecurrentFFNetwork:
    cfg = FFConfig(layers=(12, 10), model="recurrent", extra=extra)
    net = build_network(cfg, 16, 4, seed=0)
    assert isinstance(net, RecurrentFFNetwork)
    return net


def constructed_trace(b: int) -> torch.Tensor:
    """(8, B, 4) goodness: label 1 wins at iterations 3-5, label 3 by far at all others."""
    trace = torch.zeros(8, b, 4)
    trace[:, :, 3] = 100.0
    trace[2:5, :, 3] = 0.0
    trace[2:5, :, 1] = 1.0
    return trace


def test_prediction_averages_exactly_iterations_3_to_5(monkeypatch):
    net = recurrent_net()
    calls = []

    def fake_trace(x, iterations=None):
        calls.append(iterations)
        return constructed_trace(x.shape[0])[: iterations or 8]

    monkeypatch.setattr(net, "goodness_trace", fake_trace)
    x = torch.rand(7, 16)
    assert net.predict(x, "goodness").tolist() == [1] * 7
    assert calls == [5], "iterations after 5 cannot matter and should not be computed"
    scores = net.goodness_scores(x)
    assert torch.equal(scores, constructed_trace(7)[2:5].mean(0))


@pytest.mark.parametrize(("first", "last", "label"), [(1, 5, 3), (3, 6, 3), (4, 4, 1)])
def test_scored_iterations_follow_the_settings(monkeypatch, first, last, label):
    net = recurrent_net(**{"recurrent.score_first": first, "recurrent.score_last": last})
    monkeypatch.setattr(
        net, "goodness_trace", lambda x, iterations=None: constructed_trace(x.shape[0])
    )
    assert net.predict(torch.rand(3, 16), "goodness").tolist() == [label] * 3


def test_reversed_recurrent_picks_the_lowest_score(monkeypatch):
    cfg = FFConfig(layers=(12, 10), model="recurrent", objective="reversed")
    net = build_network(cfg, 16, 4)
    trace = -constructed_trace(2)
    monkeypatch.setattr(net, "goodness_trace", lambda x, iterations=None: trace)
    assert net.predict(torch.rand(2, 16), "goodness").tolist() == [1, 1]


def test_scores_are_the_mean_of_the_real_trace():
    net = recurrent_net()
    x = torch.rand(5, 16) + 0.1
    full = net.goodness_trace(x)
    assert full.shape == (8, 5, 4)
    torch.testing.assert_close(net.goodness_scores(x), full[2:5].mean(0), rtol=1e-6, atol=0)
    # The label at the top does change the goodness (the top-down path is live).
    assert (full[2:5].std(dim=2) > 0).all()


def test_recurrent_api_and_errors():
    net = recurrent_net()
    x = torch.rand(4, 16)
    assert torch.equal(net.embed(x, torch.zeros(4, dtype=torch.long)), x)
    assert net.features(x).shape == (4, 22)
    assert net.head_weight.shape == (4, 22)
    with pytest.raises(TypeError, match="no single feedforward pass"):
        net.forward_layers(x)
    with pytest.raises(ValueError, match="trains all layers together"):
        net.train_step(x, torch.arange(4), 0.01, active=0)
    with pytest.raises(ValueError, match=r"codes must be \(8, 4\)"):
        net.train_layers(torch.cat([x, x]), 4, 0.01)
    with pytest.raises(ValueError, match="needs model='recurrent'"):
        RecurrentFFNetwork(FFConfig(), 16, 4)
    state = net.state_dict()
    other = recurrent_net()
    other.load_state_dict(state)
    assert torch.equal(other.predict(x), net.predict(x))


def test_recurrent_learns_on_digits():
    """Guard that the dynamics train: a few epochs on digits beat chance clearly."""
    from ffkern import Trainer, load_dataset

    cfg = FFConfig(
        layers=(64, 64), model="recurrent", epochs=3, optimizer="adam", lr=0.003,
        train_eval_samples=100, extra={"recurrent.iterations": 6},
    )  # fmt: skip
    history = Trainer(cfg, load_dataset("digits"), backend="reference", progress=False).fit()
    # Chance is 10%; seeds 0-2 reach 40-57% here.
    assert history.history[-1]["test_acc"] > 0.25
