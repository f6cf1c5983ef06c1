"""Negative labels: never the true label; hard negatives follow the model's distribution."""

from __future__ import annotations

import torch

from ffkern import FFConfig, FFNetwork


def _net(seed: int = 0) -> FFNetwork:
    return FFNetwork(FFConfig(layers=(8,), seed=seed), in_features=20, num_classes=10)


def test_random_negatives_are_never_the_true_label_and_cover_the_rest():
    net = _net()
    labels = torch.randint(0, 10, (20000,), generator=torch.Generator().manual_seed(1))
    neg = net.sample_negative_labels(labels)
    assert neg.shape == labels.shape and neg.dtype == labels.dtype
    assert not torch.any(neg == labels)
    # Uniform over the 9 wrong labels: each (true, wrong) pair about 1/9 of its row.
    counts = torch.zeros(10, 10)
    counts.index_put_((labels, neg), torch.ones(len(labels)), accumulate=True)
    freq = counts / counts.sum(1, keepdim=True)
    off = ~torch.eye(10, dtype=torch.bool)
    assert torch.all((freq[off] - 1 / 9).abs() < 0.03)


def test_hard_negatives_follow_predicted_probabilities():
    net = _net()
    n = 40000
    labels = torch.zeros(n, dtype=torch.long)
    probs = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05, 0, 0, 0, 0, 0]).repeat(n, 1)
    neg = net.sample_negative_labels(labels, probs)
    assert not torch.any(neg == labels)
    freq = torch.bincount(neg, minlength=10).float() / n
    expected = torch.tensor([0, 0.6, 0.2, 0.1, 0.1, 0, 0, 0, 0, 0])
    # Binomial standard error at n = 40000 is at most 0.0025; 0.01 is four of them.
    assert torch.all((freq - expected).abs() < 0.01), freq


def test_hard_negatives_fall_back_to_uniform_when_all_mass_is_on_the_truth():
    net = _net()
    labels = torch.arange(10).repeat(300)
    probs = torch.nn.functional.one_hot(labels, 10).float()
    neg = net.sample_negative_labels(labels, probs)
    assert not torch.any(neg == labels)
    assert len(torch.unique(neg)) == 10


def test_label_embedding_writes_one_hot_and_neutral_codes():
    net = FFNetwork(FFConfig(layers=(4,), label_scale=2.0), in_features=15, num_classes=5)
    x = torch.rand(3, 15) + 0.5
    pos = net.embed(x, torch.tensor([0, 4, 2]))
    assert torch.equal(pos[:, 5:], x[:, 5:])
    assert torch.equal(pos[:, :5], 2.0 * torch.eye(5)[[0, 4, 2]])
    neutral = net.embed(x, None)
    assert torch.allclose(neutral[:, :5], torch.full((3, 5), 0.4))
    assert torch.equal(x[:, :5] >= 0.5, torch.ones(3, 5, dtype=torch.bool))  # input untouched
