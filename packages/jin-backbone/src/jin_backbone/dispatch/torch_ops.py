"""Permutation and weighted un-permutation in plain PyTorch (CPU, and GPU without CuPy).

Shapes: N tokens, K top-k, M expert-sorted rows, D width. Autograd differentiates both ops; the
CuPy kernels in :mod:`jin_backbone.dispatch.cupy_ops` compute the same functions.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["permute", "unpermute_combine"]


def permute(x_ND: Tensor, source_token_M: Tensor) -> Tensor:
    """Gather tokens into expert-contiguous order: row ``m`` is ``x[source_token[m]]``."""
    return x_ND.index_select(0, source_token_M)


def unpermute_combine(y_MD: Tensor, weights_NK: Tensor, row_of_assignment_KN: Tensor) -> Tensor:
    """``out[n] = sum_k weights[n, k] * y[row[k, n]]``, with dropped rows (``-1``) adding zero.

    A gather, not a scatter-add: every output row is written once, so the result is
    deterministic on GPU too.
    """
    num_rows, dim = y_MD.shape
    # Row M of the padded tensor is the zero row that dropped assignments read.
    y_padded = torch.cat([y_MD, y_MD.new_zeros(1, dim)])
    rows_KN = torch.where(row_of_assignment_KN < 0, num_rows, row_of_assignment_KN)
    y_KND = y_padded[rows_KN]
    return torch.einsum("nk,knd->nd", weights_NK.to(y_MD.dtype), y_KND)
