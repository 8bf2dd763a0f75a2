"""The dispatch plan: where each (token, expert) assignment goes in expert-sorted order.

Shapes: N tokens, K top-k, E experts, M kept assignments (``K*N`` when dropless).

Assignments are numbered k-major, ``a = k * N + n``, so that a stable sort by expert lists every
token's first choice before any second choice: with a capacity limit, overflow drops second
choices first (GShard / ST-MoE priority). Nothing here is ``(N, E, D)``-sized: the plan is a few
integer vectors, and tokens move once, by a gather of ``M`` rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DispatchPlan", "make_plan"]


@dataclass(frozen=True)
class DispatchPlan:
    """Integer bookkeeping shared by the PyTorch and CuPy dispatch paths.

    Attributes:
        source_token: ``(M,)`` int64, the token each expert-sorted row is gathered from.
        row_of_assignment: ``(K, N)`` int64, the sorted row of assignment ``(k, n)``, ``-1`` when
            the capacity limit dropped it.
        counts: host list of ``E`` ints, rows per expert after drops (expert ``e`` owns a
            contiguous slice).
        tokens_per_expert: ``(E,)`` int64, assignments per expert before drops.
        dropped: ``()`` int64, assignments dropped.
    """

    source_token: Tensor
    row_of_assignment: Tensor
    counts: list[int]
    tokens_per_expert: Tensor
    dropped: Tensor


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Switch's capacity ``ceil(capacity_factor * K * N / E)``: rows each expert may take."""
    return math.ceil(capacity_factor * top_k * num_tokens / num_experts)


def make_plan(
    experts_NK: Tensor, num_experts: int, capacity_factor: float | None = None
) -> DispatchPlan:
    """Sort the ``K*N`` assignments by expert (stable) and, optionally, drop over-capacity ones."""
    num_tokens, top_k = experts_NK.shape
    expert_A = experts_NK.t().reshape(-1)  # k-major: a = k * N + n
    order_A = torch.argsort(expert_A, stable=True)
    tokens_per_expert = torch.bincount(expert_A, minlength=num_experts)
    if capacity_factor is None:
        kept = order_A
        counts_E = tokens_per_expert
    else:
        capacity = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
        start_E = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
        rank_A = torch.arange(order_A.numel(), device=order_A.device) - start_E[expert_A[order_A]]
        kept = order_A[rank_A < capacity]
        counts_E = tokens_per_expert.clamp(max=capacity)
    row_of_assignment = torch.full_like(expert_A, -1)
    row_of_assignment[kept] = torch.arange(kept.numel(), device=kept.device)
    return DispatchPlan(
        source_token=kept % max(num_tokens, 1),
        row_of_assignment=row_of_assignment.view(top_k, num_tokens),
        counts=counts_E.tolist(),
        tokens_per_expert=tokens_per_expert,
        dropped=expert_A.new_tensor(expert_A.numel()) - kept.numel(),
    )
