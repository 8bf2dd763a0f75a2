"""Point-cloud encoder (ZIP-0408's 3D modality): FPS centres, k-NN groups, a shared mini-PointNet.

As Point-BERT/Point-MAE tokenise a cloud: ``M`` centres by farthest-point sampling, the ``K``
nearest points of each centre as its group (coordinates relative to the centre, extra features
kept), a two-stage PointNet shared by all groups (per-point MLP, max-pool, concatenate the pooled
feature back, second MLP, max-pool) gives one token per group, and an MLP of the centre coordinates
gives its position. Batch normalisation, which those models use, would make a sample's tokens
depend on its batch, so there is none. Padded points are never chosen as centres nor counted as
neighbours, so a cloud's tokens are the same alone or batched with larger clouds; a cloud with
fewer than ``M`` points gives one group per point and padding after.

``stem="voxels"`` tokenises differently, for data too small for a transformer to learn the
layout of unordered groups (the analogue of the vision encoder's ``stem="conv"``): each cloud,
centred and scaled into the unit ball, is binned into a ``voxel_grid``^3 grid (per voxel:
log(1 + points), the points' mean offset from the voxel centre, their mean extra features), a 3-D
`ConvStem` (BatchNorm, so batch statistics in training) reduces it to ``token_grid``^3 tokens,
and an MLP of each cell's centre gives its position. Cells with no point are padding; in eval
mode (running statistics) a cloud's tokens do not depend on the clouds it is batched with.

With ``frame="pca"`` each cloud is first expressed in its own principal-axes frame (see
`principal_frame`), so its tokens do not change when the cloud is rotated or moved: a classic
canonicalisation (as in PCA-based rotation-invariant point networks) for data whose orientation
carries no meaning, such as scans or NumberWorld's randomly rotated glyphs. The default
``"input"`` keeps the coordinates as given.

Shape legend: B batch, N points, F features per point (3 + C), M groups (tokens), K group size,
D width, G voxels per side, T tokens per side.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from jin_encoders._config import StrictConfig
from jin_encoders.base import EncoderOutput, ModalityEncoder
from jin_encoders.vision import ConvStem

__all__ = [
    "PointCloudEncoder",
    "PointCloudEncoderConfig",
    "farthest_point_sample",
    "principal_frame",
]


class PointCloudEncoderConfig(StrictConfig):
    """``in_features`` is 3 + C; ``frame`` "input" (coordinates as given) or "pca" (each cloud in
    its principal-axes frame); ``stem`` "groups" (``num_groups`` centres of ``group_size``
    neighbours, a mini-PointNet each) or "voxels" (a ``voxel_grid``^3 grid, a 3-D conv stem with
    one stage of ``stem_channels`` per halving, ``token_grid``^3 tokens)."""

    dim: int = Field(gt=0)
    in_features: int = Field(default=3, ge=3)
    num_groups: int = Field(default=64, gt=0)
    group_size: int = Field(default=16, gt=0)
    hidden: int = Field(default=128, gt=0)
    frame: Literal["input", "pca"] = "input"
    stem: Literal["groups", "voxels"] = "groups"
    voxel_grid: int = Field(default=16, gt=1)
    token_grid: int = Field(default=4, gt=0)
    stem_channels: tuple[int, ...] | None = Field(
        default=None,
        description="voxel stem: channels of each stage, one per halving from voxel_grid to "
        "token_grid; default 32, 64, ...",
    )

    @model_validator(mode="after")
    def _check_voxel_grid(self) -> PointCloudEncoderConfig:
        if self.stem == "groups":
            if self.stem_channels is not None:
                raise ValueError("stem_channels: only used with stem='voxels', got stem='groups'")
            return self
        ratio = self.voxel_grid // self.token_grid
        if self.voxel_grid % self.token_grid or ratio < 2 or ratio & (ratio - 1):
            raise ValueError(
                f"voxel_grid: the voxel stem halves the grid per stage, so it expects token_grid "
                f"times a power of two >= 2, got voxel_grid={self.voxel_grid}, "
                f"token_grid={self.token_grid}"
            )
        stages = ratio.bit_length() - 1
        channels = self.stem_channels
        if channels is not None and (len(channels) != stages or min(channels) < 1):
            raise ValueError(
                f"stem_channels: expected {stages} positive channel counts (one per halving from "
                f"voxel_grid={self.voxel_grid} to token_grid={self.token_grid}), got {channels}"
            )
        return self


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


def _nearest(dist: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` smallest of ``dist (..., N)`` (float32, >= 0 or inf) and their indices,
    ascending, ties in index order: ``dist.sort(stable=True)[..., :k]`` at ``topk``'s cost.

    ``topk`` alone picks among points at equal distance (a grid, duplicated points) in an order
    that depends on ``N``, so a cloud's groups would change with the padding of its batch. The
    bits of a non-negative float32 order as the float does, so one int64 key of the distance's
    bits then the index sorts by distance and breaks ties by index, with no two keys equal.
    """
    bits = dist.contiguous().view(torch.int32).to(torch.int64)
    index = torch.arange(dist.shape[-1], device=dist.device)
    near_idx = ((bits << 32) | index).topk(k, dim=-1, largest=False, sorted=True).indices
    return dist.gather(-1, near_idx), near_idx


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
    """Point-cloud tokens: FPS-centred, k-NN grouped mini-PointNets with centre-coordinate
    positions (``stem="groups"``), or a 3-D conv stem over a voxel grid (``stem="voxels"``)."""

    modality = "points"

    def __init__(self, config: PointCloudEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.dim = config.dim
        hidden = config.hidden
        if config.stem == "groups":
            self.point_mlp = nn.Sequential(
                nn.Linear(config.in_features, hidden), nn.GELU(), nn.Linear(hidden, hidden)
            )
            self.group_mlp = nn.Sequential(
                nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Linear(hidden, config.dim)
            )
        else:
            self.voxel_stem = ConvStem(
                config.in_features + 1,  # log(1 + count), mean xyz offset, mean extra features
                config.dim,
                config.voxel_grid // config.token_grid,
                config.stem_channels,
                spatial_dims=3,
            )
            side = (torch.arange(config.token_grid) + 0.5) * (2.0 / config.token_grid) - 1.0
            cells = torch.stack(torch.meshgrid(side, side, side, indexing="ij"), dim=-1)
            self.register_buffer("cell_centres", cells.reshape(-1, 3), persistent=False)
        self.pos_mlp = nn.Sequential(nn.Linear(3, hidden), nn.GELU(), nn.Linear(hidden, config.dim))

    @property
    def target_dim(self) -> int:
        """The point regression head predicts each group's ``K`` relative xyz (``3 * K`` values),
        or with the voxel stem each token's cell of voxels, log(1 + points) per voxel."""
        if self.config.stem == "voxels":
            return (self.config.voxel_grid // self.config.token_grid) ** 3
        return 3 * self.config.group_size

    def _in_frame(self, x: Tensor, padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Checked input in the configured frame, and ``valid (B,N)`` (True at real points)."""
        self._check_input(x, padding_mask)
        batch, points, _ = x.shape
        valid = (
            torch.ones(batch, points, dtype=torch.bool, device=x.device)
            if padding_mask is None
            else ~padding_mask
        )
        self._check_not_empty(valid.sum(dim=1), None, "point")
        if self.config.frame == "pca":
            centre, axes = principal_frame(x[..., :3], valid)
            x = torch.cat([(x[..., :3] - centre[:, None]) @ axes, x[..., 3:]], dim=-1)
        return x, valid

    def voxelize(self, x: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """A padded batch of clouds as voxel features ``(B, 1+F, G, G, G)`` (in the input's dtype)
        and float32 counts ``(B, G, G, G)``.

        Each cloud (in the configured frame) is centred at its centroid and scaled so its
        farthest point has norm 1, then binned into ``G = voxel_grid`` voxels per side over
        ``[-1, 1]``. Per voxel: log(1 + points), the points' mean offset from the voxel centre in
        voxel units (in ``[-0.5, 0.5]``; the gradient to the input flows through it) and their
        mean extra features; zero where a voxel is empty. Padded points are never counted.
        """
        x, valid = self._in_frame(x, padding_mask)
        batch, _, features = x.shape
        grid = self.config.voxel_grid
        weight = valid[..., None].to(x.dtype)
        with torch.no_grad():  # the centre and scale are constants of the cloud, as the frame is
            count = weight.sum(dim=1, keepdim=True).clamp(min=1.0)
            centre = (x[..., :3] * weight).sum(dim=1, keepdim=True) / count
            radius = ((x[..., :3] - centre) * weight).norm(dim=-1).amax(dim=1)
            scale = grid / 2 / torch.where(radius > 0, radius, torch.ones_like(radius))
        position = ((x[..., :3] - centre) * scale[:, None, None] + grid / 2) * weight
        index = position.detach().floor().clamp(0, grid - 1).long()  # (B, N, 3)
        offset = position - index - 0.5
        flat = (torch.arange(batch, device=x.device)[:, None] * grid + index[..., 0]) * grid
        flat = (flat + index[..., 1]) * grid + index[..., 2]
        values = torch.cat([torch.ones_like(offset[..., :1]), offset, x[..., 3:]], dim=-1) * weight
        # Summed in float32 whatever the input's dtype: a bfloat16 count stops at 256 (256 + 1
        # rounds back to 256) and is inexact past it, half precision's past 2048.
        sums = values.new_zeros(batch * grid**3, features + 1, dtype=torch.float32)
        sums = sums.index_add(0, flat.reshape(-1), values.reshape(-1, features + 1).float())
        counts = sums[:, 0]
        voxels = torch.cat(
            [torch.log1p(counts)[:, None], sums[:, 1:] / counts.clamp(min=1.0)[:, None]], 1
        ).to(x.dtype)
        voxels = voxels.view(batch, grid, grid, grid, features + 1).permute(0, 4, 1, 2, 3)
        return voxels, counts.view(batch, grid, grid, grid)

    def _cells(self, counts: Tensor) -> Tensor:
        """``(B, T^3, k^3)``: each token's cell of ``k = G/T`` voxels per side, row-major."""
        tokens = self.config.token_grid
        k = self.config.voxel_grid // tokens
        cells = counts.reshape(len(counts), tokens, k, tokens, k, tokens, k)
        return cells.permute(0, 1, 3, 5, 2, 4, 6).reshape(len(counts), tokens**3, k**3)

    def group(
        self, x: Tensor, padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Centres and neighbourhoods of a padded batch of clouds (the ``"groups"`` stem).

        Returns ``centres (B,M,3)`` (in each cloud's principal frame with ``frame="pca"``),
        ``neighbours (B,M,K,F)`` with xyz relative to the centre,
        ``neighbour_valid (B,M,K)`` and ``group_mask (B,M)`` (True at padding).
        """
        x, valid = self._in_frame(x, padding_mask)
        counts = valid.sum(dim=1)
        num_groups = min(self.config.num_groups, x.shape[1])
        group_size = min(self.config.group_size, x.shape[1])
        xyz = x[..., :3]
        centre_idx = farthest_point_sample(xyz, valid, num_groups)  # (B, M)
        centres = torch.gather(xyz, 1, centre_idx[..., None].expand(-1, -1, 3))
        # Exact squared distances (not cdist's matmul form, whose rounding depends on sizes).
        dist = (centres[:, :, None, :] - xyz[:, None, :, :]).square().sum(dim=-1)  # (B, M, N)
        dist = dist.masked_fill(~valid[:, None, :], float("inf"))
        near_dist, near_idx = _nearest(dist.float(), group_size)
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
        """Encode clouds ``x (B,N,3+C)`` with ``padding_mask (B,N)`` True at padded points.

        ``present (B,)`` bool: absent clouds become all padding and may be empty; with no cloud
        present ``x`` may have no point at all (``(B, 0, 3+C)``), giving one padded token a row.
        """
        if (empty := self._empty_absent(x, present)) is not None:
            return empty  # no row has a cloud: (B, 0, F) from jin-data's collate
        if present is not None and padding_mask is not None:
            # Absent clouds may be empty: give them one fake point so grouping stays defined.
            self._check_input(x, padding_mask)
            empty = (~padding_mask).sum(dim=1) == 0
            padding_mask = padding_mask.clone()
            padding_mask[:, 0] &= ~(empty & ~present.to(torch.bool))
        dtype = self.pos_mlp[0].weight.dtype
        if self.config.stem == "voxels":
            voxels, counts = self.voxelize(x, padding_mask)
            tokens = self._voxel_tokens(voxels.to(dtype), present)
            empty = self._cells(counts).sum(dim=-1) == 0
            pos = self.pos_mlp(self.cell_centres.to(dtype)).expand(len(tokens), -1, -1)
            return self._finish(tokens + pos, pos, empty, present)
        centres, neighbours, neighbour_valid, group_mask = self.group(x, padding_mask)
        centres, neighbours = centres.to(dtype), neighbours.to(dtype)
        features = self.point_mlp(neighbours)  # (B, M, K, hidden)
        pooled = self._masked_max(features, neighbour_valid)
        features = torch.cat([features, pooled[:, :, None].expand_as(features)], dim=-1)
        tokens = self._masked_max(self.group_mlp(features), neighbour_valid)
        pos = self.pos_mlp(centres)
        return self._finish(tokens + pos, pos, group_mask, present)

    def _voxel_tokens(self, voxels: Tensor, present: Tensor | None) -> Tensor:
        """``(B, T^3, D)`` from the voxel stem, which sees present clouds only: its batch
        statistics are the clouds', not the placeholders of absent ones (as the vision stem)."""
        keep = None if present is None else present.to(device=voxels.device, dtype=torch.bool)
        if keep is None or bool(keep.all()):
            return self.voxel_stem(voxels).flatten(2).transpose(1, 2)
        tokens = voxels.new_zeros(len(voxels), self.config.token_grid**3, self.dim)
        if bool(keep.any()):
            tokens[keep] = self.voxel_stem(voxels[keep]).flatten(2).transpose(1, 2)
        return tokens

    def regression_targets(
        self, x: Tensor, padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Per-token targets: each group's relative xyz ``(B,M,3*K)``, zero past its neighbours;
        with the voxel stem each token's cell, log(1 + points) per voxel ``(B,T^3,k^3)``."""
        if self.config.stem == "voxels":
            cells = self._cells(self.voxelize(x, padding_mask)[1])
            empty = cells.sum(dim=-1) == 0
            return torch.log1p(cells).to(x.dtype), (empty if bool(empty.any()) else None)
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
