"""ZJEPAConfig, Table 5 rows, zoom pyramid, differentiable crops and the adaptive zoom module."""

import pytest
import torch

from jin_zjepa import (
    TABLE5_ABLATIONS,
    AdaptiveZoom,
    ZJEPAConfig,
    crop_and_resize,
    fuse_levels,
    random_roi_centers,
    zoom_boxes,
    zoom_pyramid,
)


def test_config_defaults_follow_the_paper_and_validate():
    cfg = ZJEPAConfig()
    assert cfg.num_z_levels == 4 and cfg.zoom_factors == (1.0, 0.5, 0.25, 0.125)
    assert cfg.predict_fine_from_coarse and cfg.predict_coarse_from_fine
    assert cfg.bidirectional_prediction
    with pytest.raises(ValueError, match="one factor per level"):
        ZJEPAConfig(num_z_levels=3)
    with pytest.raises(ValueError, match="strictly decreasing"):
        ZJEPAConfig(zoom_factors=(1.0, 0.5, 0.5, 0.1))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        ZJEPAConfig(zoom_factors=(1.0, 0.5, 0.25, 0.0))
    with pytest.raises(ValueError, match="zoom_factors\\[0\\]"):
        ZJEPAConfig(zoom_factors=(0.9, 0.5, 0.25, 0.1))
    with pytest.raises(ValueError, match="bidirectional_prediction"):
        ZJEPAConfig(predict_coarse_from_fine=False)


def test_config_and_zoom_boxes_refuse_what_gives_nan_or_wrong_shapes():
    """roi_max_scale_change=inf was accepted and every adaptive box but level 0's was NaN; a
    (B, 1) scale broadcast zoom_boxes to (B, B, L, 4)."""
    with pytest.raises(ValueError, match="roi_max_scale_change"):
        ZJEPAConfig(roi_max_scale_change=float("inf"))
    with pytest.raises(ValueError, match=r"scale \(3,\)"):
        zoom_boxes(torch.rand(3, 2), (1.0, 0.5), torch.ones(3, 1))
    assert zoom_boxes(torch.rand(3, 2), (1.0, 0.5), torch.ones(3)).shape == (3, 2, 4)


def test_table5_rows_are_five_distinct_cumulative_configs():
    rows = {name: make() for name, make in TABLE5_ABLATIONS.items()}
    assert list(rows) == [
        "single_scale",
        "hierarchical_levels",
        "cross_scale_prediction",
        "adaptive_zoom",
        "bidirectional_feedback",
    ]
    assert rows["single_scale"].num_z_levels == 1
    assert (
        rows["hierarchical_levels"].num_z_levels == 4
        and not rows["hierarchical_levels"].cross_scale
    )
    assert rows["cross_scale_prediction"].predict_fine_from_coarse
    assert not rows["cross_scale_prediction"].adaptive_zoom
    assert (
        rows["adaptive_zoom"].adaptive_zoom and not rows["adaptive_zoom"].predict_coarse_from_fine
    )
    assert rows["bidirectional_feedback"] == ZJEPAConfig()
    assert TABLE5_ABLATIONS["single_scale"]() is not TABLE5_ABLATIONS["single_scale"]()
    assert len({r.model_dump_json() for r in rows.values()}) == 5


def test_integer_roi_crop_equals_slicing():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 2, 16, 20, generator=g, dtype=torch.float64)
    y0, x0, h, w = 3, 5, 8, 6
    box = torch.tensor([(y0 + h / 2) / 16, (x0 + w / 2) / 20, h / 16, w / 20], dtype=torch.float64)
    crop = crop_and_resize(images, box.expand(3, 4), (h, w))
    torch.testing.assert_close(crop, images[:, :, y0 : y0 + h, x0 : x0 + w], rtol=0, atol=1e-10)
    # The uint8 images of a jin-data batch are named, not reported as torch's "theta".
    with pytest.raises(
        ValueError, match=r"crop_and_resize expects float images .* got torch.uint8"
    ):
        crop_and_resize(images.to(torch.uint8), box.expand(3, 4), (h, w))


def test_level0_is_the_image_and_boxes_are_nested_inside_the_image():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.02, 0.98], [0.5, 0.5], [0.9, 0.1]])
    boxes = zoom_boxes(centers, (1.0, 0.5, 0.25, 0.125))
    top_left, bottom_right = (
        boxes[..., :2] - boxes[..., 2:] / 2,
        boxes[..., :2] + boxes[..., 2:] / 2,
    )
    assert bool((top_left >= -1e-6).all() and (bottom_right <= 1 + 1e-6).all())
    assert bool((top_left[:, 1:] >= top_left[:, :-1] - 1e-6).all())  # each inside the previous
    assert bool((bottom_right[:, 1:] <= bottom_right[:, :-1] + 1e-6).all())
    images = torch.rand(3, 1, 16, 16, generator=g)
    crops = zoom_pyramid(images, boxes)
    assert crops.shape == (3, 4, 1, 16, 16)
    torch.testing.assert_close(crops[:, 0], images)
    assert random_roi_centers(4, torch.Generator().manual_seed(0)).shape == (4, 2)


def test_adaptive_zoom_gradients_reach_the_roi_network():
    torch.manual_seed(0)
    cfg = ZJEPAConfig()
    zoom = AdaptiveZoom(cfg, feature_dim=8, hidden_dim=16)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 16), torch.linspace(0, 1, 16), indexing="ij")
    images = (torch.sin(6 * yy) + torch.cos(5 * xx)).expand(2, 1, 16, 16)  # smooth: nonzero grads
    encoder = torch.nn.Sequential(torch.nn.Flatten(2), torch.nn.Linear(256, 8))  # (B, 1, 8) tokens
    out = zoom(images, encoder=encoder)
    assert out.crops.shape == (2, 4, 1, 16, 16) and out.boxes.shape == (2, 4, 4)
    torch.testing.assert_close(out.importance, torch.full((2, 4), 0.25))  # uniform at start
    out.crops[:, 1:].mean(dim=(2, 3, 4)).pow(2).sum().backward()  # a loss on the zoomed levels
    head = zoom.roi_network[-1]
    assert head.weight.grad is not None and float(head.weight.grad.abs().sum()) > 0
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in encoder.parameters())


def test_adaptive_zoom_pools_token_features_without_their_padding():
    torch.manual_seed(1)
    zoom = AdaptiveZoom(ZJEPAConfig(), feature_dim=8)
    for p in zoom.parameters():  # a trained ROI network (the fresh one predicts the centre)
        torch.nn.init.normal_(p, std=0.5)
    images = torch.rand(1, 1, 16, 16)
    tokens = torch.randn(1, 4, 8)
    alone = zoom(images, global_features=tokens)
    # Batched with a larger image: 5 padded slots holding what a backbone leaves there.
    padded = torch.cat([tokens, torch.randn(1, 5, 8)], dim=1)
    mask = torch.arange(9)[None] >= 4
    batched = zoom(images, global_features=padded, padding_mask=mask)
    torch.testing.assert_close(batched.boxes, alone.boxes)
    torch.testing.assert_close(batched.importance, alone.importance)
    with pytest.raises(ValueError, match=r"padding_mask must be bool \(B, T\) = \(1, 9\)"):
        zoom(images, global_features=padded, padding_mask=mask[:, :4])
    with pytest.raises(ValueError, match="padding_mask goes with"):
        zoom(images, global_features=tokens.mean(dim=1), padding_mask=mask)


def test_adaptive_zoom_input_checks_and_fusion():
    zoom = AdaptiveZoom(ZJEPAConfig(), feature_dim=8)
    images = torch.rand(2, 1, 16, 16)
    with pytest.raises(ValueError, match="exactly one"):
        zoom(images)
    with pytest.raises(ValueError, match="F=8"):
        zoom(images, global_features=torch.rand(2, 5))
    fused = fuse_levels(torch.ones(2, 4, 3), torch.full((2, 4), 0.25))
    torch.testing.assert_close(fused, torch.ones(2, 3))
    with pytest.raises(ValueError, match="num_z_levels"):
        AdaptiveZoom(TABLE5_ABLATIONS["single_scale"](), feature_dim=8)
