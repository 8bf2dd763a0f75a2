"""Point-cloud encoder: FPS + k-NN groups, padding invariance with clouds of different sizes."""

import pytest
import torch
from _encoder_helpers import DIM, assert_row_matches

from jin_encoders import (
    EncoderInputError,
    PointCloudEncoder,
    PointCloudEncoderConfig,
    farthest_point_sample,
)


@pytest.fixture
def encoder() -> PointCloudEncoder:
    torch.manual_seed(0)
    config = PointCloudEncoderConfig(dim=DIM, in_features=5, num_groups=8, group_size=6, hidden=16)
    return PointCloudEncoder(config)


def test_padding_invariance_with_clouds_of_different_sizes(encoder):
    gen = torch.Generator().manual_seed(3)
    counts = torch.tensor([60, 30, 7, 3])  # fewer points than groups, and than group size
    points = torch.randn(4, 60, 5, generator=gen)
    mask = torch.arange(60)[None] >= counts[:, None]
    points[mask] = 100.0  # junk padding far away: must never be a centre or a neighbour
    batched = encoder(points, mask)
    assert batched.tokens.shape == (4, 8, DIM)
    for row, n in enumerate(counts.tolist()):
        alone = encoder(points[row : row + 1, :n].clone())
        assert alone.tokens.shape[1] == min(8, n)
        assert_row_matches(batched, row, alone)


def test_farthest_point_sampling_spreads_over_the_cloud():
    # Two tight clusters: the second centre must come from the other cluster.
    xyz = torch.cat([torch.randn(10, 3) * 0.01, torch.randn(10, 3) * 0.01 + 5.0])[None]
    idx = farthest_point_sample(xyz, torch.ones(1, 20, dtype=torch.bool), 2)
    assert idx[0, 0].item() == 0 and idx[0, 1].item() >= 10


def test_groups_are_the_nearest_neighbours_relative_to_the_centre(encoder):
    points = torch.randn(1, 30, 5)
    centres, neighbours, valid, group_mask = encoder.group(points)
    assert centres.shape == (1, 8, 3) and neighbours.shape == (1, 8, 6, 5) and bool(valid.all())
    dist = (points[0, :, None, :3] - centres[0, None]).norm(dim=-1)  # (N, M)
    for group in range(8):
        nearest = dist[:, group].topk(6, largest=False).indices
        torch.testing.assert_close(
            neighbours[0, group, :, :3], points[0, nearest, :3] - centres[0, group]
        )
        torch.testing.assert_close(neighbours[0, group, :, 3:], points[0, nearest, 3:])
    assert not bool(group_mask.any())
    targets, mask = encoder.regression_targets(points)
    assert targets.shape == (1, 8, encoder.target_dim) and mask is None


def test_positions_depend_on_centres_only(encoder):
    points = torch.randn(1, 30, 5)
    moved_features = points.clone()
    moved_features[..., 3:] += 1.0
    a, b = encoder(points), encoder(moved_features)
    torch.testing.assert_close(a.pos, b.pos)
    assert not torch.allclose(a.tokens, b.tokens)


def test_bad_input_names_modality_expected_and_received(encoder):
    with pytest.raises(
        EncoderInputError,
        match=r"points: points: expected \(B,N,5\) float tensor \(xyz \+ 2\), "
        r"received \(2, 10, 3\)",
    ):
        encoder(torch.zeros(2, 10, 3))
    with pytest.raises(EncoderInputError, match="points: points: expected finite values"):
        encoder(torch.full((1, 4, 5), float("nan")))
    with pytest.raises(
        EncoderInputError, match=r"points: batch rows \[0\]: expected at least one point"
    ):
        encoder(torch.zeros(1, 4, 5), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(
        EncoderInputError, match=r"points: padding_mask: expected bool tensor of shape \(1, 4\)"
    ):
        encoder(torch.zeros(1, 4, 5), torch.ones(1, 5, dtype=torch.bool))
