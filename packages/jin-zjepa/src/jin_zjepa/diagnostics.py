"""Collapse diagnostics for embeddings, for logging (no gradient).

- :func:`embedding_std`: the mean over dimensions of the std of L2-normalised embeddings (SimSiam,
  Chen & He 2021, §4.1). For embeddings spread over the sphere in ``D`` dimensions it is about
  ``1/sqrt(D)``; a collapsed encoder (every input mapped to one vector) gives 0.
- :func:`effective_rank`: ``exp`` of the entropy of the normalised singular values (Roy &
  Vetterli 2007; RankMe, Garrido et al. 2023). Between 1 (everything on one line) and
  ``min(N, D)``; dimensional collapse shows as a rank far below ``D`` while the std may look fine.
- :func:`content_std`: for token maps ``(B, T, D)``, the std *across samples* at each token
  position of the layer-normed tokens (the JEPA targets), averaged. A randomly initialised
  transformer's tokens share a large constant component, which hides content collapse from the
  two metrics above (the per-position mean alone can keep them up); this one sees only what
  differs between inputs, and is what a predictor that ignores its context cannot predict.

A spread across samples is undefined for one sample: ``embedding_std`` and ``content_std`` return
NaN there (as ``Tensor.std`` does) rather than raising, so a logging call cannot stop a training
step on a batch of one.

Shapes: N embeddings, D width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["collapse_metrics", "content_std", "effective_rank", "embedding_std"]


def _as_2d(z: Tensor, name: str) -> Tensor:
    if z.dim() < 2 or z.shape[-1] < 1 or z.numel() // z.shape[-1] < 1:
        raise ValueError(
            f"{name} needs at least one embedding of shape (..., D); got {tuple(z.shape)}"
        )
    return z.detach().reshape(-1, z.shape[-1]).float()


@torch.no_grad()
def embedding_std(z: Tensor) -> Tensor:
    """Mean per-dimension std of the L2-normalised rows of ``z`` ``(..., D)``; 0-dim tensor (NaN
    for a single row)."""
    z2 = F.normalize(_as_2d(z, "embedding_std"), dim=-1)
    if z2.shape[0] < 2:
        return z2.new_full((), math.nan)
    return z2.std(dim=0).mean()


@torch.no_grad()
def effective_rank(z: Tensor, eps: float = 1e-12) -> Tensor:
    """Effective rank of the embeddings ``z`` ``(..., D)`` (rows are samples); 0-dim tensor."""
    s = torch.linalg.svdvals(_as_2d(z, "effective_rank"))
    p = s / s.sum().clamp(min=eps)
    entropy = -(p * (p + eps).log()).sum()
    return entropy.exp()


@torch.no_grad()
def content_std(tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:
    """Across-sample std of layer-normed ``(B, T, D)`` tokens, averaged over positions and dims.

    ``padding_mask`` ``(B, T)`` bool, True at padding (absent samples, smaller images): a padded
    token is left out of its position's spread, and positions with fewer than two valid samples
    are left out of the average. NaN when no position has two (a batch of one).
    """
    if tokens.dim() != 3 or tokens.shape[0] < 1:
        raise ValueError(f"content_std needs tokens (B >= 1, T, D); got {tuple(tokens.shape)}")
    normed = F.layer_norm(tokens.detach().float(), (tokens.shape[-1],))
    if padding_mask is None:
        if tokens.shape[0] < 2:
            return normed.new_full((), math.nan)
        return normed.std(dim=0).mean()
    if padding_mask.shape != tokens.shape[:2] or padding_mask.dtype != torch.bool:
        raise ValueError(
            f"content_std: padding_mask must be bool (B, T) = {tuple(tokens.shape[:2])}; got "
            f"{padding_mask.dtype} {tuple(padding_mask.shape)}"
        )
    # masked_fill, not a product, so no padded value (even a non-finite one) reaches the sums.
    normed = normed.masked_fill(padding_mask[..., None], 0.0)
    count_T1 = (~padding_mask).sum(dim=0)[:, None].to(normed.dtype)
    mean_TD = normed.sum(dim=0) / count_T1.clamp(min=1.0)
    dev_BTD = (normed - mean_TD).masked_fill(padding_mask[..., None], 0.0)
    std_TD = (dev_BTD.pow(2).sum(dim=0) / (count_T1 - 1.0).clamp(min=1.0)).sqrt()
    return std_TD[count_T1[:, 0] >= 2].mean()


@torch.no_grad()
def collapse_metrics(z: Tensor, prefix: str = "embed") -> dict[str, Tensor]:
    """``{prefix}/std``, ``{prefix}/std_ratio`` (std times sqrt(D), ~1 when spread out, 0 when
    collapsed) and ``{prefix}/effective_rank`` of ``z`` ``(..., D)``."""
    std = embedding_std(z)
    return {
        f"{prefix}/std": std,
        f"{prefix}/std_ratio": std * math.sqrt(z.shape[-1]),
        f"{prefix}/effective_rank": effective_rank(z),
    }
