"""Metric code on embeddings built to have known answers: perfect, shuffled, random."""

import pytest
import torch

from jin_orchestrate.metrics import (
    ProbeResult,
    class_prototypes,
    linear_probe_accuracy,
    recall_at_k,
    zero_shot_accuracy,
)


def _unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


def test_perfect_embeddings_score_one():
    g = torch.Generator().manual_seed(0)
    emb = _unit(torch.randn(100, 32, generator=g))
    labels = torch.arange(100)
    assert recall_at_k(emb, emb, labels, labels) == {1: 1.0, 5: 1.0, 10: 1.0}


def test_shuffled_candidates_score_by_construction():
    g = torch.Generator().manual_seed(1)
    emb = _unit(torch.randn(100, 64, generator=g))
    labels = torch.arange(100)
    # Candidates are the same vectors, but their labels are rotated by one: every top-1 is wrong,
    # and the right label is never retrieved because its vector is orthogonal-ish to the query.
    r = recall_at_k(emb, emb, labels, labels.roll(1), ks=(1,))
    assert r[1] == 0.0


def test_random_embeddings_are_near_chance():
    g = torch.Generator().manual_seed(2)
    q = _unit(torch.randn(2000, 64, generator=g))
    c = _unit(torch.randn(100, 64, generator=g))
    labels_q = torch.randint(0, 100, (2000,), generator=g)
    r = recall_at_k(q, c, labels_q, torch.arange(100))
    assert abs(r[1] - 0.01) < 0.01
    assert abs(r[10] - 0.10) < 0.03


def test_prototypes_and_zero_shot():
    g = torch.Generator().manual_seed(3)
    centres = _unit(torch.randn(5, 16, generator=g))
    labels = torch.arange(5).repeat_interleave(4)
    samples = _unit(centres[labels] + 0.05 * torch.randn(20, 16, generator=g))
    protos, classes = class_prototypes(samples, labels)
    assert torch.equal(classes, torch.arange(5))
    assert torch.allclose(protos, centres, atol=0.1)
    acc = zero_shot_accuracy(samples, labels, centres, torch.arange(5), ks=(1,))
    assert acc[1] == 1.0


def test_linear_probe_separable_clusters_score_one():
    g = torch.Generator().manual_seed(4)
    centres = 5 * torch.randn(10, 16, generator=g)
    y_train = torch.arange(10).repeat(20)
    y_test = torch.arange(10).repeat(5)
    x_train = centres[y_train] + torch.randn(200, 16, generator=g)
    x_test = centres[y_test] + torch.randn(50, 16, generator=g)
    probe = linear_probe_accuracy(x_train, y_train, x_test, y_test)
    assert probe == ProbeResult(accuracy=1.0, samples=50, classes=10)


def test_linear_probe_on_random_or_shuffled_labels_is_near_chance():
    g = torch.Generator().manual_seed(5)
    centres = 5 * torch.randn(10, 16, generator=g)
    y = torch.arange(10).repeat(100)
    x = centres[y] + torch.randn(1000, 16, generator=g)
    shuffled = y[torch.randperm(1000, generator=g)]
    # Train on shuffled labels: the features carry no information about them.
    probe = linear_probe_accuracy(x[:500], shuffled[:500], x[500:], shuffled[500:])
    assert probe.accuracy < 0.2
    noise = torch.randn(1000, 16, generator=g)
    assert linear_probe_accuracy(noise[:500], y[:500], noise[500:], y[500:]).accuracy < 0.2


def test_linear_probe_leaves_out_unseen_classes_and_rejects_degenerate_input():
    x = torch.eye(4).repeat(3, 1)
    y = torch.tensor([0, 1, 2, 3] * 3)
    probe = linear_probe_accuracy(x, y, torch.eye(4), torch.tensor([0, 1, 7, 8]))
    assert probe.samples == 2 and probe.accuracy == 1.0
    with pytest.raises(ValueError, match="at least 2 classes"):
        linear_probe_accuracy(x, torch.zeros(12, dtype=torch.long), x, y)
    with pytest.raises(ValueError, match="no test sample"):
        linear_probe_accuracy(x, y, x[:2], torch.tensor([9, 9]))
