"""Feed-forward networks: the dense FFN and E experts stored stacked for grouped compute.

Shapes: N tokens, M expert-sorted (token, expert) rows, D width, H hidden, E experts.

One function, :func:`feed_forward`, computes an FFN from its weights; the dense block and each
expert call it, so the dense baseline and the experts are the same computation by construction.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Activation", "Experts", "FeedForward", "compute_dtype", "feed_forward"]

Activation = Literal["gelu", "swiglu"]


def feed_forward(x_ND: Tensor, w_in: Tensor, w_out: Tensor, activation: Activation) -> Tensor:
    """``act(x @ w_in) @ w_out``; for SwiGLU ``w_in`` is ``(D, 2H)``: gate and up fused.

    With stacked ``(E, C, D)`` inputs and ``(E, D, *)`` weights the matmuls are batched per expert.

    SwiGLU is ``silu(x W_gate) * (x W_up)`` (Shazeer 2020); GELU uses the tanh approximation
    (DiT's MLP).
    """
    return _activate(x_ND @ w_in, activation) @ w_out


def _activate(h: Tensor, activation: Activation) -> Tensor:
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h, approximate="tanh")


def empty_groups_need_masking(device: torch.device) -> bool:
    """Whether torch's grouped GEMM on ``device`` may leave non-zero weight gradients for empty
    groups (experts with no rows): reported for Blackwell GPUs (compute capability 10.x,
    pytorch/pytorch#172439), not for Hopper or the CPU kernel, which give zeros."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (10, 0)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: autocast's where it is on for ``x``'s device."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _in_width(hidden_dim: int, activation: Activation) -> int:
    return 2 * hidden_dim if activation == "swiglu" else hidden_dim


class FeedForward(nn.Module):
    """Dense position-wise FFN ``D -> H -> D`` without biases, as one expert is."""

    def __init__(self, dim: int, hidden_dim: int, activation: Activation = "swiglu") -> None:
        super().__init__()
        self.activation: Activation = activation
        self.w_in = nn.Parameter(torch.empty(dim, _in_width(hidden_dim, activation)))
        self.w_out = nn.Parameter(torch.empty(hidden_dim, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_ffn(self.w_in, self.w_out)

    def forward(self, x: Tensor) -> Tensor:
        """Apply to ``(..., D)``."""
        return feed_forward(x, self.w_in, self.w_out, self.activation)


class Experts(nn.Module):
    """``E`` FFN experts with weights stacked as ``w_in (E, D, H|2H)`` and ``w_out (E, H, D)``.

    Stacked storage is what grouped-GEMM kernels take and expert parallelism shards along ``E``:
    each expert runs on its contiguous slice of the expert-sorted rows, by one matmul per expert
    (`forward`), one batched matmul over padded rows, or one grouped GEMM for all (`grouped`).
    """

    def __init__(
        self, num_experts: int, dim: int, hidden_dim: int, activation: Activation = "swiglu"
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.activation: Activation = activation
        in_width = _in_width(hidden_dim, activation)
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, in_width))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_ffn(self.w_in, self.w_out)

    def per_expert(self) -> list[tuple[Tensor, Tensor]]:
        """``[(w_in[e], w_out[e]) for e]`` as views from one ``unbind`` per weight.

        Indexing ``w_in[e]`` once per expert would make autograd build one full ``(E, ...)``
        gradient per expert (``select_backward``), ``O(E^2)`` work; ``unbind``'s backward stacks
        the per-expert gradients once, zeros for experts that received no token.
        """
        return list(zip(self.w_in.unbind(0), self.w_out.unbind(0), strict=True))

    def forward(self, x_MD: Tensor, counts: list[int], padded_rows: int | None = None) -> Tensor:
        """Run every expert on its rows of ``x_MD``.

        Ragged layout (``padded_rows=None``): expert ``e`` owns rows
        ``[sum(counts[:e]), sum(counts[:e+1]))``, one matmul per expert, experts with no rows
        skipped. Padded layout: ``x_MD`` is ``(E * C, D)`` and all experts run as one ``bmm``.
        ``counts`` is a host list (one device sync upstream, as in MegaBlocks).
        """
        if padded_rows is not None:
            x_ECD = x_MD.view(self.num_experts, padded_rows, -1)
            y_ECD = feed_forward(x_ECD, self.w_in, self.w_out, self.activation)  # batched matmul
            return y_ECD.view(x_MD.shape[0], -1)
        # An expert with no rows contributes its empty rows, in the dtype its matmuls would give
        # (autocast's): a wider one would make `cat` promote every expert's output to it.
        outputs = [
            feed_forward(rows, w_in, w_out, self.activation)
            if rows.shape[0]
            else rows.to(compute_dtype(rows))
            for (w_in, w_out), rows in zip(self.per_expert(), x_MD.split(counts), strict=True)
        ]
        return torch.cat(outputs)

    def grouped(self, x_MD: Tensor, offsets_E: Tensor) -> Tensor:
        """Every expert on its rows of ``x_MD`` at once: two ``torch.nn.functional.grouped_mm``
        calls (one grouped-GEMM kernel each) instead of a matmul per expert.

        Expert ``e`` owns rows ``[offsets[e-1], offsets[e])`` (``offsets_E``: int32 cumulative
        row ends on ``x_MD``'s device, so nothing is copied to the host). Under autocast the
        operands are cast to its dtype, as ``@`` would cast them.
        """
        dtype = compute_dtype(x_MD)
        if x_MD.shape[0] == 0:
            return x_MD.new_zeros(0, self.w_out.shape[-1], dtype=dtype)
        w_in, w_out = (w.to(dtype) for w in (self.w_in, self.w_out))
        if empty_groups_need_masking(x_MD.device):
            # The weights of an expert with no rows enter detached, so its weight gradient is
            # zero whatever the kernel's backward leaves in its slot. Decided on the device (no
            # host sync), at the cost of one pass over the weights.
            rows_E = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1))
            busy = (rows_E > 0)[:, None, None]
            w_in, w_out = (torch.where(busy, w, w.detach()) for w in (w_in, w_out))
        grouped_mm = F.grouped_mm
        if torch.compiler.is_compiling() and dtype != torch.bfloat16:
            grouped_mm = _grouped_mm_outside_compile
        h = grouped_mm(x_MD.to(dtype), w_in, offs=offsets_E)
        return grouped_mm(_activate(h, self.activation), w_out, offs=offsets_E)


@torch.compiler.disable
def _grouped_mm_outside_compile(mat_a: Tensor, mat_b: Tensor, offs: Tensor) -> Tensor:
    """``F.grouped_mm`` run eagerly under ``torch.compile`` (a graph break): the fake-tensor
    kernel that compilation traces it with accepts bfloat16 only (torch 2.13), while the CPU
    kernel also computes in float32."""
    return F.grouped_mm(mat_a, mat_b, offs=offs)


def _init_ffn(w_in: Tensor, w_out: Tensor) -> None:
    # Fan-in scaled normal init (std 1/sqrt(fan_in)) on the last two dims, for stacked weights too.
    nn.init.normal_(w_in, std=1.0 / math.sqrt(w_in.shape[-2]))
    nn.init.normal_(w_out, std=1.0 / math.sqrt(w_out.shape[-2]))
