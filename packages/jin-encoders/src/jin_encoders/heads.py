"""Modality-specific output heads (ZIP-0408 "Modality-specific heads"), shared backbone features in.

- ``TextLMHead``: next-byte logits; optionally tied to the text encoder's token embedding
  (Press & Wolf 2017), in which case the head owns no weight matrix of its own.
- ``RegressionHead``: continuous per-token targets for generation: image patches (``P*P*C``),
  mel frames (``2*80`` per token), point groups (``3*K``), custom features. The encoders' own
  ``target_dim`` / ``regression_targets`` give the matching sizes and targets.

Shape legend: B batch, T tokens, D width, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RegressionHead", "TextLMHead"]


class TextLMHead(nn.Module):
    """LayerNorm then a projection to ``vocab_size`` logits, tied or untied.

    Args:
        dim: input width ``D``.
        vocab_size: number of token ids ``V``.
        tied_embedding: when given, its ``(V,D)`` weight is the output projection. It is held by
            reference, not registered, so the weight appears once in a state_dict (under the
            encoder that owns it) and stays shared through ``.to()`` and ``deepcopy``.
    """

    def __init__(
        self, dim: int, vocab_size: int, tied_embedding: nn.Embedding | None = None
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        if tied_embedding is not None:
            if tuple(tied_embedding.weight.shape) != (vocab_size, dim):
                raise ValueError(
                    f"tied_embedding: expected weight of shape {(vocab_size, dim)}, "
                    f"received {tuple(tied_embedding.weight.shape)}"
                )
            self._tied = (tied_embedding,)
            self.weight = None
        else:
            self._tied = ()
            self.weight = nn.Parameter(torch.zeros(vocab_size, dim))
            nn.init.normal_(self.weight, std=0.02)

    @property
    def tied(self) -> bool:
        """Whether the projection is the token embedding's weight."""
        return bool(self._tied)

    def forward(self, tokens: Tensor) -> Tensor:
        """``(B,T,D)`` -> logits ``(B,T,V)``."""
        weight = self._tied[0].weight if self._tied else self.weight
        return F.linear(self.norm(tokens), weight, self.bias)


class RegressionHead(nn.Module):
    """LayerNorm then a linear map to ``out_dim`` continuous values per token."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        if out_dim <= 0:
            raise ValueError(f"out_dim: expected a positive size, got {out_dim}")
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, tokens: Tensor) -> Tensor:
        """``(B,T,D)`` -> ``(B,T,out_dim)``."""
        return self.proj(self.norm(tokens))
