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
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field, model_validator
from torch import Tensor, nn

from jin_encoders._config import StrictConfig
from jin_encoders.base import EncoderOutput, ModalityEncoder

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ConvStem", "VisionEncoder", "VisionEncoderConfig"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VisionEncoderConfig(StrictConfig):
    """ViT patch embedding; ``pos_grid`` is the side of the learned positional grid.

    ``stem`` picks how pixels become one token per ``patch_size`` square: ``"patch"`` is ViT's
    linear projection of each patch; ``"conv"`` is a small CNN (`ConvStem`) whose output grid is
    the same, for data too small for a ViT to learn translation invariance from.
    """

    dim: int = Field(gt=0)
    patch_size: int = Field(default=14, gt=0)
    in_channels: int = Field(default=3)
    pos_grid: int = Field(default=16, gt=0)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    stem: Literal["patch", "conv"] = "patch"
    stem_channels: tuple[int, ...] | None = Field(
        default=None,
        description="conv stem: channels of each stage, one stage per halving of the resolution "
        "(log2(patch_size) stages); default 32, 64, 128, ...",
    )

    @model_validator(mode="after")
    def _check_channels_and_stats(self) -> VisionEncoderConfig:
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels: expected 1 or 3, got {self.in_channels}")
        if self.stem == "conv":
            stages = self.patch_size.bit_length() - 1
            if self.patch_size < 2 or self.patch_size != 1 << stages:
                raise ValueError(
                    f"patch_size: the conv stem halves the resolution per stage, so it expects a "
                    f"power of two >= 2, got {self.patch_size}"
                )
            channels = self.stem_channels
            if channels is not None and (len(channels) != stages or min(channels) < 1):
                raise ValueError(
                    f"stem_channels: expected {stages} positive channel counts (one per stage "
                    f"of patch_size={self.patch_size}), got {channels}"
                )
        elif self.stem_channels is not None:
            raise ValueError("stem_channels: only used with stem='conv', got stem='patch'")
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


class ConvStem(nn.Module):
    """``(B, C, H, W)`` pixels -> ``(B, D, H/P, W/P)``: log2(P) stages of two 3x3 conv + BN + GELU
    at full resolution, each followed by a 2x2 max-pool, then a 1x1 projection to ``D``. With
    ``spatial_dims=3`` the same on ``(B, C, X, Y, Z)`` voxel grids (3x3x3 convs, 2x2x2 pools): the
    point-cloud encoder's voxel stem.

    The convolutional stem of Xiao et al. 2021 ("Early convolutions help transformers see better"),
    in the VGG form that learns NumberWorld's digits from ~1,700 images: under the same 4-block
    transformer, linear patches read 6% of test images after 1,200 steps, this stem 65% after 300
    and 89% after 1,200 (`benchmarks/results/vision_stem.md`).
    Batch normalisation is what makes it learn at this budget (group, layer or no normalisation
    stayed at chance under the ViT), so the stem has BatchNorm's rules: batch statistics in
    training, running statistics in eval. Its receptive field crosses patch borders, so a token
    also sees its neighbours' pixels (an I-JEPA context token sees a little of masked targets).
    """

    def __init__(
        self,
        in_channels: int,
        dim: int,
        patch_size: int,
        channels: tuple[int, ...] | None = None,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims: expected 2 or 3, got {spatial_dims}")
        conv, norm = (
            (nn.Conv2d, nn.BatchNorm2d) if spatial_dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
        )
        self.pool = F.max_pool2d if spatial_dims == 2 else F.max_pool3d
        stages = patch_size.bit_length() - 1
        channels = channels or tuple(32 << i for i in range(stages))
        # stages[i] is two (conv, BN, GELU) layers; a 2x2 max-pool follows each stage.
        self.stages = nn.ModuleList()
        previous = in_channels
        for width in channels:
            self.stages.append(
                nn.ModuleList(
                    nn.Sequential(
                        conv(source, width, 3, padding=1, bias=False), norm(width), nn.GELU()
                    )
                    for source in (previous, width)
                )
            )
            previous = width
        self.proj = conv(previous, dim, 1)

    def forward(self, pixels_BCHW: Tensor, valid_BHW: Tensor | None = None) -> Tensor:
        """``valid_BHW`` (bool, optional) marks each image's own pixels in a batch of several
        sizes; activations outside are zeroed after every layer, so that an image's tokens are
        those it gets alone, where the convolutions' zero padding surrounds it (in eval mode;
        in training its batch statistics include the padding)."""
        mask = None if valid_BHW is None else valid_BHW[:, None].to(pixels_BCHW.dtype)
        x = pixels_BCHW
        for stage in self.stages:
            for layer in stage:
                x = layer(x)
                if mask is not None:
                    x = x * mask
            x = self.pool(x, 2)
            if mask is not None:
                mask = self.pool(mask, 2)
        return self.proj(x)


class VisionEncoder(ModalityEncoder):
    """Patch embedding (a stride-P convolution or a `ConvStem`) plus an interpolated learned
    positional grid."""

    modality = "image"

    def __init__(self, config: VisionEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.dim = config.dim
        self.patch_size = config.patch_size
        self.in_channels = config.in_channels
        self.x_embedder: nn.Module
        if config.stem == "conv":
            self.x_embedder = ConvStem(
                config.in_channels, config.dim, config.patch_size, config.stem_channels
            )
        else:
            self.x_embedder = nn.Conv2d(
                config.in_channels, config.dim, config.patch_size, stride=config.patch_size
            )
            # MAE/DiT initialise the patch projection like a linear layer on the flattened patch.
            nn.init.xavier_uniform_(self.x_embedder.weight.view(config.dim, -1))
            nn.init.zeros_(self.x_embedder.bias)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.dim, config.pos_grid, config.pos_grid))
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
            present: ``(B,)`` bool; absent samples become all padding. When no sample is present
                ``x`` may be empty (``(B, C, 0, 0)``); the output is then one padded token a row.
        """
        if padding_mask is not None:
            raise self._error("padding_mask", "None (pass sizes (B,2) instead)", "a tensor")
        if (empty := self._empty_absent(x, present)) is not None:
            return empty  # no row has an image: (B, C, 0, 0) from jin-data's collate
        if present is not None and sizes is not None:
            # Absent images may come with size (0, 0); give them one pixel, _finish masks them.
            absent = ~present.to(device=sizes.device, dtype=torch.bool)[:, None]
            sizes = torch.where(absent, torch.ones_like(sizes), sizes)
        pixels, sizes = self._prepare(x, sizes)
        grids = torch.div(sizes + self.patch_size - 1, self.patch_size, rounding_mode="floor")
        patches = self._embed(pixels, grids, present)  # (B, D, h, w)
        batch, _, grid_h, grid_w = patches.shape
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
            raise self._error(
                "sizes",
                f"integer tensor of shape ({batch}, 2)",
                f"{sizes.dtype} of shape {tuple(sizes.shape)}",
            )
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
        pixels = pixels * _inside(sizes, height, width)[:, None].to(pixels.dtype)
        p = self.patch_size
        pixels = F.pad(pixels, (0, (-width) % p, 0, (-height) % p))
        return pixels.to(self.pos_embed.dtype), sizes

    def _embed(self, pixels: Tensor, grids: Tensor, present: Tensor | None) -> Tensor:
        """Pixels -> ``(B, D, h, w)``. A conv stem is told each image's extent (whole patches) and
        sees present images only: its batch statistics are the images', not the placeholders of
        absent ones."""
        if not isinstance(self.x_embedder, ConvStem):
            return self.x_embedder(pixels)
        p = self.patch_size
        extents = grids * p
        valid = None
        if bool((extents != extents.new_tensor(pixels.shape[2:])).any()):
            valid = _inside(extents, pixels.shape[2], pixels.shape[3])
        keep = None if present is None else present.to(device=pixels.device, dtype=torch.bool)
        if keep is None or bool(keep.all()):
            return self.x_embedder(pixels, valid)
        out = pixels.new_zeros(
            pixels.shape[0], self.dim, pixels.shape[2] // p, pixels.shape[3] // p
        )
        if bool(keep.any()):
            out[keep] = self.x_embedder(pixels[keep], None if valid is None else valid[keep])
        return out

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
        valid = _inside(grids, grid_h, grid_w).flatten(1)  # (B, h*w)
        order = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)
        counts = valid.sum(dim=1)
        length = int(counts.max())
        order = order[:, :length]
        packed = [
            torch.gather(s, 1, order[..., None].expand(-1, -1, s.shape[-1])) for s in sequences
        ]
        padding_mask = torch.arange(length, device=device)[None, :] >= counts[:, None]
        return packed, padding_mask


def _inside(sizes: Tensor, height: int, width: int) -> Tensor:
    """``(B, height, width)`` bool: True within each sample's top-left ``sizes[i]`` rectangle."""
    rows = torch.arange(height, device=sizes.device)[None, :, None] < sizes[:, 0, None, None]
    cols = torch.arange(width, device=sizes.device)[None, None, :] < sizes[:, 1, None, None]
    return rows & cols
