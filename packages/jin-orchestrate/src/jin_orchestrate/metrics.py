"""Retrieval, zero-shot and linear-probe metrics on embeddings (pure torch, no model code).

# N queries, M candidates, D width
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "ProbeResult",
    "class_prototypes",
    "linear_probe_accuracy",
    "recall_at_k",
    "zero_shot_accuracy",
]


def recall_at_k(
    query_ND: torch.Tensor,
    candidate_MD: torch.Tensor,
    query_labels_N: torch.Tensor,
    candidate_labels_M: torch.Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict[int, float]:
    """Share of queries with a candidate of the same label among their top-k by cosine similarity.

    With one candidate per label (a 100-way pool of class prototypes) this is the retrieval recall
    of the paper's Table 3; with instance-level pools any same-label candidate counts as a hit.
    """
    if query_ND.shape[0] == 0:
        raise ValueError("recall_at_k: no queries")
    sim_NM = query_ND @ candidate_MD.T
    k_max = min(max(ks), candidate_MD.shape[0])
    top_NK = sim_NM.topk(k_max, dim=1).indices
    hit_NK = candidate_labels_M[top_NK] == query_labels_N[:, None]
    return {k: hit_NK[:, : min(k, k_max)].any(dim=1).float().mean().item() for k in ks}


def class_prototypes(
    emb_ND: torch.Tensor, labels_N: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean embedding per label, re-normalised: the candidate pool with one item per class."""
    classes = labels_N.unique(sorted=True)
    onehot_CN = (labels_N[None, :] == classes[:, None]).to(emb_ND.dtype)
    proto_CD = onehot_CN @ emb_ND / onehot_CN.sum(1, keepdim=True)
    return torch.nn.functional.normalize(proto_CD, dim=-1), classes


def zero_shot_accuracy(
    emb_ND: torch.Tensor,
    labels_N: torch.Tensor,
    class_emb_CD: torch.Tensor,
    class_labels_C: torch.Tensor,
    ks: tuple[int, ...] = (1, 5),
) -> dict[int, float]:
    """CLIP-style zero-shot classification: nearest class text embedding, top-k accuracy."""
    return recall_at_k(emb_ND, class_emb_CD, labels_N, class_labels_C, ks)


@dataclass(frozen=True)
class ProbeResult:
    """Linear-probe accuracy on the test samples whose class the probe was trained on."""

    accuracy: float
    samples: int
    classes: int


def linear_probe_accuracy(
    train_ND: torch.Tensor,
    train_labels_N: torch.Tensor,
    test_MD: torch.Tensor,
    test_labels_M: torch.Tensor,
    *,
    weight_decay: float = 1e-3,
    max_iter: int = 200,
) -> ProbeResult:
    """Top-1 accuracy of a multinomial logistic regression on frozen features (paper Table 5).

    The probe is fitted full-batch with L-BFGS on standardised train features, as CLIP's and
    I-JEPA's linear evaluations do (a convex problem: the same data give the same probe; weights
    start at zero, so nothing random is involved). Test samples of classes absent from the train
    split cannot be predicted by any probe and are left out; ``samples`` says how many remained.
    """
    classes = train_labels_N.unique(sorted=True)
    if classes.numel() < 2:
        raise ValueError(f"linear probe: need at least 2 classes in train, got {classes.tolist()}")
    keep = torch.isin(test_labels_M, classes)
    if not keep.any():
        raise ValueError("linear probe: no test sample has a class seen in train")
    mean, std = train_ND.mean(0), train_ND.std(0).clamp(min=1e-6)
    x_train = ((train_ND - mean) / std).double()
    x_test = ((test_MD[keep] - mean) / std).double()
    y_train = torch.searchsorted(classes, train_labels_N)
    y_test = torch.searchsorted(classes, test_labels_M[keep])
    weight = torch.zeros(x_train.shape[1], classes.numel(), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes.numel(), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x_train @ weight + bias, y_train)
        loss = loss + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = (x_test @ weight + bias).argmax(dim=1)
    return ProbeResult(
        accuracy=(pred == y_test).double().mean().item(),
        samples=int(keep.sum()),
        classes=int(classes.numel()),
    )
