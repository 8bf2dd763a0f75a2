"""Dropless expert dispatch: plan, permute, run experts on contiguous slices, un-permute.

Two implementations compute the same function: plain PyTorch (:mod:`.torch_ops`, everywhere) and
CuPy CUDA kernels (:mod:`.cupy_ops`, chosen automatically on CUDA fp32/bf16 tensors when cupy is
installed).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from jin_backbone.dispatch import cupy_ops, torch_ops
from jin_backbone.dispatch.plan import DispatchPlan, expert_capacity, make_plan
from jin_backbone.experts import compute_dtype

__all__ = [
    "Backend",
    "DispatchPlan",
    "expert_capacity",
    "make_plan",
    "permute",
    "resolve_backend",
    "unpermute_combine",
]

Backend = Literal["torch", "cupy"]


def resolve_backend(requested: Literal["auto", "torch", "cupy"], x: Tensor) -> Backend:
    """``auto``: CuPy where it applies, PyTorch elsewhere; ``cupy`` raises where it can't run.

    The kernels un-permute the experts' outputs, which autocast computes in its own dtype: under
    float16 autocast (CUDA's default) they would be float16, which the kernels do not take.
    """
    if requested == "torch":
        return "torch"
    compute = compute_dtype(x)
    if cupy_ops.supports(x) and compute in (torch.float32, torch.bfloat16):
        return "cupy"
    if requested == "cupy":
        raise ValueError(
            f"dispatch='cupy' needs cupy installed and a CUDA float32/bfloat16 input, computed "
            f"in float32/bfloat16; got device={x.device}, dtype={x.dtype}, compute dtype="
            f"{compute} (autocast's where it is on), cupy usable={cupy_ops.cupy_available()}"
        )
    return "torch"


def permute(x_ND: Tensor, plan: DispatchPlan, backend: Backend) -> Tensor:
    """Rows of ``x`` in expert-sorted order, ``(M, D)``."""
    if backend == "cupy":
        return cupy_ops.permute(x_ND, plan.source_token, plan.row_of_assignment)
    return torch_ops.permute(x_ND, plan.source_token)


def unpermute_combine(
    y_MD: Tensor, weights_NK: Tensor, plan: DispatchPlan, backend: Backend
) -> Tensor:
    """Weighted sum of each token's expert outputs, back in token order, ``(N, D)``."""
    if backend == "cupy":
        return cupy_ops.unpermute_combine(y_MD, weights_NK, plan.row_of_assignment)
    return torch_ops.unpermute_combine(y_MD, weights_NK, plan.row_of_assignment)
