"""The dispatch plan: where each (token, expert) assignment goes in expert-sorted order.

Shapes: N tokens, K top-k, E experts, M kept assignments (``K*N`` when dropless).

Assignments are numbered k-major, ``a = k * N + n``, so that a stable sort by expert lists every
token's first choice before any second choice: with a capacity limit, overflow drops second
choices first (GShard / ST-MoE priority). Nothing here is ``(N, E, D)``-sized: the plan is a few
integer vectors, and tokens move once, by a gather of ``M`` rows.

Two row layouts, both dropless:
- *ragged*: expert ``e`` owns ``counts[e]`` consecutive rows; experts run one matmul each, or
  all at once as one grouped GEMM reading ``offsets`` on the device.
- *padded*: every expert owns ``C = max(counts)`` rows (``M = E * C``), so all experts run as one
  batched matmul. Chosen only when it wastes little (``E * C <= max_padding * K * N``): one
  ``bmm`` is much faster than ``E`` small matmuls on CPU and avoids ``E`` kernel launches on GPU.
  Padding rows read token 0 and are never combined, so they get no gradient.
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
        counts: host list of ``E`` ints, assignments each expert runs on (after drops);
            ``None`` when the plan was made without a host copy (``host_counts=False``).
        offsets: ``(E,)`` int32 on the device, the end of each expert's rows in the ragged
            layout (``cumsum`` of the counts): what a grouped GEMM takes.
        padded_rows: ``C`` in the padded layout (expert ``e`` owns rows ``[e*C, e*C + C)``, of
            which the first ``counts[e]`` are real); ``None`` in the ragged layout (expert ``e``
            owns ``counts[e]`` rows after those of experts ``< e``).
        tokens_per_expert: ``(E,)`` int64, assignments per expert before drops.
        dropped: ``()`` int64, assignments dropped.
    """

    source_token: Tensor
    row_of_assignment: Tensor
    counts: list[int] | None
    offsets: Tensor
    padded_rows: int | None
    tokens_per_expert: Tensor
    dropped: Tensor

    @property
    def num_rows(self) -> int:
        """``M``, the number of expert-sorted rows (padding included)."""
        return self.source_token.numel()


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Switch's capacity ``ceil(capacity_factor * K * N / E)``: rows each expert may take."""
    return math.ceil(capacity_factor * top_k * num_tokens / num_experts)


def make_plan(
    experts_NK: Tensor,
    num_experts: int,
    capacity_factor: float | None = None,
    max_padding: float = 1.0,
    host_counts: bool = True,
) -> DispatchPlan:
    """Sort the ``K*N`` assignments by expert (stable), optionally drop over-capacity ones, and
    lay the rows out padded when that costs at most ``max_padding`` times the real rows.

    ``host_counts=False`` (for a grouped GEMM, which reads ``offsets`` on the device): the layout
    is ragged and the counts are not copied to the host, so a dropless plan never waits for the
    device (a capacity limit still does: the rows it keeps are data-dependent).
    """
    num_tokens, top_k = experts_NK.shape
    expert_A = experts_NK.t().reshape(-1)  # k-major: a = k * N + n
    order_A = torch.argsort(expert_A, stable=True)
    # A scatter-add rather than bincount, which on CUDA reads the largest index on the host.
    tokens_per_expert = expert_A.new_zeros(num_experts).scatter_add_(
        0, expert_A, torch.ones_like(expert_A)
    )
    start_E = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
    expert_sorted = expert_A[order_A]
    rank_sorted = torch.arange(order_A.numel(), device=order_A.device) - start_E[expert_sorted]
    if capacity_factor is None:
        kept, counts_E = order_A, tokens_per_expert
    else:
        capacity = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
        keep = rank_sorted < capacity
        kept, expert_sorted, rank_sorted = order_A[keep], expert_sorted[keep], rank_sorted[keep]
        counts_E = tokens_per_expert.clamp(max=capacity)
    # The one host sync of the per-expert and padded layouts: their matmul shapes depend on it.
    counts = counts_E.tolist() if host_counts else None
    num_kept = kept.numel()
    widest = max(counts, default=0) if counts is not None else 0
    padded = num_experts > 1 and 0 < num_experts * widest <= max_padding * num_kept
    if padded:
        rows_kept = expert_sorted * widest + rank_sorted
        source_token = torch.zeros(num_experts * widest, dtype=kept.dtype, device=kept.device)
        source_token[rows_kept] = kept % num_tokens
    else:
        rows_kept = torch.arange(num_kept, device=kept.device)
        source_token = kept % max(num_tokens, 1)
    row_of_assignment = torch.full_like(expert_A, -1)
    row_of_assignment[kept] = rows_kept
    return DispatchPlan(
        source_token=source_token,
        row_of_assignment=row_of_assignment.view(top_k, num_tokens),
        counts=counts,
        offsets=torch.cumsum(counts_E, 0).to(torch.int32),
        padded_rows=widest if padded else None,
        tokens_per_expert=tokens_per_expert,
        dropped=torch.full((), expert_A.numel() - num_kept, device=expert_A.device),
    )
