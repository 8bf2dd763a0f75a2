"""Retrieval and zero-shot metrics on L2-normalised embeddings (pure torch, no model code).

# N queries, M candidates, D width
"""

from __future__ import annotations

import torch

__all__ = ["class_prototypes", "recall_at_k", "zero_shot_accuracy"]


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
