"""Cross-scale prediction, Eq. 4: g_i predicts level i+1 from level i, h_{i+1} level i from i+1.

What is predicted: *token maps aligned by the crop geometry*, not pooled level embeddings.

- g_i (fine from coarse): every EMA target token of level i+1, from the online tokens of level i.
  Level i+1's crop lies inside level i's (nested boxes, see ``zoom.py``), so each fine token's
  centre has a place in level i's frame; its mask token carries that place. This is latent
  super-resolution: the coarse view has seen the region, at lower resolution.
- h_{i+1} (coarse from fine): the EMA target tokens of level i that the fine crop covers (cell
  centre inside the crop, plus the cell holding the crop's centre so there is always one), from
  the online tokens of level i+1, each query placed at its position in level i+1's frame. Coarse
  tokens outside the fine crop are not predicted: the fine view has no evidence about them.

Why not pooled embeddings: a pooled fine-crop embedding is underdetermined from the coarse view
unless the predictor also knows where the crop is, and pooling throws away the correspondence
between a detail and its place in the coarse view, which is the signal that ties the levels
together. Token maps aligned through the boxes keep it, reuse the Eq. 1 predictor unchanged, and
let the loss reach the ROI network through both the crops and the query positions.

Positions across levels are continuous (a fine token sits between coarse ones), so the queries
and context tokens carry a 2-D sin-cos embedding (as in MAE/I-JEPA) of fractional coordinates in
units of the source level's tokens, rather than the encoder's integer-grid embedding.

Shapes: B batch, L levels, T tokens per level (gh * gw), N gathered tokens, D width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from jin_zjepa.config import ZJEPAConfig
from jin_zjepa.losses import masked_mse
from jin_zjepa.masks import compact_indices, gather_tokens
from jin_zjepa.predictor import Predictor, PredictorConfig

__all__ = ["CrossScalePredictor", "map_to_frame", "sincos_pos_2d", "token_centers"]


def token_centers(grid: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """Centres ``(T, 2)`` (y, x) of a ``grid`` of tokens, row-major, in the level's [0, 1] frame."""
    gh, gw = grid
    ys = (torch.arange(gh, device=device, dtype=torch.float32) + 0.5) / gh
    xs = (torch.arange(gw, device=device, dtype=torch.float32) + 0.5) / gw
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(gh * gw, 2)


def map_to_frame(coords: Tensor, box_from: Tensor, box_to: Tensor) -> Tensor:
    """Map ``(B, N, 2)`` coordinates in the frame of ``box_from`` ``(B, 4)`` into ``box_to``'s."""
    top_left_from = box_from[:, None, :2] - box_from[:, None, 2:] / 2
    top_left_to = box_to[:, None, :2] - box_to[:, None, 2:] / 2
    image = top_left_from + coords * box_from[:, None, 2:]
    return (image - top_left_to) / box_to[:, None, 2:]


def sincos_pos_2d(coords: Tensor, dim: int, grid: tuple[int, int]) -> Tensor:
    """2-D sin-cos embedding ``(B, N, dim)`` of fractional ``coords`` ``(B, N, 2)``.

    Coordinates are taken in token units of ``grid`` (so neighbouring tokens differ by 1, as for
    the integer-grid embedding of MAE); half the channels encode y, half x.
    """
    if dim % 4:
        raise ValueError(f"sincos_pos_2d needs dim divisible by 4; got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (
        torch.arange(quarter, device=coords.device, dtype=coords.dtype) / quarter
    )
    scale = torch.tensor(grid, device=coords.device, dtype=coords.dtype)
    angles = (coords * scale)[..., None] * omega  # (B, N, 2, dim/4)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def _box_in_frame(box: Tensor, frame: Tensor) -> Tensor:
    """``box`` ``(B, 4)`` expressed in the [0, 1] frame of the box ``frame`` ``(B, 4)``."""
    top_left = frame[:, :2] - frame[:, 2:] / 2
    return torch.cat([(box[:, :2] - top_left) / frame[:, 2:], box[:, 2:] / frame[:, 2:]], dim=-1)


def _covered_cells(box_fine_in_coarse: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(B, T)`` bool: coarse cells with their centre in the fine box, or holding its centre."""
    gh, gw = grid
    centers = token_centers(grid, box_fine_in_coarse.device)[None]  # (1, T, 2)
    mid, half = box_fine_in_coarse[:, None, :2], box_fine_in_coarse[:, None, 2:] / 2
    inside = ((centers - mid).abs() <= half).all(dim=-1)
    cell = (mid[:, 0] * torch.tensor([gh, gw], device=mid.device)).floor().long()
    row = cell[:, 0].clamp(0, gh - 1)
    col = cell[:, 1].clamp(0, gw - 1)
    holds_center = torch.zeros_like(inside)
    holds_center[torch.arange(inside.shape[0]), row * gw + col] = True
    return inside | holds_center


class CrossScalePredictor(nn.Module):
    """The g_i and h_{i+1} predictors of Eq. 4 and the loss summing their terms.

    One narrow :class:`Predictor` per term (the paper indexes g and h by level), built only for
    the directions the config switches on.
    """

    def __init__(self, config: ZJEPAConfig, predictor: PredictorConfig) -> None:
        super().__init__()
        if not config.cross_scale:
            raise ValueError(
                "CrossScalePredictor needs predict_fine_from_coarse or predict_coarse_from_fine"
            )
        if predictor.embed_dim % 4:
            raise ValueError(
                f"CrossScalePredictor needs PredictorConfig.embed_dim divisible by 4 (the queries' "
                f"2-D sin-cos positions); got embed_dim={predictor.embed_dim}"
            )
        self.config = config
        self.embed_dim = predictor.embed_dim
        n = config.num_z_levels - 1
        on_g, on_h = config.predict_fine_from_coarse, config.predict_coarse_from_fine
        self.g = nn.ModuleList(Predictor(predictor) for _ in range(n)) if on_g else None
        self.h = nn.ModuleList(Predictor(predictor) for _ in range(n)) if on_h else None

    def forward(
        self,
        online: Tensor,
        targets: Tensor,
        boxes: Tensor,
        grid: tuple[int, int],
        online_idx: Tensor | None = None,
        online_padding_mask: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Eq. 4 summed over levels; each term is the mean squared error of Eq. 1.

        Args:
            online: ``(B, L, N, D)`` online hidden states per level: the full grid (``N = T``),
                or the context tokens at ``online_idx`` when masks are applied per level.
            targets: ``(B, L, T, D)`` EMA target tokens of every level on the full grid.
            boxes: ``(B, L, 4)`` the crops' boxes (``ZoomOutput.boxes`` or ``zoom_boxes``).
            grid: the token grid ``(gh, gw)`` of every level, ``T = gh * gw``.
            online_idx: ``(B, L, N)`` long grid indices of ``online``'s tokens, or None (full).
            online_padding_mask: ``(B, L, N)`` bool, True at padding, or None.
        """
        b, levels, n, d = online.shape
        t = grid[0] * grid[1]
        if levels != self.config.num_z_levels or d != self.embed_dim:
            raise ValueError(
                f"CrossScalePredictor: online must be (B, L={self.config.num_z_levels}, N, "
                f"D={self.embed_dim}); got {tuple(online.shape)}"
            )
        if targets.shape != (b, levels, t, d) or boxes.shape != (b, levels, 4):
            raise ValueError(
                f"CrossScalePredictor: targets must be {(b, levels, t, d)} and boxes "
                f"{(b, levels, 4)}; got {tuple(targets.shape)} and {tuple(boxes.shape)}"
            )
        if online_idx is None and n != t:
            raise ValueError(
                f"online has N={n} tokens per level but grid {grid} has {t}; pass online_idx"
            )
        centers_T2 = token_centers(grid, online.device).to(online.dtype)
        terms: dict[str, Tensor] = {}
        for i in range(levels - 1):
            for direction, src, dst in (("g", i, i + 1), ("h", i + 1, i)):
                predictors = self.g if direction == "g" else self.h
                if predictors is None:
                    continue
                if online_idx is None:
                    src_coords = centers_T2.expand(b, t, 2)
                else:
                    src_coords = centers_T2[online_idx[:, src]]
                src_mask = None if online_padding_mask is None else online_padding_mask[:, src]
                if direction == "g":
                    # Every fine token, placed in the coarse (source) frame.
                    dst_idx, dst_mask = None, None
                    dst_coords = centers_T2.expand(b, t, 2)
                    target = targets[:, dst]
                else:
                    fine_in_coarse = _box_in_frame(boxes[:, src], boxes[:, dst])
                    dst_idx, dst_mask = compact_indices(_covered_cells(fine_in_coarse, grid))
                    dst_coords = centers_T2[dst_idx]
                    target = gather_tokens(targets[:, dst], dst_idx)
                query_coords = map_to_frame(dst_coords, boxes[:, dst], boxes[:, src])
                pred = predictors[i](
                    online[:, src],
                    src_mask,
                    sincos_pos_2d(query_coords, d, grid),
                    dst_mask,
                    context_pos=sincos_pos_2d(src_coords, d, grid),
                )
                name = f"g{i}" if direction == "g" else f"h{i + 1}"
                terms[name] = masked_mse(pred, target, dst_mask)
        loss = torch.stack(list(terms.values())).sum()
        metrics = {f"cross_scale/{k}": v.detach() for k, v in terms.items()}
        metrics["cross_scale/loss"] = loss.detach()
        return loss, metrics
