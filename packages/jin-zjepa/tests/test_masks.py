"""Masks: shapes, disjointness, coverage statistics, padding, determinism."""

import pytest
import torch

from jin_zjepa import (
    MultiBlockMaskConfig,
    MultiBlockMaskGenerator,
    SpanMaskConfig,
    SpanMaskGenerator,
    compact_indices,
    gather_tokens,
)

GRID = (8, 8)


def _keep(idx, padding):
    return [set(row[~p].tolist()) for row, p in zip(idx, padding, strict=True)]


def _padding_or_false(masks_padding, idx):
    return torch.zeros_like(idx, dtype=torch.bool) if masks_padding is None else masks_padding


def test_multiblock_shapes_disjoint_and_rectangular_blocks():
    gen = MultiBlockMaskGenerator()
    m = gen(16, GRID, generator=torch.Generator().manual_seed(0))
    bh, bw = m.block_shape
    assert m.target_idx.shape == (16, m.num_targets * bh * bw)
    assert m.target_padding_mask is None
    ctx_pad = _padding_or_false(m.context_padding_mask, m.context_idx)
    for b, ctx in enumerate(_keep(m.context_idx, ctx_pad)):
        targets = set(m.target_idx[b].tolist())
        assert ctx.isdisjoint(targets)
        assert len(ctx) >= gen.config.min_context_tokens
        for block in m.target_idx[b].view(m.num_targets, -1):
            rows, cols = block // GRID[1], block % GRID[1]
            assert rows.max() - rows.min() + 1 == bh and cols.max() - cols.min() + 1 == bw
            assert len(set(block.tolist())) == bh * bw
    kept = m.context_idx.masked_fill(ctx_pad, -1)
    assert bool((kept[:, 1:] > kept[:, :-1]).logical_or(ctx_pad[:, 1:]).all())  # ascending
    assert int(m.context_idx.max()) < 64 and int(m.context_idx.min()) >= 0


def test_multiblock_coverage_statistics():
    """Target blocks cover the configured fraction of the grid and reach every cell."""
    cfg = MultiBlockMaskConfig()
    gen = MultiBlockMaskGenerator(cfg)
    g = torch.Generator().manual_seed(1)
    areas, hits, ctx_fracs = [], torch.zeros(64), []
    for _ in range(200):
        m = gen(8, GRID, generator=g)
        areas.append(m.block_shape[0] * m.block_shape[1] / 64)
        hits += torch.bincount(m.target_idx.flatten(), minlength=64)
        pad = _padding_or_false(m.context_padding_mask, m.context_idx)
        ctx_fracs.append(float((~pad).sum(dim=1).float().mean()) / 64)
    areas = torch.tensor(areas)
    # Rounding to whole tokens on an 8x8 grid moves the area by at most about one row/column.
    assert cfg.target_scale[0] - 0.06 <= float(areas.min())
    assert float(areas.max()) <= cfg.target_scale[1] + 0.06
    assert 0.13 <= float(areas.mean()) <= 0.22
    assert bool((hits > 0).all())  # every cell is sometimes a target
    # Four blocks of ~17% with overlap leave roughly a third to a half of the grid as context.
    assert 0.25 <= sum(ctx_fracs) / len(ctx_fracs) <= 0.6


def test_multiblock_is_seeded():
    gen = MultiBlockMaskGenerator()
    a = gen(4, GRID, generator=torch.Generator().manual_seed(7))
    b = gen(4, GRID, generator=torch.Generator().manual_seed(7))
    c = gen(4, GRID, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.target_idx, b.target_idx) and torch.equal(a.context_idx, b.context_idx)
    assert not torch.equal(a.target_idx, c.target_idx)


def test_multiblock_impossible_context_names_grid():
    cfg = MultiBlockMaskConfig(num_targets=8, target_scale=(0.9, 1.0), min_context_tokens=10)
    with pytest.raises(ValueError, match=r"grid \(4, 4\)"):
        MultiBlockMaskGenerator(cfg)(2, (4, 4), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("grid", [(2, 3), (3, 3), (3, 4), (4, 3), (2, 4), (4, 4)])
def test_multiblock_never_gives_up_on_a_grid_with_room_for_a_context(grid):
    gen = MultiBlockMaskGenerator()
    h, w = grid
    for seed in range(150):
        masks = gen(8, grid, generator=torch.Generator().manual_seed(seed))
        bh, bw = masks.block_shape
        assert h * w - bh * bw >= gen.config.min_context_tokens  # else it would have raised
        context = ~masks.context_padding_mask if masks.context_padding_mask is not None else None
        for b in range(8):
            ctx = masks.context_idx[b] if context is None else masks.context_idx[b][context[b]]
            assert len(ctx) >= gen.config.min_context_tokens, (grid, seed, b)
            assert not set(ctx.tolist()) & set(masks.target_idx[b].tolist())


def test_multiblock_refuses_a_grid_one_block_leaves_too_small_naming_it():
    with pytest.raises(ValueError, match=r"grid \(2, 2\).*min_context_tokens=4"):
        MultiBlockMaskGenerator()(8, (2, 2), generator=torch.Generator().manual_seed(0))


def test_mask_config_rejects_bad_ranges():
    with pytest.raises(ValueError, match="target_scale"):
        MultiBlockMaskConfig(target_scale=(0.3, 0.2))
    with pytest.raises(ValueError, match="target_scale"):
        SpanMaskConfig(target_scale=(0.0, 0.2))


@pytest.mark.parametrize("grid", [(4, 16), (16, 4), (2, 16), (1, 32), (14, 25)])
def test_multiblock_blocks_keep_their_scale_on_non_square_grids(grid):
    """A block too tall or wide for the grid keeps its area (a fraction of the grid's), not its
    aspect ratio: a square 85-100% context block on 4x16 covered 44-50%, targets on 2x16 6-9%."""
    h, w = grid
    # Rounding to whole tokens moves a block's share by at most about one row/column's worth.
    tol = 0.06
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        m = MultiBlockMaskGenerator()(2, grid, generator=g)
        share = m.block_shape[0] * m.block_shape[1] / (h * w)
        assert 0.15 - tol <= share <= 0.2 + tol, (seed, m.block_shape)
        # One 1-token target: the context is the context block less at most that token.
        tiny = MultiBlockMaskConfig(num_targets=1, target_scale=(1e-3, 1e-3), min_context_tokens=1)
        m = MultiBlockMaskGenerator(tiny)(1, grid, generator=g)
        assert m.context_idx.shape[1] + 1 >= (0.85 - tol) * h * w, (seed, m.context_idx.shape)


def test_mask_configs_refuse_nan_ranges():
    """NaN passed every comparison of the range check: span masks then drew no target at all."""
    nan = float("nan")
    with pytest.raises(ValueError, match="target_scale"):
        SpanMaskConfig(target_scale=(0.1, nan))
    with pytest.raises(ValueError, match="target_scale"):
        MultiBlockMaskConfig(target_scale=(nan, 0.2))
    with pytest.raises(ValueError, match="context_aspect_ratio"):
        MultiBlockMaskConfig(context_aspect_ratio=(nan, 1.0))


def test_span_masks_stay_inside_valid_lengths():
    lengths = torch.tensor([40, 12, 3, 25])
    gen = SpanMaskGenerator(SpanMaskConfig())
    m = gen(lengths, seq_len=48, generator=torch.Generator().manual_seed(0))
    t_pad = _padding_or_false(m.target_padding_mask, m.target_idx)
    c_pad = _padding_or_false(m.context_padding_mask, m.context_idx)
    for b, length in enumerate(lengths.tolist()):
        targets = set(m.target_idx[b][~t_pad[b]].tolist())
        context = set(m.context_idx[b][~c_pad[b]].tolist())
        assert targets and context and targets.isdisjoint(context)
        assert targets | context == set(range(length))  # everything valid, nothing padded
    assert m.target_padding_mask is not None  # counts differ across these lengths


@pytest.mark.parametrize(
    "cfg",
    [
        SpanMaskConfig(),  # 4 spans: a length-2 row (empty text: BOS, EOS) is short 7 times in 8
        SpanMaskConfig(num_targets=2, target_scale=(0.9, 1.0), min_context_tokens=2),
    ],
    ids=["defaults", "wide-spans"],
)
def test_span_masks_never_fail_on_accepted_lengths(cfg):
    gen = SpanMaskGenerator(cfg)
    lengths = torch.arange(cfg.min_context_tokens + 1, 9).repeat(4)  # every short length, 4x
    seq_len = 10  # some padding after every row
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        m = gen(lengths, seq_len=seq_len, generator=g)
        targets = _keep(m.target_idx, _padding_or_false(m.target_padding_mask, m.target_idx))
        context = _keep(m.context_idx, _padding_or_false(m.context_padding_mask, m.context_idx))
        for length, t, c in zip(lengths.tolist(), targets, context, strict=True):
            assert t and len(c) >= cfg.min_context_tokens and t.isdisjoint(c)
            assert t | c == set(range(length))


def test_span_fraction_matches_config():
    cfg = SpanMaskConfig(num_targets=1, target_scale=(0.2, 0.3))
    lengths = torch.full((500,), 100)
    m = SpanMaskGenerator(cfg)(lengths, generator=torch.Generator().manual_seed(3))
    counts = (~_padding_or_false(m.target_padding_mask, m.target_idx)).sum(dim=1).float()
    assert float(counts.min()) >= 20 and float(counts.max()) <= 30
    assert abs(float(counts.mean()) - 25) < 1.0


def test_span_rejects_too_short_or_float_lengths():
    gen = SpanMaskGenerator()
    with pytest.raises(ValueError, match="lengths"):
        gen(torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="dtype"):
        gen(torch.tensor([5.0, 6.0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_span_rejects_half_precision_lengths_instead_of_truncating(dtype):
    # 5.7 in float16 was taken as length 5 (float32/float64 were refused, the half types not).
    with pytest.raises(ValueError, match="dtype"):
        SpanMaskGenerator()(torch.tensor([5.7, 6.0], dtype=dtype))


def test_gather_tokens_matches_indexing_and_checks_shapes():
    x = torch.randn(3, 10, 4, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([[0, 9], [3, 3], [5, 1]])
    out = gather_tokens(x, idx)
    for b in range(3):
        for n in range(2):
            assert torch.equal(out[b, n], x[b, idx[b, n]])
    assert gather_tokens(x[..., 0] > 0, idx).shape == (3, 2)  # works for (B, T) masks too
    with pytest.raises(ValueError, match="same B"):
        gather_tokens(x, idx[:2])


def test_compact_indices_pads_with_zero_and_marks_padding():
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    idx, pad = compact_indices(keep)
    assert idx.tolist() == [[0, 2, 3], [1, 0, 0]]
    assert pad.tolist() == [[False, False, False], [False, True, True]]
    assert compact_indices(torch.ones(2, 3, dtype=torch.bool))[1] is None
