"""The zoom pyramid and the adaptive zoom module of z-JEPA (paper §3.5).

Level 0 is the whole image; level i is a crop covering ``zoom_factors[i]`` of the image's side
around a region of interest, resampled to the encoder's resolution, so finer levels see more
detail of a smaller region. Crops around one centre are nested (each lies inside the previous),
which the cross-scale terms of Eq. 4 rely on.

Crops are taken with ``F.affine_grid`` + ``F.grid_sample``: differentiable in the crop box, so the
ROI network of :class:`AdaptiveZoom` learns from whatever loss the crops feed.

Boxes are ``(cy, cx, h, w)`` in fractions of the image (``[0, 1]``, y down, x right).

Shapes: B batch, L zoom levels, C channels, H/W pixels, F global-feature width, T tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jin_zjepa.config import ZJEPAConfig

__all__ = [
    "AdaptiveZoom",
    "ZoomOutput",
    "crop_and_resize",
    "fuse_levels",
    "random_roi_centers",
    "zoom_boxes",
    "zoom_pyramid",
]


def crop_and_resize(images: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear crop of ``boxes`` ``(B, 4)`` from ``images`` ``(B, C, H, W)`` to ``size``.

    With ``align_corners=False`` a normalised coordinate u in [-1, 1] addresses pixel centres at
    ``(2j + 1)/W - 1``, so the affine map ``u_in = w * u_out + (2 cx - 1)`` sends the output pixel
    centres onto the box's pixel centres exactly: an integer-aligned box resampled to its own
    pixel size reproduces plain slicing.
    """
    if images.dim() != 4 or boxes.shape != (images.shape[0], 4) or not images.is_floating_point():
        raise ValueError(
            f"crop_and_resize expects float images (B,C,H,W) (normalised pixels, not uint8) and "
            f"boxes (B,4); got {images.dtype} {tuple(images.shape)} and {tuple(boxes.shape)}"
        )
    cy, cx, h, w = boxes.to(images.dtype).unbind(dim=-1)
    zero = torch.zeros_like(cy)
    theta = torch.stack(
        [torch.stack([w, zero, 2 * cx - 1], dim=-1), torch.stack([zero, h, 2 * cy - 1], dim=-1)],
        dim=1,
    )  # (B, 2, 3), rows act on (x, y, 1)
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], *size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def zoom_boxes(
    centers: Tensor, zoom_factors: Sequence[float], scale: Tensor | None = None
) -> Tensor:
    """Nested boxes ``(B, L, 4)`` around ``centers`` ``(B, 2)`` (cy, cx in [0, 1]).

    Level i has side ``zoom_factors[i]`` (times ``scale`` ``(B,)`` for levels >= 1, capped at 1).
    Each centre is clamped so its box stays inside the image; clamping a common centre keeps the
    boxes nested (a smaller box needs less clamping and stays inside the larger one).
    """
    if centers.dim() != 2 or centers.shape[1] != 2:
        raise ValueError(f"zoom_boxes expects centers (B, 2); got {tuple(centers.shape)}")
    b = centers.shape[0]
    if scale is not None and scale.shape != (b,):
        raise ValueError(f"zoom_boxes expects scale ({b},); got {tuple(scale.shape)}")
    factors_L = torch.as_tensor(zoom_factors, dtype=centers.dtype, device=centers.device)
    side_BL = factors_L.expand(b, -1)
    if scale is not None:
        level0 = torch.zeros_like(side_BL, dtype=torch.bool)
        level0[:, 0] = True
        side_BL = torch.where(level0, side_BL, (side_BL * scale[:, None]).clamp(max=1.0))
    half_BL = side_BL / 2
    cy = torch.clamp(centers[:, :1], min=half_BL, max=1 - half_BL)
    cx = torch.clamp(centers[:, 1:], min=half_BL, max=1 - half_BL)
    return torch.stack([cy, cx, side_BL, side_BL], dim=-1)


def zoom_pyramid(images: Tensor, boxes: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """Crops ``(B, L, C, h, w)`` of ``images`` ``(B, C, H, W)`` at ``boxes`` ``(B, L, 4)``.

    ``size`` defaults to the image size. Flatten to ``(B*L, C, h, w)`` to encode every level in
    one encoder call.
    """
    b, levels = boxes.shape[:2]
    size = tuple(images.shape[-2:]) if size is None else size
    repeated = images.unsqueeze(1).expand(-1, levels, -1, -1, -1).flatten(0, 1)
    crops = crop_and_resize(repeated, boxes.reshape(b * levels, 4), size)
    return crops.unflatten(0, (b, levels))


def random_roi_centers(batch_size: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform random crop centres ``(B, 2)``: the ROI without adaptive zoom (Table 5 rows 2-3)."""
    return torch.rand(batch_size, 2, generator=generator)


def fuse_levels(level_embeddings: Tensor, importance: Tensor) -> Tensor:
    """Importance-weighted sum of pooled level embeddings: ``(B, L, D), (B, L) -> (B, D)``."""
    if level_embeddings.shape[:2] != importance.shape:
        raise ValueError(
            f"fuse_levels: embeddings (B, L, D) {tuple(level_embeddings.shape)} and importance "
            f"(B, L) {tuple(importance.shape)} disagree"
        )
    return torch.einsum("bld,bl->bd", level_embeddings, importance)


def _masked_mean(tokens_BTF: Tensor, padding_mask: Tensor | None) -> Tensor:
    """Mean over the tokens of ``(B, T, F)``, padding (True in ``(B, T)``) left out."""
    if padding_mask is None:
        return tokens_BTF.mean(dim=1)
    if padding_mask.shape != tokens_BTF.shape[:2] or padding_mask.dtype != torch.bool:
        raise ValueError(
            f"AdaptiveZoom: padding_mask must be bool (B, T) = {tuple(tokens_BTF.shape[:2])}; got "
            f"{padding_mask.dtype} {tuple(padding_mask.shape)}"
        )
    total_BF = tokens_BTF.masked_fill(padding_mask[..., None], 0.0).sum(dim=1)
    return total_BF / (~padding_mask).sum(dim=1, keepdim=True).clamp(min=1).to(total_BF.dtype)


@dataclass(frozen=True)
class ZoomOutput:
    """What :class:`AdaptiveZoom` returns."""

    crops: Tensor  # (B, L, C, h, w), level 0 the whole image
    boxes: Tensor  # (B, L, 4) (cy, cx, h, w), differentiable w.r.t. the ROI network
    importance: Tensor  # (B, L) softmax weights over levels


Encoder = Callable[[Tensor], Tensor]


class AdaptiveZoom(nn.Module):
    """The paper's ``AdaptiveZoomModule``: ROI network + importance scorer + foveal crops.

    - ``roi_network`` maps global features ``(B, F)`` to a crop centre (tanh into the image) and a
      scale change in ``[1/r, r]`` (``r = roi_max_scale_change``); its last layer starts at zero,
      so training starts from centred crops at the configured zoom factors.
    - ``importance_scorer`` maps them to softmax weights over levels (uniform at start). They weight
      the levels in :func:`fuse_levels` (the multi-scale embedding for probing and alignment), not
      the JEPA losses: weighting a loss lets the scorer lower it by picking the easiest level.

    The global features are detached: the ROI network reads the encoder's view of the whole image
    but its objective does not reshape the encoder through that path. It learns through the crops.
    """

    def __init__(self, config: ZJEPAConfig, feature_dim: int, hidden_dim: int = 128) -> None:
        super().__init__()
        if config.num_z_levels < 2:
            raise ValueError("AdaptiveZoom needs num_z_levels >= 2 (level 0 is the whole image)")
        self.config = config
        self.feature_dim = feature_dim
        self.roi_network = nn.Sequential(
            nn.LayerNorm(feature_dim), nn.Linear(feature_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, 3),
        )  # fmt: skip
        self.importance_scorer = nn.Sequential(
            nn.LayerNorm(feature_dim), nn.Linear(feature_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, config.num_z_levels),
        )  # fmt: skip
        for head in (self.roi_network[-1], self.importance_scorer[-1]):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def roi(self, global_features: Tensor) -> tuple[Tensor, Tensor]:
        """Crop centres ``(B, 2)`` in ``(0, 1)`` and scale changes ``(B,)``."""
        out = self.roi_network(global_features)
        centers = 0.5 + 0.5 * torch.tanh(out[:, :2])
        scale = torch.exp(torch.tanh(out[:, 2]) * math.log(self.config.roi_max_scale_change))
        return centers, scale

    def forward(
        self,
        images: Tensor,
        global_features: Tensor | None = None,
        encoder: Encoder | None = None,
        size: tuple[int, int] | None = None,
        padding_mask: Tensor | None = None,
    ) -> ZoomOutput:
        """Zoom into ``images`` ``(B, C, H, W)``.

        Pass exactly one of ``global_features`` (``(B, F)`` pooled, or ``(B, T, F)`` tokens that
        are mean-pooled) or ``encoder``, a callable mapping images to either; it is called on the
        whole image. ``size`` is the crops' resolution (the image's by default).
        ``padding_mask`` ``(B, T)`` bool, True at padding, leaves padded tokens out of that mean
        (a batch of several image sizes pads the smaller images' tokens).
        """
        if (global_features is None) == (encoder is None):
            raise ValueError("AdaptiveZoom: pass exactly one of global_features and encoder")
        if images.dim() != 4:
            raise ValueError(f"AdaptiveZoom expects images (B, C, H, W); got {tuple(images.shape)}")
        if global_features is None:
            global_features = encoder(images)
        if global_features.dim() == 3:
            global_features = _masked_mean(global_features, padding_mask)
        elif padding_mask is not None:
            raise ValueError(
                "AdaptiveZoom: padding_mask goes with (B, T, F) token features; got pooled "
                f"features {tuple(global_features.shape)}"
            )
        if global_features.shape != (images.shape[0], self.feature_dim):
            raise ValueError(
                f"AdaptiveZoom: global features must be (B={images.shape[0]}, "
                f"F={self.feature_dim}) or (B, T, F); got {tuple(global_features.shape)}"
            )
        features = global_features.detach()
        centers, scale = self.roi(features)
        boxes = zoom_boxes(centers, self.config.zoom_factors, scale)
        importance = self.importance_scorer(features).softmax(dim=-1)
        return ZoomOutput(zoom_pyramid(images, boxes, size), boxes, importance)
