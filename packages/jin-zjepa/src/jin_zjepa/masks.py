"""Context / target masks for JEPA: I-JEPA multi-block masks (2-D grids), span masks (1-D).

A mask generator returns *indices* into the flattened token sequence (row-major for grids), so the
caller gathers the context with :func:`gather_tokens` and runs the online network on the context
only (I-JEPA §3). Counts that differ per sample are padded to the batch maximum with index 0 and a
``padding_mask`` that is True at padding (docs/CONVENTIONS.md); the mask is ``None`` when every
sample has the same count.

Shapes: B batch, T tokens in the full sequence, N gathered tokens, Nc context, Nt target, K target
blocks / spans, D width.

Everything is sampled with a caller-supplied ``torch.Generator`` on the CPU and is vectorised over
the batch: the only Python loop is the bounded rejection loop that resamples the samples whose
context came out too small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pydantic import Field, model_validator
from torch import Tensor

from jin_zjepa._config import StrictConfig

__all__ = [
    "BlockMasks",
    "MultiBlockMaskConfig",
    "MultiBlockMaskGenerator",
    "SpanMaskConfig",
    "SpanMaskGenerator",
    "SpanMasks",
    "compact_indices",
    "gather_tokens",
]

Range = tuple[float, float]


def _check_range(name: str, value: Range, low: float, high: float, *, open_low: bool) -> None:
    lo, hi = value
    below = lo <= low if open_low else lo < low
    # NaN fails every comparison, so it is refused by name (a NaN scale drew no span at all).
    if math.isnan(lo) or math.isnan(hi) or below or hi > high or lo > hi:
        bracket = "(" if open_low else "["
        raise ValueError(
            f"{name} must be an ordered pair (lo, hi) with lo <= hi inside "
            f"{bracket}{low}, {high}]; got {value}"
        )


def gather_tokens(x_BT: Tensor, idx_BN: Tensor) -> Tensor:
    """Gather tokens by index along dim 1: ``out[b, n] = x[b, idx[b, n]]``.

    ``x_BT`` is ``(B, T, ...)`` (tokens, positions, or a ``(B, T)`` mask); ``idx_BN`` is ``(B, N)``
    long. Returns ``(B, N, ...)``. Padded index slots (index 0 by convention) gather token 0; the
    caller carries the matching padding mask.
    """
    if idx_BN.dim() != 2 or x_BT.dim() < 2 or idx_BN.shape[0] != x_BT.shape[0]:
        raise ValueError(
            f"gather_tokens expects x (B,T,...) and idx (B,N) with the same B; got x "
            f"{tuple(x_BT.shape)} and idx {tuple(idx_BN.shape)}"
        )
    if idx_BN.dtype != torch.long:
        raise ValueError(f"gather_tokens expects idx of dtype torch.long; got {idx_BN.dtype}")
    index = idx_BN.reshape(*idx_BN.shape, *([1] * (x_BT.dim() - 2)))
    return x_BT.gather(1, index.expand(*idx_BN.shape, *x_BT.shape[2:]))


def compact_indices(keep_BT: Tensor) -> tuple[Tensor, Tensor | None]:
    """Turn a boolean keep-mask ``(B, T)`` into ascending indices ``(B, N)`` and a padding mask.

    ``N`` is the largest per-sample count; shorter rows are padded with index 0 and marked True in
    the padding mask, which is ``None`` when every row keeps the same number of tokens.
    """
    counts_B = keep_BT.sum(dim=1)
    n_max = int(counts_B.max()) if keep_BT.numel() else 0
    # A stable sort of ~keep puts the kept positions first, in ascending order.
    order_BT = torch.sort((~keep_BT).to(torch.uint8), dim=1, stable=True).indices
    idx_BN = order_BT[:, :n_max]
    padding_BN = torch.arange(n_max, device=keep_BT.device) >= counts_B[:, None]
    if not bool(padding_BN.any()):
        return idx_BN, None
    return idx_BN.masked_fill(padding_BN, 0), padding_BN


class MultiBlockMaskConfig(StrictConfig):
    """I-JEPA multi-block masking (Assran et al. 2023, §3 and Appendix C; their defaults).

    One large context block and ``num_targets`` small target blocks of varied aspect ratio; target
    tokens are removed from the context so the predictor never sees what it predicts. Scales are
    fractions of the grid's area; on a grid too narrow for a block's aspect ratio (a wide image's
    grid), the side that does not fit is cut and the other lengthened to keep that area. Ranges
    must be finite.
    """

    num_targets: int = Field(4, ge=1)
    target_scale: Range = (0.15, 0.2)
    target_aspect_ratio: Range = (0.75, 1.5)
    context_scale: Range = (0.85, 1.0)
    context_aspect_ratio: Range = (1.0, 1.0)
    min_context_tokens: int = Field(4, ge=1)
    max_tries: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _check_ranges(self) -> MultiBlockMaskConfig:
        _check_range("target_scale", self.target_scale, 0.0, 1.0, open_low=True)
        _check_range("context_scale", self.context_scale, 0.0, 1.0, open_low=True)
        _check_range("target_aspect_ratio", self.target_aspect_ratio, 0.0, 10.0, open_low=True)
        _check_range("context_aspect_ratio", self.context_aspect_ratio, 0.0, 10.0, open_low=True)
        return self


@dataclass(frozen=True)
class BlockMasks:
    """Output of :class:`MultiBlockMaskGenerator`.

    ``target_idx`` concatenates the ``num_targets`` blocks, each ``block_shape[0] * block_shape[1]``
    tokens, so ``target_idx.view(B, num_targets, -1)`` recovers the blocks. Blocks may overlap each
    other (as in I-JEPA); an overlapped token is then predicted, and weighted, once per block.
    """

    context_idx: Tensor  # (B, Nc) long, ascending
    context_padding_mask: Tensor | None  # (B, Nc) bool, True at padding
    target_idx: Tensor  # (B, Nt) long, Nt = num_targets * block area
    target_padding_mask: Tensor | None  # always None: every sample has Nt targets
    num_targets: int
    block_shape: tuple[int, int]


def _block_shape(
    scale: float, aspect: float, grid: tuple[int, int], *, leave_one: bool
) -> tuple[int, int]:
    h, w = grid
    area = scale * h * w
    bh = max(round(math.sqrt(area * aspect)), 1)
    bw = max(round(math.sqrt(area / aspect)), 1)
    # Targets must leave room for a context (I-JEPA shrinks until the block fits strictly).
    max_h, max_w = (max(h - 1, 1), max(w - 1, 1)) if leave_one else (h, w)
    # A side cut to fit gives its area to the other side: the block keeps its scale, not its
    # aspect ratio, on a grid too narrow for it (a square 85-100% context block on a 4x16 grid
    # covered 44-50%). A block that fits is unchanged (with the default ranges, every block on a
    # square grid of 3x3 or more).
    if bh > max_h:
        bh, bw = max_h, max(round(area / max_h), 1)
    if bw > max_w:
        bw, bh = max_w, min(max(round(area / max_w), 1), max_h)
    return bh, bw


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _block_masks(
    batch: int, k: int, shape: tuple[int, int], grid: tuple[int, int], gen: torch.Generator | None
) -> Tensor:
    """``(batch, k, h*w)`` bool masks of ``k`` blocks of one shape at random positions."""
    h, w = grid
    bh, bw = shape
    top = torch.randint(0, h - bh + 1, (batch, k, 1, 1), generator=gen)
    left = torch.randint(0, w - bw + 1, (batch, k, 1, 1), generator=gen)
    rows = torch.arange(h).view(1, 1, h, 1)
    cols = torch.arange(w).view(1, 1, 1, w)
    inside = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
    return inside.reshape(batch, k, h * w)


class MultiBlockMaskGenerator:
    """Samples I-JEPA multi-block masks for a batch of ``(h, w)`` token grids.

    As in I-JEPA, the block *shapes* are drawn once per call and shared by the batch, so every
    sample has the same number of target tokens (no target padding); block *positions* are drawn
    per sample. Context counts differ per sample (targets are cut out of the context block) and
    are padded. A sample whose context keeps fewer than ``min_context_tokens`` is redrawn, up to
    ``max_tries`` times; one still short then takes every non-target token as context (and, if
    need be, its target blocks stacked in one place). A grid that one target block leaves too
    little context raises a ValueError naming it.
    """

    def __init__(self, config: MultiBlockMaskConfig | None = None) -> None:
        self.config = config or MultiBlockMaskConfig()

    def __call__(
        self, batch_size: int, grid: tuple[int, int], generator: torch.Generator | None = None
    ) -> BlockMasks:
        cfg = self.config
        h, w = grid
        if batch_size < 1 or h < 1 or w < 1 or h * w < 2:
            raise ValueError(
                f"MultiBlockMaskGenerator needs batch_size >= 1 and a grid with >= 2 tokens; got "
                f"batch_size={batch_size}, grid={grid}"
            )
        t_shape = _block_shape(
            _uniform(*cfg.target_scale, generator),
            _uniform(*cfg.target_aspect_ratio, generator),
            grid,
            leave_one=True,
        )
        c_shape = _block_shape(
            _uniform(*cfg.context_scale, generator),
            _uniform(*cfg.context_aspect_ratio, generator),
            grid,
            leave_one=False,
        )
        targets_BKT = _block_masks(batch_size, cfg.num_targets, t_shape, grid, generator)
        context_BT = _block_masks(batch_size, 1, c_shape, grid, generator)[:, 0]
        context_BT &= ~targets_BKT.any(dim=1)
        if h * w - t_shape[0] * t_shape[1] < cfg.min_context_tokens:
            raise ValueError(
                f"multi-block masks on grid {grid}: a target block of shape {t_shape} leaves "
                f"fewer than min_context_tokens={cfg.min_context_tokens} context tokens; lower "
                "target_scale or min_context_tokens, or use larger inputs"
            )
        for _ in range(cfg.max_tries):
            short_B = context_BT.sum(dim=1) < cfg.min_context_tokens
            n_short = int(short_B.sum())
            if n_short == 0:
                break
            new_targets = _block_masks(n_short, cfg.num_targets, t_shape, grid, generator)
            new_context = _block_masks(n_short, 1, c_shape, grid, generator)[:, 0]
            targets_BKT[short_B] = new_targets
            context_BT[short_B] = new_context & ~new_targets.any(dim=1)
        short_B = context_BT.sum(dim=1) < cfg.min_context_tokens
        if bool(short_B.any()):
            # Redrawing alone can fail on small grids (3x4: ~2% of batches of 8 did). Then the
            # context is every token outside the targets, and where that is still short the
            # blocks are stacked on the first one's place: the most context their shape leaves,
            # at least min_context_tokens by the check above. No draw is made here, so masks
            # that redrawing settles are unchanged.
            context_BT[short_B] = ~targets_BKT[short_B].any(dim=1)
            stack_B = context_BT.sum(dim=1) < cfg.min_context_tokens
            if bool(stack_B.any()):
                first = targets_BKT[stack_B][:, :1]
                targets_BKT[stack_B] = first.expand(-1, cfg.num_targets, -1)
                context_BT[stack_B] = ~first[:, 0]
        context_idx, context_padding = compact_indices(context_BT)
        # Each block has exactly bh*bw tokens, so the per-block compaction never pads.
        block_idx = compact_indices(targets_BKT.reshape(batch_size * cfg.num_targets, h * w))[0]
        return BlockMasks(
            context_idx=context_idx,
            context_padding_mask=context_padding,
            target_idx=block_idx.reshape(batch_size, -1),
            target_padding_mask=None,
            num_targets=cfg.num_targets,
            block_shape=t_shape,
        )


class SpanMaskConfig(StrictConfig):
    """Span masking for 1-D token sequences (audio frames, text bytes).

    ``num_targets`` contiguous target spans, each covering a fraction in ``target_scale`` of the
    sample's *valid* length (at least one token); the context is every other valid token. Defaults
    mirror the multi-block ones in 1-D: four spans of 10-15% each, so about half the sequence is
    predicted from the rest. A sample whose spans leave fewer than ``min_context_tokens`` context
    tokens is redrawn up to ``max_tries`` times; if it is still short (likely only for short lengths
    or wide spans), its targets are cut to the first ``length - min_context_tokens`` of them, so
    every accepted length yields a mask.
    """

    num_targets: int = Field(4, ge=1)
    target_scale: Range = (0.10, 0.15)
    min_context_tokens: int = Field(1, ge=1)
    max_tries: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _check_ranges(self) -> SpanMaskConfig:
        _check_range("target_scale", self.target_scale, 0.0, 1.0, open_low=True)
        return self


@dataclass(frozen=True)
class SpanMasks:
    """Output of :class:`SpanMaskGenerator`; indices are ascending, padding masks True at padding.

    ``target_idx`` holds the union of the spans (an overlapped token appears once; cut short in a
    sample still short of context after ``max_tries`` redraws), so target counts differ per sample
    and ``target_padding_mask`` is set whenever they do.
    """

    context_idx: Tensor  # (B, Nc) long
    context_padding_mask: Tensor | None  # (B, Nc) bool
    target_idx: Tensor  # (B, Nt) long
    target_padding_mask: Tensor | None  # (B, Nt) bool


class SpanMaskGenerator:
    """Samples target spans inside each sample's valid prefix; never touches padding."""

    def __init__(self, config: SpanMaskConfig | None = None) -> None:
        self.config = config or SpanMaskConfig()

    def _sample(self, lengths_B: Tensor, seq_len: int, gen: torch.Generator | None) -> Tensor:
        """``(B, K, T)`` bool span masks inside ``[0, length)``."""
        cfg = self.config
        lo, hi = cfg.target_scale
        n = lengths_B.shape[0]
        scale_BK = lo + (hi - lo) * torch.rand(n, cfg.num_targets, generator=gen)
        length_B1 = lengths_B[:, None].to(torch.float32)
        span_BK = (scale_BK * length_B1).round().clamp(min=1.0)
        span_BK = torch.minimum(span_BK, length_B1 - 1.0)
        start_BK = (
            torch.rand(n, cfg.num_targets, generator=gen) * (length_B1 - span_BK + 1.0)
        ).floor()
        pos_T = torch.arange(seq_len, dtype=torch.float32)
        start, span = start_BK[..., None], span_BK[..., None]
        return (pos_T >= start) & (pos_T < start + span)

    def __call__(
        self,
        lengths: Tensor,
        seq_len: int | None = None,
        generator: torch.Generator | None = None,
    ) -> SpanMasks:
        """Masks for sequences of valid lengths ``lengths`` ``(B,)`` padded to ``seq_len`` tokens.

        ``seq_len`` defaults to ``lengths.max()``. Every length must be at least
        ``min_context_tokens + 1``; each sample then gets at least one target token and at least
        ``min_context_tokens`` context tokens, disjoint and covering its valid length.
        """
        cfg = self.config
        not_integer = (
            lengths.dtype == torch.bool or lengths.is_floating_point() or lengths.is_complex()
        )
        if lengths.dim() != 1 or not_integer:
            raise ValueError(
                f"SpanMaskGenerator expects integer lengths of shape (B,); got dtype "
                f"{lengths.dtype}, shape {tuple(lengths.shape)}"
            )
        lengths = lengths.detach().to("cpu", torch.long)
        seq_len = int(lengths.max()) if seq_len is None else seq_len
        too_short = lengths < cfg.min_context_tokens + 1
        if bool(too_short.any()) or bool((lengths > seq_len).any()):
            raise ValueError(
                f"span masks need min_context_tokens + 1 = {cfg.min_context_tokens + 1} <= length "
                f"<= seq_len = {seq_len}; got lengths {lengths.tolist()}"
            )
        valid_BT = torch.arange(seq_len) < lengths[:, None]
        spans_BKT = self._sample(lengths, seq_len, generator)
        for _ in range(cfg.max_tries):
            context_count_B = (valid_BT & ~spans_BKT.any(dim=1)).sum(dim=1)
            short_B = context_count_B < cfg.min_context_tokens
            if not bool(short_B.any()):
                break
            spans_BKT[short_B] = self._sample(lengths[short_B], seq_len, generator)
        target_BT = spans_BKT.any(dim=1)
        # Redrawing alone can fail (4 one-token spans over 2 tokens leave a context only when they
        # all coincide), so keep at most the first length - min_context_tokens target tokens. A
        # sample with enough context has no more targets than that and is left as drawn; the cap
        # is >= 1 by the length check above, and every span holds a token, so a target remains.
        max_targets_B1 = (lengths - cfg.min_context_tokens)[:, None]
        target_BT &= target_BT.cumsum(dim=1) <= max_targets_B1
        context_idx, context_padding = compact_indices(valid_BT & ~target_BT)
        target_idx, target_padding = compact_indices(target_BT)
        return SpanMasks(context_idx, context_padding, target_idx, target_padding)
