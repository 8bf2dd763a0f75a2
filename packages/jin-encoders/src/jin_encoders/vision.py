"""Vision encoder (paper §3.3, ZIP-0408 "Dynamic resolution"): ViT patch embedding at any H x W.

Each image in a batch keeps its own size (``sizes``, as jin-data's ``image_sizes``): pixels outside
it are zeroed after normalisation, a partial last patch row/column is kept (zero-filled, as it would
be alone), and the learned positional grid is resampled bilinearly to each image's own patch grid.
That resampling is done for the whole batch at once with ``grid_sample`` using each sample's grid as
the sampling lattice, which is exactly ``F.interpolate(..., mode="bilinear", align_corners=False)``
per image without a per-image loop. Valid patches are then packed to the front of the sequence in
row-major order, so a sample's tokens do not depend on what it is batched with.

Shape legend: B batch, C channels, H/W pixels, T tokens, D width, P patch size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field, model_validator
from torch import Tensor, nn

from jin_encoders._config import StrictConfig
from jin_encoders.base import EncoderOutput, ModalityEncoder

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "VisionEncoder", "VisionEncoderConfig"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VisionEncoderConfig(StrictConfig):
    """ViT patch embedding; ``pos_grid`` is the side of the learned positional grid."""

    dim: int = Field(gt=0)
    patch_size: int = Field(default=14, gt=0)
    in_channels: int = Field(default=3)
    pos_grid: int = Field(default=16, gt=0)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @model_validator(mode="after")
    def _check_channels_and_stats(self) -> VisionEncoderConfig:
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels: expected 1 or 3, got {self.in_channels}")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and len(value) != self.in_channels:
                raise ValueError(
                    f"{key}: expected {self.in_channels} values (one per channel), got {len(value)}"
                )
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std: expected positive values, got {self.std}")
        return self

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std): ImageNet's for RGB, 0.5/0.5 for grayscale unless given."""
        default_mean, default_std = (
            (IMAGENET_MEAN, IMAGENET_STD) if self.in_channels == 3 else ((0.5,), (0.5,))
        )
        return self.mean or default_mean, self.std or default_std


class VisionEncoder(ModalityEncoder):
    """Patch embedding (a stride-P convolution) plus an interpolated learned positional grid."""

    modality = "image"

    def __init__(self, config: VisionEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.dim = config.dim
        self.patch_size = config.patch_size
        self.in_channels = config.in_channels
        self.x_embedder = nn.Conv2d(
            config.in_channels, config.dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, config.dim, config.pos_grid, config.pos_grid))
        # MAE/DiT initialise the patch projection like a linear layer on the flattened patch.
        nn.init.xavier_uniform_(self.x_embedder.weight.view(config.dim, -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.pos_embed, std=0.02)
        mean, std = config.channel_stats()
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @property
    def target_dim(self) -> int:
        """Pixels per patch: the image regression head predicts ``P*P*C`` values per token."""
        return self.patch_size * self.patch_size * self.in_channels

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        sizes: Tensor | None = None,
        present: Tensor | None = None,
    ) -> EncoderOutput:
        """Encode images.

        Args:
            x: ``(B,C,H,W)`` uint8 (normalised here with the config's mean/std) or float
                (already normalised), padded at the bottom/right to the largest image.
            padding_mask: unused for images (sizes say where the padding is); must be None.
            sizes: ``(B,2)`` int ``(H_i, W_i)`` of each image; defaults to the full ``(H, W)``.
            present: ``(B,)`` bool; absent samples become all padding.
        """
        if padding_mask is not None:
            raise self._error("padding_mask", "None (pass sizes (B,2) instead)", "a tensor")
        if present is not None and sizes is not None:
            # Absent images may come with size (0, 0); give them one pixel, _finish masks them.
            absent = ~present.to(device=sizes.device, dtype=torch.bool)[:, None]
            sizes = torch.where(absent, torch.ones_like(sizes), sizes)
        pixels, sizes = self._prepare(x, sizes)
        patches = self.x_embedder(pixels)  # (B, D, h, w)
        batch, _, grid_h, grid_w = patches.shape
        grids = torch.div(sizes + self.patch_size - 1, self.patch_size, rounding_mode="floor")
        pos = self._interpolated_pos(grids, grid_h, grid_w)  # (B, D, h, w)
        tokens = rearrange(patches + pos, "b d h w -> b (h w) d")
        pos = rearrange(pos, "b d h w -> b (h w) d")
        (tokens, pos), padding_mask = self._pack([tokens, pos], grids, grid_h, grid_w)
        uniform = bool((grids == grids[:1]).all()) if batch else True
        grid = (int(grids[0, 0]), int(grids[0, 1])) if uniform and batch else None
        return self._finish(tokens, pos, padding_mask, present, grid)

    def regression_targets(
        self, x: Tensor, sizes: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Per-token regression targets ``(B,T,P*P*C)`` aligned with ``forward``'s tokens.

        Pixels are normalised as in ``forward``; the mask is True at padding (None if none).
        """
        pixels, sizes = self._prepare(x, sizes)
        p = self.patch_size
        grid_h, grid_w = pixels.shape[2] // p, pixels.shape[3] // p
        patches = rearrange(pixels, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)
        grids = torch.div(sizes + p - 1, p, rounding_mode="floor")
        (patches,), padding_mask = self._pack([patches], grids, grid_h, grid_w)
        return patches, (padding_mask if bool(padding_mask.any()) else None)

    def batch_inputs(self, batch: Mapping[str, Any], name: str) -> dict[str, Any]:
        """Read ``batch[name]`` and ``batch[f"{name}_sizes"]``."""
        inputs: dict[str, Any] = {"x": batch[name]}
        if f"{name}_sizes" in batch:
            inputs["sizes"] = batch[f"{name}_sizes"]
        return inputs

    def _prepare(self, x: Tensor, sizes: Tensor | None) -> tuple[Tensor, Tensor]:
        """Check, normalise, zero outside each image and pad H, W up to multiples of P."""
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise self._error("images", f"(B,{self.in_channels},H,W) tensor", shape)
        batch, _, height, width = x.shape
        if batch == 0 or height == 0 or width == 0:
            raise self._error("images", "non-empty (B,C,H,W)", tuple(x.shape))
        if sizes is None:
            sizes = torch.tensor([[height, width]], device=x.device).expand(batch, 2)
        if tuple(sizes.shape) != (batch, 2) or sizes.is_floating_point():
            raise self._error("sizes", f"integer tensor of shape ({batch}, 2)", tuple(sizes.shape))
        sizes = sizes.to(device=x.device, dtype=torch.long)
        limits = torch.tensor([height, width], device=x.device)
        if bool(((sizes < 1) | (sizes > limits)).any()):
            raise self._error(
                "sizes", f"(H_i, W_i) within [1, ({height}, {width})]", sizes.tolist()
            )
        if x.dtype == torch.uint8:
            pixels = (x.float() / 255.0 - self.pixel_mean) / self.pixel_std
        elif x.is_floating_point():
            self._check_finite(x, "images")
            pixels = x
        else:
            raise self._error("images", "uint8 or float tensor", x.dtype)
        rows = torch.arange(height, device=x.device)[None, :, None] < sizes[:, 0, None, None]
        cols = torch.arange(width, device=x.device)[None, None, :] < sizes[:, 1, None, None]
        pixels = pixels * (rows & cols)[:, None].to(pixels.dtype)
        p = self.patch_size
        pixels = F.pad(pixels, (0, (-width) % p, 0, (-height) % p))
        return pixels.to(self.x_embedder.weight.dtype), sizes

    def _interpolated_pos(self, grids: Tensor, grid_h: int, grid_w: int) -> Tensor:
        """The learned grid resampled to each sample's ``(h_i, w_i)``, laid on a (h, w) canvas."""
        batch = grids.shape[0]
        device = grids.device
        rows = torch.arange(grid_h, device=device, dtype=torch.float32)
        cols = torch.arange(grid_w, device=device, dtype=torch.float32)
        # Pixel-centre sampling: output cell r of an h_i-row grid reads input coordinate
        # (r + 0.5) / h_i in [0, 1], which grid_sample(align_corners=False) maps like interpolate.
        y = (rows[None, :] + 0.5) / grids[:, :1].float() * 2.0 - 1.0  # (B, h)
        x = (cols[None, :] + 0.5) / grids[:, 1:].float() * 2.0 - 1.0  # (B, w)
        lattice = torch.stack(
            [
                x[:, None, :].expand(batch, grid_h, grid_w),
                y[:, :, None].expand(batch, grid_h, grid_w),
            ],
            dim=-1,
        ).to(self.pos_embed.dtype)
        table = self.pos_embed.expand(batch, -1, -1, -1)
        return F.grid_sample(
            table, lattice, mode="bilinear", padding_mode="border", align_corners=False
        )

    @staticmethod
    def _pack(
        sequences: list[Tensor], grids: Tensor, grid_h: int, grid_w: int
    ) -> tuple[list[Tensor], Tensor]:
        """Move each sample's valid patches (row-major) to the front; return them and the mask."""
        device = grids.device
        rows = torch.arange(grid_h, device=device)[None, :, None] < grids[:, 0, None, None]
        cols = torch.arange(grid_w, device=device)[None, None, :] < grids[:, 1, None, None]
        valid = (rows & cols).flatten(1)  # (B, h*w)
        order = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)
        counts = valid.sum(dim=1)
        length = int(counts.max())
        order = order[:, :length]
        packed = [
            torch.gather(s, 1, order[..., None].expand(-1, -1, s.shape[-1])) for s in sequences
        ]
        padding_mask = torch.arange(length, device=device)[None, :] >= counts[:, None]
        return packed, padding_mask
