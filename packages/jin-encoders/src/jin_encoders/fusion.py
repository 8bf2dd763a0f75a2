"""One interleaved sequence of every modality's tokens, and masked self-attention over it.

Paper §3.2 "Cross-Modal Fusion" and ZIP-0408 "Interleaved attention": tokens of all modalities are
concatenated into one sequence with a modality id per token, so attention crosses modalities from
the first layer. ``FusedSequence`` keeps the bookkeeping to split the sequence back per modality.
In JinModel the DiT-MoE backbone does the deep fusion, so the ``FusionLayer`` stack here is small
and may have zero layers.

Shape legend: B batch, T tokens, D width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jin_encoders.base import EncoderOutput

__all__ = ["FusedSequence", "FusionLayer", "concat_modalities"]


@dataclass(frozen=True)
class FusedSequence:
    """Every modality's tokens in one sequence.

    Attributes:
        tokens: ``(B,T,D)``.
        padding_mask: ``(B,T)`` bool, True at padding (always a tensor here).
        modality_ids: ``(B,T)`` int64 registry id of each token's modality.
        pos: ``(B,T,D)`` positional embedding of each token (zero where an encoder had none).
        segments: modality name -> ``(start, end)`` of its slice of the sequence, in order.
        grids: modality name -> its ``EncoderOutput.grid``.
    """

    tokens: Tensor
    padding_mask: Tensor
    modality_ids: Tensor
    pos: Tensor
    segments: dict[str, tuple[int, int]]
    grids: dict[str, tuple[int, int] | None]

    def split(self, x: Tensor) -> dict[str, Tensor]:
        """Slice any ``(B,T,...)`` tensor aligned with this sequence back into its modalities."""
        if x.shape[1] != self.tokens.shape[1]:
            raise ValueError(
                f"split: expected a tensor with {self.tokens.shape[1]} tokens on dim 1, "
                f"received shape {tuple(x.shape)}"
            )
        return {name: x[:, start:end] for name, (start, end) in self.segments.items()}

    def outputs(self) -> dict[str, EncoderOutput]:
        """The sequence split back into one ``EncoderOutput`` per modality."""
        tokens, masks, pos = (
            self.split(self.tokens),
            self.split(self.padding_mask),
            self.split(self.pos),
        )
        return {
            name: EncoderOutput(
                tokens=tokens[name],
                padding_mask=masks[name] if bool(masks[name].any()) else None,
                pos=pos[name],
                grid=self.grids[name],
            )
            for name in self.segments
        }


def concat_modalities(outputs: dict[str, EncoderOutput], ids: dict[str, int]) -> FusedSequence:
    """Concatenate per-modality outputs in the order of ``ids`` (registry order, not dict order)."""
    names = sorted(outputs, key=lambda name: ids[name])
    if not names:
        raise ValueError("fuse: expected at least one modality, received none")
    batch_sizes = {name: outputs[name].tokens.shape[0] for name in names}
    if len(set(batch_sizes.values())) != 1:
        raise ValueError(
            f"fuse: expected one batch size for all modalities, received {batch_sizes}"
        )
    segments: dict[str, tuple[int, int]] = {}
    start = 0
    tokens, masks, modality_ids, positions = [], [], [], []
    for name in names:
        out = outputs[name]
        length = out.tokens.shape[1]
        segments[name] = (start, start + length)
        start += length
        tokens.append(out.tokens)
        masks.append(~out.valid_mask)
        modality_ids.append(torch.full(out.tokens.shape[:2], ids[name], device=out.tokens.device))
        positions.append(out.pos if out.pos is not None else torch.zeros_like(out.tokens))
    return FusedSequence(
        tokens=torch.cat(tokens, dim=1),
        padding_mask=torch.cat(masks, dim=1),
        modality_ids=torch.cat(modality_ids, dim=1),
        pos=torch.cat(positions, dim=1),
        segments=segments,
        grids={name: outputs[name].grid for name in names},
    )


class FusionLayer(nn.Module):
    """Pre-norm transformer block: masked multi-head self-attention, then an MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"fusion_heads: expected a divisor of dim={dim}, got {num_heads}")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        """``x (B,T,D)``, ``padding_mask (B,T)`` True at padding -> ``(B,T,D)``, zero at padding."""
        batch, length, dim = x.shape
        # A row with no valid key would softmax over nothing (NaN); let it attend to everything,
        # its outputs are padding and are zeroed below.
        attend = ~padding_mask | padding_mask.all(dim=1, keepdim=True)
        q, k, v = (
            self.qkv(self.norm1(x))
            .reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
            .permute(2, 0, 3, 1, 4)
        )
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None, None, :])
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, length, dim))
        x = x + self.mlp(self.norm2(x))
        return x * (~padding_mask)[..., None].to(x.dtype)
