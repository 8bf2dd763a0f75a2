"""Losses (Eqs. 1, 5, 6, 7) against reference computations, and the collapse diagnostics."""

import math

import pytest
import torch
import torch.nn.functional as F

from jin_zjepa import (
    LogitScale,
    collapse_metrics,
    content_std,
    cross_modal_jepa_loss,
    effective_rank,
    info_nce,
    jepa_loss,
    total_loss,
    zjepa_loss,
)


def _reference_info_nce(a, b, scale):
    """Eq. 6 written out with Python loops in float64, both directions averaged."""
    a = [[float(v) for v in row] for row in a]
    b = [[float(v) for v in row] for row in b]

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    a, b = [unit(r) for r in a], [unit(r) for r in b]
    n = len(a)
    sim = [
        [scale * sum(x * y for x, y in zip(a[i], b[j], strict=True)) for j in range(n)]
        for i in range(n)
    ]
    a2b = (
        -sum(sim[i][i] - math.log(sum(math.exp(sim[i][j]) for j in range(n))) for i in range(n)) / n
    )
    b2a = (
        -sum(sim[j][j] - math.log(sum(math.exp(sim[i][j]) for i in range(n))) for j in range(n)) / n
    )
    return 0.5 * (a2b + b2a)


def test_info_nce_equals_reference():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    loss, metrics = info_nce(a, b, torch.tensor(7.5))
    assert float(loss) == pytest.approx(_reference_info_nce(a, b, 7.5), rel=1e-5)
    assert set(metrics) >= {"align/loss", "align/acc_a2b", "align/acc_b2a", "align/logit_scale"}


def test_info_nce_present_mask_drops_rows_and_single_pair_gives_zero_with_graph():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    present = torch.tensor([True, False, True, True, False])
    loss, _ = info_nce(a, b, 3.0, present)
    assert float(loss) == pytest.approx(_reference_info_nce(a[present], b[present], 3.0), rel=1e-5)
    a.requires_grad_(True)
    zero, m = info_nce(a, b, 3.0, torch.tensor([True, False, False, False, False]))
    zero.backward()
    assert zero.item() == 0.0 and a.grad is not None and float(m["align/pairs"]) == 1.0


def test_logit_scale_returns_clamped_value_and_clamp_keeps_it_movable():
    scale = LogitScale()
    assert scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        scale.log_scale.fill_(10.0)  # as if an optimiser pushed it past log(100)
    assert scale().item() == pytest.approx(100.0, rel=1e-6)
    assert scale.log_scale.item() == 10.0  # forward reads the parameter, never writes it
    scale.clamp_()  # what the training loop runs after optimizer.step()
    assert scale.log_scale.item() == pytest.approx(math.log(100.0))
    scale().backward()
    assert scale.log_scale.grad.item() != 0.0  # on the bound the gradient passes: it can move back
    with torch.no_grad():
        scale.log_scale.fill_(-1.0)
    assert scale().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="init_temperature"):
        LogitScale(init_temperature=0.001)


@pytest.mark.parametrize(
    ("temperature", "max_scale"), [(2.0, 100.0), (math.nan, 100.0), (0.07, math.nan)]
)
def test_logit_scale_refuses_what_it_cannot_store(temperature, max_scale):
    """1/τ below 1 was accepted and started at 1 (the clamp's floor, with no gradient); NaN gave
    a NaN scale."""
    with pytest.raises(ValueError, match="init_temperature"):
        LogitScale(init_temperature=temperature, max_scale=max_scale)


def test_logit_scale_called_once_per_pair_before_one_backward():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(4, 8, generator=g) for _ in range(3))
    scale = LogitScale()
    (info_nce(a, b, scale())[0] + info_nce(a, c, scale())[0]).backward()
    # Reference: the same two losses on one fresh leaf s = exp(log_scale); d/dlog = s * d/ds.
    s = torch.tensor(1 / 0.07, requires_grad=True)
    (info_nce(a, b, s)[0] + info_nce(a, c, s)[0]).backward()
    assert float(scale.log_scale.grad) == pytest.approx(float(s.grad) / 0.07, rel=1e-5)


def test_jepa_loss_normalises_targets_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 4, 8, generator=g) * 5 + 3
    pred = F.layer_norm(target, (8,)).clone()
    pred[1, 3] += 10.0  # a wrong prediction, but at a padded slot
    pad = torch.tensor([[False] * 4, [False, False, False, True]])
    loss, metrics = jepa_loss(pred, target, pad)
    assert float(loss) == pytest.approx(0.0, abs=1e-10)
    assert float(jepa_loss(pred, target)[0]) == pytest.approx(100.0 / 8, rel=1e-5)  # 1 of 8 tokens
    raw, _ = jepa_loss(target, target, normalize_targets=False)
    assert float(raw) == 0.0
    assert "jepa/target_std" in metrics
    with pytest.raises(ValueError, match="padding_mask"):
        jepa_loss(pred, target, pad[:, :3])


def test_masked_losses_select_tokens_so_non_finite_padding_gives_finite_loss_and_grad():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 3, 8, generator=g)
    target[1, 2] = float("nan")  # garbage at a padded target
    pred = torch.randn(2, 3, 8, generator=g)
    pred[0, 1] = float("inf")  # and at a padded prediction
    pred.requires_grad_()
    pad = torch.tensor([[False, True, False], [False, False, True]])
    loss, _ = jepa_loss(pred, target, pad)
    loss.backward()
    keep = ~pad
    expected = (pred.detach()[keep] - F.layer_norm(target[keep], (8,))).pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert pred.grad.isfinite().all() and (pred.grad[pad] == 0).all()
    absent = torch.randn(2, 3, 8, generator=g)
    absent[1] = float("nan")  # the second sample lacks modality B
    pred_b = torch.randn(2, 3, 8, generator=g, requires_grad=True)
    loss_b, _ = cross_modal_jepa_loss(pred_b, absent, present=torch.tensor([True, False]))
    loss_b.backward()
    assert loss_b.isfinite() and pred_b.grad.isfinite().all()
    every_pad = torch.ones(2, 3, dtype=torch.bool)
    zero, _ = jepa_loss(pred, target, every_pad)
    assert zero.item() == 0.0 and zero.requires_grad
    with pytest.raises(ValueError, match="padding_mask must be bool"):
        jepa_loss(pred, target, pad.long())


def test_cross_modal_loss_ignores_absent_pairs():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 4, 8, generator=g)
    pred = F.layer_norm(target, (8,)).clone()
    pred[2] = 5.0
    loss, metrics = cross_modal_jepa_loss(pred, target, present=torch.tensor([True, True, False]))
    assert float(loss) == pytest.approx(0.0, abs=1e-10)
    assert "cross_modal/loss" in metrics
    with pytest.raises(ValueError, match="present"):
        cross_modal_jepa_loss(pred, target, present=torch.tensor([1, 1, 0]))


def test_total_loss_weights_terms_and_skips_absent_ones():
    j, c, a = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0)
    loss, m = total_loss(j, c, a, alpha=0.5, beta=0.25, gamma=2.0)
    assert float(loss) == pytest.approx(0.5 + 0.5 + 8.0)
    assert float(m["total/align_weighted"]) == pytest.approx(8.0)
    loss, m = total_loss(jepa=j, alpha=3.0)
    assert float(loss) == 3.0 and "total/align_weighted" not in m
    with pytest.raises(ValueError, match="at least one"):
        total_loss()
    with pytest.raises(ValueError, match="'jepa'"):
        total_loss(j, alpha=-1.0)


def test_total_loss_refuses_a_nan_weight():
    with pytest.raises(ValueError, match="'align'"):
        total_loss(torch.tensor(1.0), align=torch.tensor(2.0), gamma=math.nan)


def test_zjepa_loss_is_level_mean_plus_cross_scale():
    loss, m = zjepa_loss([torch.tensor(1.0), torch.tensor(3.0)], torch.tensor(0.5))
    assert float(loss) == pytest.approx(2.5) and float(m["zjepa/level1"]) == 3.0


def test_collapse_diagnostics_separate_spread_from_collapsed():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(512, 16, generator=g)
    collapsed = torch.ones(512, 16) + 1e-6 * torch.randn(512, 16, generator=g)
    ok, bad = collapse_metrics(spread), collapse_metrics(collapsed)
    assert 0.9 < float(ok["embed/std_ratio"]) < 1.1  # isotropic Gaussian: std ~ 1/sqrt(D)
    assert float(bad["embed/std_ratio"]) < 1e-4
    assert float(ok["embed/effective_rank"]) > 14 and float(bad["embed/effective_rank"]) < 1.5
    low_rank = torch.randn(512, 2, generator=g) @ torch.randn(2, 16, generator=g)
    assert float(effective_rank(low_rank)) < 2.5
    tokens = torch.randn(8, 4, 16, generator=g)
    assert float(content_std(tokens)) > 0.8
    assert float(content_std(tokens[:1].expand(8, -1, -1) + 0.0)) == 0.0


def test_collapse_diagnostics_give_nan_for_a_batch_of_one_instead_of_raising():
    # A worker batch of one (train.batch_size=2 over 2 workers) stopped jin-orchestrate's step here.
    one = torch.randn(1, 16, generator=torch.Generator().manual_seed(0))
    metrics = collapse_metrics(one)
    assert math.isnan(float(metrics["embed/std"])) and math.isnan(float(metrics["embed/std_ratio"]))
    assert float(metrics["embed/effective_rank"]) == pytest.approx(1.0)
    assert math.isnan(float(content_std(one[:, None])))
    with pytest.raises(ValueError, match="at least one"):
        collapse_metrics(torch.zeros(0, 16))


def test_content_std_leaves_padded_tokens_out():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(4, 6, 8, generator=g)
    collapsed = tokens[:1].expand(4, -1, -1)
    padding = torch.zeros(7, 6, dtype=torch.bool)
    padding[4:] = True  # three absent rows, all padding
    padding[1, 3:] = True  # a smaller sample: its last positions are padding
    junk = torch.randn(7, 6, 8, generator=g)
    junk[5, 0] = float("nan")
    for real in (tokens, collapsed):
        batch = torch.where(padding[..., None], junk, torch.cat([real, real[:3]]))
        # per position, the std over the rows not padded there
        normed = F.layer_norm(batch, (8,))
        expected = torch.stack([normed[~padding[:, t], t].std(dim=0) for t in range(6)]).mean()
        torch.testing.assert_close(content_std(batch, padding), expected)
    assert float(content_std(torch.cat([collapsed, junk[4:]]), padding)) < 1e-6
    no_padding = torch.zeros(4, 6, dtype=torch.bool)
    torch.testing.assert_close(content_std(tokens, no_padding), content_std(tokens))
    lone = torch.ones(2, 6, dtype=torch.bool)
    lone[0] = False  # one valid sample at every position: no spread to measure
    assert math.isnan(float(content_std(tokens[:2], lone)))
    with pytest.raises(ValueError, match="padding_mask"):
        content_std(tokens, padding[:4, :5])
