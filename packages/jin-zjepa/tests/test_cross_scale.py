"""Cross-scale prediction (Eq. 4): geometry, terms switched by the flags, gradient to boxes."""

import pytest
import torch

from jin_zjepa import (
    TABLE5_ABLATIONS,
    CrossScalePredictor,
    PredictorConfig,
    ZJEPAConfig,
    map_to_frame,
    token_centers,
    zoom_boxes,
)
from jin_zjepa.cross_scale import _box_in_frame, _covered_cells

PRED = PredictorConfig(embed_dim=16, predictor_dim=8, depth=1, num_heads=2)
GRID = (4, 4)


def test_map_to_frame_round_trip_and_known_point():
    boxes = zoom_boxes(torch.tensor([[0.3, 0.6]]), (1.0, 0.5))
    coarse, fine = boxes[:, 0], boxes[:, 1]
    # The fine crop's centre sits at the ROI in the whole-image frame.
    centre = map_to_frame(torch.tensor([[[0.5, 0.5]]]), fine, coarse)
    torch.testing.assert_close(centre, torch.tensor([[[0.3, 0.6]]]))
    pts = torch.rand(1, 5, 2)
    torch.testing.assert_close(map_to_frame(map_to_frame(pts, fine, coarse), coarse, fine), pts)


def test_covered_cells_are_the_coarse_tokens_under_the_fine_crop():
    coarse = torch.tensor([[0.5, 0.5, 1.0, 1.0]])
    fine = torch.tensor([[0.25, 0.75, 0.5, 0.5]])  # the top-right quadrant
    covered = _covered_cells(_box_in_frame(fine, coarse), GRID).view(1, 4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2, 2:] = True
    assert torch.equal(covered[0], expected)
    tiny = torch.tensor([[0.1, 0.1, 0.05, 0.05]])  # covers no centre: keeps the cell it sits in
    assert _covered_cells(_box_in_frame(tiny, coarse), GRID).sum() == 1


@pytest.mark.parametrize(
    ("row", "terms"),
    [
        ("cross_scale_prediction", {"g0", "g1", "g2"}),
        ("bidirectional_feedback", {"g0", "g1", "g2", "h1", "h2", "h3"}),
    ],
)
def test_terms_follow_the_flags_and_gradients_reach_the_boxes(row, terms):
    torch.manual_seed(0)
    cfg = TABLE5_ABLATIONS[row]()
    model = CrossScalePredictor(cfg, PRED)
    online = torch.randn(2, 4, 16, 16, requires_grad=True)
    targets = torch.randn(2, 4, 16, 16)
    centers = torch.tensor([[0.3, 0.7], [0.6, 0.4]], requires_grad=True)
    boxes = zoom_boxes(centers, cfg.zoom_factors)
    loss, metrics = model(online, targets, boxes, GRID)
    assert {k.split("/")[1] for k in metrics} == terms | {"loss"}
    assert float(loss.detach()) == pytest.approx(
        sum(float(metrics[f"cross_scale/{t}"]) for t in terms)
    )
    loss.backward()
    assert float(online.grad.abs().sum()) > 0 and float(centers.grad.abs().sum()) > 0


def test_context_subsets_via_online_idx():
    torch.manual_seed(0)
    cfg = ZJEPAConfig(num_z_levels=2, zoom_factors=(1.0, 0.5))
    model = CrossScalePredictor(cfg, PRED)
    idx = torch.tensor([[0, 5, 10, 15], [1, 2, 3, 0]]).expand(2, 2, 4).contiguous()
    pad = torch.zeros(2, 2, 4, dtype=torch.bool)
    pad[:, 1, 3] = True
    boxes = zoom_boxes(torch.rand(2, 2), cfg.zoom_factors)
    loss, _ = model(torch.randn(2, 2, 4, 16), torch.randn(2, 2, 16, 16), boxes, GRID, idx, pad)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="online_idx"):
        model(torch.randn(2, 2, 4, 16), torch.randn(2, 2, 16, 16), boxes, GRID)
    with pytest.raises(ValueError, match="needs predict"):
        CrossScalePredictor(TABLE5_ABLATIONS["hierarchical_levels"](), PRED)


def test_width_not_divisible_by_4_is_refused_at_construction_naming_embed_dim():
    """It was built and then failed in forward with an error about sincos_pos_2d."""
    cfg = ZJEPAConfig(num_z_levels=2, zoom_factors=(1.0, 0.5))
    with pytest.raises(ValueError, match="embed_dim=30"):
        CrossScalePredictor(cfg, PredictorConfig(embed_dim=30, predictor_dim=8, num_heads=2))


def test_token_centers_are_row_major():
    c = token_centers((2, 3))
    assert c.shape == (6, 2)
    torch.testing.assert_close(c[1], torch.tensor([0.25, 0.5]))
