"""A toy image world and a tiny ViT encoder for training-dynamics tests (not part of the package).

Images are 1 x 32 x 32 canvases with two or three soft Gaussian blobs and an oriented grating in
a random window: smooth, so a masked patch is predictable from its neighbours, and different per
image, so a collapsed encoder is visible. Patch 4 gives the 8 x 8 token grid of NumberWorld.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from jin_zjepa import sincos_pos_2d, token_centers

IMAGE = 32
PATCH = 4
GRID = (IMAGE // PATCH, IMAGE // PATCH)


def toy_images(batch: int, generator: torch.Generator) -> Tensor:
    """``(B, 1, 32, 32)`` images in roughly [0, 1]."""
    coords = (torch.arange(IMAGE, dtype=torch.float32) + 0.5) / IMAGE
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    canvas = torch.zeros(batch, IMAGE, IMAGE)
    for _ in range(3):
        cy, cx = torch.rand(2, batch, 1, 1, generator=generator)
        width = 0.05 + 0.1 * torch.rand(batch, 1, 1, generator=generator)
        amp = torch.rand(batch, 1, 1, generator=generator)
        canvas += amp * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
    angle = torch.pi * torch.rand(batch, 1, 1, generator=generator)
    freq = 8 + 8 * torch.rand(batch, 1, 1, generator=generator)
    wy, wx = torch.rand(2, batch, 1, 1, generator=generator) * 0.5
    window = (yy >= wy) & (yy < wy + 0.5) & (xx >= wx) & (xx < wx + 0.5)
    grating = 0.5 + 0.5 * torch.sin(freq * (yy * torch.cos(angle) + xx * torch.sin(angle)))
    canvas = torch.where(window, 0.5 * canvas + 0.5 * grating, canvas)
    return canvas.clamp(0, 1.5).unsqueeze(1)


class TinyViT(nn.Module):
    """Patch embedding + fixed 2-D sin-cos positions + a few transformer layers.

    ``forward(images)`` returns ``(tokens (B, T, D), pos (B, T, D))``; ``encode_tokens`` runs the
    transformer on already-embedded tokens (context only, for the online path).
    """

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, PATCH, PATCH)
        # Small positions (ViT initialises learned ones at std 0.02) so content dominates tokens.
        pos = 0.1 * sincos_pos_2d(token_centers(GRID)[None], dim, GRID)
        self.register_buffer("pos", pos, persistent=False)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 2 * dim, 0.0, "gelu", batch_first=True,
                                       norm_first=True)
            for _ in range(depth)
        )  # fmt: skip
        self.norm = nn.LayerNorm(dim)

    def embed(self, images: Tensor) -> tuple[Tensor, Tensor]:
        tokens = self.patch(images).flatten(2).transpose(1, 2)
        pos = self.pos.expand(tokens.shape[0], -1, -1)
        return tokens + pos, pos

    def encode_tokens(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        for block in self.blocks:
            x = block(x, src_key_padding_mask=padding_mask)
        return self.norm(x)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x, pos = self.embed(images)
        return self.encode_tokens(x), pos
