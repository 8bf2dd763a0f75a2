"""Metric code on embeddings built to have known answers: perfect, shuffled, random."""

import torch

from jin_orchestrate.metrics import class_prototypes, recall_at_k, zero_shot_accuracy


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
