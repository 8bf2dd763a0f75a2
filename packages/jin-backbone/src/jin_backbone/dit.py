"""DiT block with timestep conditioning (paper §3.4; Peebles & Xie 2023) and its embedder.

Shapes: B batch, T tokens, D width, F sinusoidal frequency features, Hd head width.

Two conditionings of a block on ``c`` (the timestep embedding, plus an optional condition):
- ``adaln_zero`` (DiT's default): ``c`` regresses shift/scale/gate for both sub-layers; the
  regression is zero-initialised, so a fresh block is the identity function.
- ``additive`` (the paper's §3.4 listing): ``x + MLP(c)`` after the sub-layers; the last layer is
  zero-initialised, so a fresh block ignores the timestep.
With ``c=None`` either block is a plain pre-norm transformer block (representation learning).

For autoregressive decoding a block takes a `KVCache`: the keys and values of the tokens it has
already seen are kept, so each new token is one query against them instead of a pass over the
whole sequence (the caller passes the new tokens' ``attn_mask`` over all keys).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from jin_backbone.experts import FeedForward
from jin_backbone.moe import MoE, MoEAux

__all__ = [
    "Conditioning",
    "DiTBlock",
    "KVCache",
    "TimestepEmbedder",
    "attention_mask",
    "modulate",
]

Conditioning = Literal["adaln_zero", "additive"]


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of a (possibly fractional) timestep followed by an MLP (DiT)."""

    def __init__(self, dim: int, frequency_dim: int = 256, max_period: float = 10_000.0) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def sinusoidal(self, t_B: Tensor) -> Tensor:
        """``(B,) -> (B, F)``: ``[cos(t w_i), sin(t w_i)]`` with geometric ``w_i`` (Vaswani)."""
        half = self.frequency_dim // 2
        exponent = torch.arange(half, device=t_B.device, dtype=torch.float32) / half
        freqs_F = torch.exp(-math.log(self.max_period) * exponent)
        angles_BF = t_B.float()[:, None] * freqs_F[None]
        emb_BF = torch.cat([torch.cos(angles_BF), torch.sin(angles_BF)], dim=-1)
        if self.frequency_dim % 2:
            emb_BF = F.pad(emb_BF, (0, 1))
        return emb_BF

    def forward(self, t_B: Tensor) -> Tensor:
        """Embed timesteps ``(B,)`` (integer or float) to ``(B, D)``."""
        emb_BF = self.sinusoidal(t_B)
        return self.mlp(emb_BF.to(self.mlp[0].weight.dtype))


def modulate(x_BTD: Tensor, shift_BD: Tensor, scale_BD: Tensor) -> Tensor:
    """adaLN: ``x * (1 + scale) + shift`` broadcast over tokens."""
    return x_BTD * (1 + scale_BD[:, None]) + shift_BD[:, None]


def attention_mask(padding_mask_BT: Tensor | None) -> Tensor | None:
    """Key mask for ``scaled_dot_product_attention`` (True = attend), ``(B, 1, 1, T)``.

    A sample that is padding throughout attends to all its keys instead of none, which keeps its
    (meaningless) outputs finite rather than NaN.
    """
    if padding_mask_BT is None:
        return None
    attend_BT = ~padding_mask_BT | padding_mask_BT.all(dim=-1, keepdim=True)
    return attend_BT[:, None, None, :]


class KVCache:
    """The keys and values ``(B, H, T, Hd)`` one attention layer has seen, for decoding."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    @property
    def length(self) -> int:
        """Tokens cached."""
        return 0 if self.k is None else self.k.shape[2]

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new tokens' keys and values; return all of them."""
        if self.k is not None and self.v is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x_BTD: Tensor, attn_mask: Tensor | None = None, cache: KVCache | None = None
    ) -> Tensor:
        """Self-attention over ``T``; ``attn_mask`` as built by :func:`attention_mask`.

        With ``cache``, ``x`` holds the new tokens only: they attend to the cached keys and to
        themselves (``attn_mask`` is then ``(B, 1, T, cached + T)``), and join the cache.
        """
        q, k, v = rearrange(
            self.qkv(x_BTD), "b t (three h hd) -> three b h t hd", three=3, h=self.num_heads
        )
        if cache is not None:
            k, v = cache.extend(k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(rearrange(out, "b h t hd -> b t (h hd)"))


class DiTBlock(nn.Module):
    """Pre-norm attention + FFN (dense or MoE) block, conditioned on ``c`` when one is given.

    Args:
        dim: width ``D``.
        num_heads: attention heads (must divide ``dim``).
        ffn: a :class:`FeedForward` or a :class:`MoE` taking ``(B, T, D)``.
        conditioning: ``adaln_zero`` or ``additive`` (see the module docstring).
        qkv_bias: bias on the fused QKV projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn: FeedForward | MoE,
        conditioning: Conditioning = "adaln_zero",
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"DiTBlock: num_heads={num_heads} does not divide dim={dim}")
        self.conditioning: Conditioning = conditioning
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = ffn
        if conditioning == "adaln_zero":
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        else:
            self.time_embed = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim))
        self.reset_conditioning()

    def reset_conditioning(self) -> None:
        """Zero the conditioning output layer (DiT §3.2 "adaLN-Zero")."""
        last = (
            self.adaLN_modulation[-1] if self.conditioning == "adaln_zero" else self.time_embed[-1]
        )
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def _ffn(self, h_BTD: Tensor, padding_mask: Tensor | None) -> tuple[Tensor, MoEAux | None]:
        if isinstance(self.ffn, MoE):
            return self.ffn(h_BTD, padding_mask)
        return self.ffn(h_BTD), None

    def forward(
        self,
        x_BTD: Tensor,
        c_BD: Tensor | None = None,
        padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[Tensor, MoEAux | None]:
        """Apply the block; returns the new ``(B, T, D)`` and the MoE aux (``None`` if dense).

        ``attn_mask`` defaults to :func:`attention_mask` of ``padding_mask``; a stack builds it
        once and passes it to every block. With ``cache`` (decoding), ``x`` and ``padding_mask``
        are the new tokens only, and ``attn_mask`` covers the cached keys too (see `Attention`).
        """
        if attn_mask is None:
            if cache is not None and cache.length:
                raise ValueError("DiTBlock: decoding with a KVCache needs an explicit attn_mask")
            attn_mask = attention_mask(padding_mask)
        if c_BD is not None and self.conditioning == "adaln_zero":
            shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c_BD).chunk(6, -1)
            h = self.attn(modulate(self.norm1(x_BTD), shift1, scale1), attn_mask, cache)
            x_BTD = x_BTD + gate1[:, None] * h
            h, aux = self._ffn(modulate(self.norm2(x_BTD), shift2, scale2), padding_mask)
            return x_BTD + gate2[:, None] * h, aux
        x_BTD = x_BTD + self.attn(self.norm1(x_BTD), attn_mask, cache)
        h, aux = self._ffn(self.norm2(x_BTD), padding_mask)
        x_BTD = x_BTD + h
        if c_BD is not None:  # additive conditioning, as in the paper's §3.4 listing
            x_BTD = x_BTD + self.time_embed(c_BD)[:, None]
        return x_BTD, aux
