"""Predictor: shapes, padding isolation, gradient flow, config checks."""

import pytest
import torch

from jin_zjepa import Predictor, PredictorConfig

CFG = PredictorConfig(embed_dim=16, predictor_dim=8, depth=2, num_heads=2)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, 16, generator=g), torch.randn(2, 3, 16, generator=g)


def test_shapes_and_gradients():
    torch.manual_seed(0)
    pred = Predictor(CFG)
    ctx, tpos = _inputs()
    ctx.requires_grad_(True)
    out = pred(ctx, None, tpos, None, context_pos=torch.zeros_like(ctx))
    assert out.shape == (2, 3, 16)
    out.pow(2).sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert all(p.grad is not None for p in pred.parameters())


def test_padded_context_and_targets_do_not_leak():
    torch.manual_seed(0)
    pred = Predictor(CFG).eval()
    ctx, tpos = _inputs()
    ctx_pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    tgt_pad = torch.tensor([[False, False, True], [False, False, False]])
    out = pred(ctx, ctx_pad, tpos, tgt_pad)
    ctx2, tpos2 = ctx.clone(), tpos.clone()
    ctx2[1, 3:] = 100.0  # change only padded context
    tpos2[0, 2] = -50.0  # and a padded target
    out2 = pred(ctx2, ctx_pad, tpos2, tgt_pad)
    torch.testing.assert_close(out[1], out2[1])
    torch.testing.assert_close(out[0, :2], out2[0, :2])


def test_targets_are_permutation_equivariant():
    torch.manual_seed(0)
    pred = Predictor(CFG).eval()
    ctx, tpos = _inputs()
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(pred(ctx, None, tpos[:, perm])[:, :], pred(ctx, None, tpos)[:, perm])


def test_bad_shapes_and_config():
    pred = Predictor(CFG)
    ctx, tpos = _inputs()
    with pytest.raises(ValueError, match="target_pos"):
        pred(ctx, None, tpos[..., :8])
    with pytest.raises(ValueError, match="context_padding_mask"):
        pred(ctx, torch.zeros(2, 4, dtype=torch.bool), tpos)
    with pytest.raises(ValueError, match="divisible"):
        PredictorConfig(embed_dim=16, predictor_dim=10, num_heads=4)
