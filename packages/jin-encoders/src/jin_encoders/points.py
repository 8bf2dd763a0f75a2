"""Point-cloud encoder (ZIP-0408's 3D modality): FPS centres, k-NN groups, a shared mini-PointNet.

As Point-BERT/Point-MAE tokenise a cloud: ``M`` centres by farthest-point sampling, the ``K``
nearest points of each centre as its group (coordinates relative to the centre, extra features
kept), a two-stage PointNet shared by all groups (per-point MLP, max-pool, concatenate the pooled
feature back, second MLP, max-pool) gives one token per group, and an MLP of the centre coordinates
gives its position. Batch normalisation, which those models use, would make a sample's tokens
depend on its batch, so there is none. Padded points are never chosen as centres nor counted as
neighbours, so a cloud's tokens are the same alone or batched with larger clouds; a cloud with
fewer than ``M`` points gives one group per point and padding after.

With ``frame="pca"`` each cloud is first expressed in its own principal-axes frame (see
`principal_frame`), so its tokens do not change when the cloud is rotated or moved: a classic
canonicalisation (as in PCA-based rotation-invariant point networks) for data whose orientation
carries no meaning, such as scans or NumberWorld's randomly rotated glyphs. The default
``"input"`` keeps the coordinates as given.

Shape legend: B batch, N points, F features per point (3 + C), M groups (tokens), K group size,
D width.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from jin_encoders._config import StrictConfig
from jin_encoders.base import EncoderOutput, ModalityEncoder

__all__ = [
    "PointCloudEncoder",
    "PointCloudEncoderConfig",
    "farthest_point_sample",
    "principal_frame",
]


class PointCloudEncoderConfig(StrictConfig):
    """``num_groups`` centres of ``group_size`` neighbours; ``in_features`` is 3 + C; ``frame``
    "input" (coordinates as given) or "pca" (each cloud in its principal-axes frame)."""

    dim: int = Field(gt=0)
    in_features: int = Field(default=3, ge=3)
    num_groups: int = Field(default=64, gt=0)
    group_size: int = Field(default=16, gt=0)
    hidden: int = Field(default=128, gt=0)
    frame: Literal["input", "pca"] = "input"


def farthest_point_sample(xyz: Tensor, valid: Tensor, num_samples: int) -> Tensor:
    """Indices ``(B, num_samples)`` of farthest-point-sampled valid points of ``xyz (B,N,3)``.

    Starts at each cloud's first valid point. Once a cloud's valid points are exhausted the
    remaining indices repeat valid points (callers mask those groups as padding).
    """
    batch, _, _ = xyz.shape
    rows = torch.arange(batch, device=xyz.device)
    nearest = torch.full(valid.shape, float("inf"), device=xyz.device, dtype=xyz.dtype)
    nearest = nearest.masked_fill(~valid, -1.0)
    current = valid.to(torch.uint8).argmax(dim=1)
    chosen = []
    # The M steps are inherently sequential; each step is vectorised over the batch.
    for _ in range(num_samples):
        chosen.append(current)
        step = (xyz - xyz[rows, current][:, None, :]).square().sum(dim=-1)
        nearest = torch.where(valid, torch.minimum(nearest, step), nearest)
        current = nearest.argmax(dim=1)
    return torch.stack(chosen, dim=1)


def principal_frame(xyz: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Each cloud's centroid ``(B,3)`` and principal axes ``(B,3,3)`` (as columns), from its
    valid points only.

    The axes are the eigenvectors of the covariance by decreasing variance; the first two point
    where the cloud's third moment along them is positive, the third completes a right-handed
    frame. ``(xyz - centre) @ axes`` is then the same for a cloud and any rotation or translation
    of it: rotating by ``R`` turns the covariance into ``R C R^T`` and each axis into ``R a``, so
    the projections do not change. Where two variances tie (a disc, a sphere) or a third moment
    is zero (a shape symmetric about the plane) that choice is not unique and the frame is only
    as stable as the tie is exact. Computed in float32 without gradient (the frame is a function
    of the input, not a parameter); the caller's projection keeps the input's gradient.
    """
    with torch.no_grad():
        points = xyz.float()
        weight = valid.to(points.dtype)[..., None]
        count = weight.sum(dim=1).clamp(min=1.0)
        centre = (points * weight).sum(dim=1) / count
        centred = (points - centre[:, None]) * weight
        covariance = centred.transpose(1, 2) @ centred / count[..., None]
        axes = torch.linalg.eigh(covariance).eigenvectors.flip(-1)  # decreasing variance
        third = (centred @ axes).pow(3).sum(dim=1)  # (B, 3)
        axes = axes * torch.where(third < 0, -1.0, 1.0)[:, None, :]
        axes[..., 2] = torch.linalg.cross(axes[..., 0], axes[..., 1], dim=-1)
    return centre.to(xyz.dtype), axes.to(xyz.dtype)


class PointCloudEncoder(ModalityEncoder):
    """FPS-centred, k-NN grouped mini-PointNet tokens with centre-coordinate positions."""

    modality = "points"

    def __init__(self, config: PointCloudEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.dim = config.dim
        hidden = config.hidden
        self.point_mlp = nn.Sequential(
            nn.Linear(config.in_features, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.group_mlp = nn.Sequential(
            nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Linear(hidden, config.dim)
        )
        self.pos_mlp = nn.Sequential(nn.Linear(3, hidden), nn.GELU(), nn.Linear(hidden, config.dim))

    @property
    def target_dim(self) -> int:
        """The point regression head predicts each group's ``K`` relative xyz: ``3 * K`` values."""
        return 3 * self.config.group_size

    def group(
        self, x: Tensor, padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Centres and neighbourhoods of a padded batch of clouds.

        Returns ``centres (B,M,3)`` (in each cloud's principal frame with ``frame="pca"``),
        ``neighbours (B,M,K,F)`` with xyz relative to the centre,
        ``neighbour_valid (B,M,K)`` and ``group_mask (B,M)`` (True at padding).
        """
        self._check_input(x, padding_mask)
        batch, points, _ = x.shape
        valid = (
            torch.ones(batch, points, dtype=torch.bool, device=x.device)
            if padding_mask is None
            else ~padding_mask
        )
        counts = valid.sum(dim=1)
        self._check_not_empty(counts, None, "point")
        num_groups = min(self.config.num_groups, points)
        group_size = min(self.config.group_size, points)
        if self.config.frame == "pca":
            centre, axes = principal_frame(x[..., :3], valid)
            x = torch.cat([(x[..., :3] - centre[:, None]) @ axes, x[..., 3:]], dim=-1)
        xyz = x[..., :3]
        centre_idx = farthest_point_sample(xyz, valid, num_groups)  # (B, M)
        centres = torch.gather(xyz, 1, centre_idx[..., None].expand(-1, -1, 3))
        # Exact squared distances (not cdist's matmul form, whose rounding depends on sizes).
        dist = (centres[:, :, None, :] - xyz[:, None, :, :]).square().sum(dim=-1)  # (B, M, N)
        dist = dist.masked_fill(~valid[:, None, :], float("inf"))
        near_dist, near_idx = dist.topk(group_size, dim=-1, largest=False, sorted=True)
        gathered = torch.gather(
            x[:, None].expand(-1, num_groups, -1, -1),
            2,
            near_idx[..., None].expand(-1, -1, -1, x.shape[-1]),
        )  # (B, M, K, F)
        relative = torch.cat([gathered[..., :3] - centres[:, :, None, :], gathered[..., 3:]], -1)
        neighbour_valid = torch.isfinite(near_dist)
        group_mask = torch.arange(num_groups, device=x.device)[None, :] >= counts[:, None]
        return centres, relative, neighbour_valid, group_mask

    def forward(
        self, x: Tensor, padding_mask: Tensor | None = None, present: Tensor | None = None
    ) -> EncoderOutput:
        """Encode clouds ``x (B,N,3+C)`` with ``padding_mask (B,N)`` True at padded points."""
        if present is not None and padding_mask is not None:
            # Absent clouds may be empty: give them one fake point so grouping stays defined.
            empty = (~padding_mask).sum(dim=1) == 0
            padding_mask = padding_mask.clone()
            padding_mask[:, 0] &= ~(empty & ~present.to(torch.bool))
        centres, neighbours, neighbour_valid, group_mask = self.group(x, padding_mask)
        dtype = self.pos_mlp[0].weight.dtype
        centres, neighbours = centres.to(dtype), neighbours.to(dtype)
        features = self.point_mlp(neighbours)  # (B, M, K, hidden)
        pooled = self._masked_max(features, neighbour_valid)
        features = torch.cat([features, pooled[:, :, None].expand_as(features)], dim=-1)
        tokens = self._masked_max(self.group_mlp(features), neighbour_valid)
        pos = self.pos_mlp(centres)
        return self._finish(tokens + pos, pos, group_mask, present)

    def regression_targets(
        self, x: Tensor, padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Per-token targets ``(B,M,3*K)``: each group's relative xyz, zero past its neighbours."""
        _, neighbours, neighbour_valid, group_mask = self.group(x, padding_mask)
        xyz = neighbours[..., :3] * neighbour_valid[..., None].to(neighbours.dtype)
        xyz = F.pad(xyz, (0, 0, 0, self.config.group_size - xyz.shape[2]))
        return xyz.flatten(2), (group_mask if bool(group_mask.any()) else None)

    def _check_input(self, x: Tensor, padding_mask: Tensor | None) -> None:
        features = self.config.in_features
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != features:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise self._error(
                "points", f"(B,N,{features}) float tensor (xyz + {features - 3})", shape
            )
        if not x.is_floating_point() or x.shape[0] == 0 or x.shape[1] == 0:
            raise self._error("points", "non-empty float (B,N,F)", f"{x.dtype} {tuple(x.shape)}")
        self._check_finite(x, "points")
        self._check_mask(padding_mask, tuple(x.shape[:2]), "padding_mask")

    @staticmethod
    def _masked_max(values: Tensor, valid: Tensor) -> Tensor:
        """Max over the group axis (2) of ``values (B,M,K,H)`` at valid neighbours only."""
        filled = values.masked_fill(~valid[..., None], float("-inf")).amax(dim=2)
        return torch.where(valid.any(dim=2)[..., None], filled, torch.zeros_like(filled))
