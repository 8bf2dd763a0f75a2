"""Point-cloud encoder: FPS + k-NN groups, padding invariance with clouds of different sizes, the
principal-axes frame (rotation and translation invariance)."""

import pydantic
import pytest
import torch
from _encoder_helpers import DIM, assert_row_matches

from jin_encoders import (
    EncoderInputError,
    PointCloudEncoder,
    PointCloudEncoderConfig,
    farthest_point_sample,
    principal_frame,
)
from jin_encoders.vision import ConvStem


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


def test_neighbours_at_equal_distance_do_not_depend_on_the_padding(encoder):
    # A 6x6 grid (neighbours tie at the group-size boundary) with duplicated positions whose
    # extra features differ: the chosen neighbours must be those of the cloud alone.
    grid = torch.stack(torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij"), -1)
    xyz = torch.cat([grid.reshape(-1, 2), torch.zeros(36, 1)], dim=-1).repeat(2, 1)
    cloud = torch.cat([xyz, torch.randn(72, 2, generator=torch.Generator().manual_seed(0))], -1)
    alone = encoder(cloud[None])
    for length in (80, 300, 2000):
        points = torch.zeros(2, length, 5)
        points[0, :72], points[1] = cloud, torch.randn(length, 5)
        mask = torch.zeros(2, length, dtype=torch.bool)
        mask[0, 72:] = True
        assert_row_matches(encoder(points, mask), 0, alone)


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
    with pytest.raises(  # with present the mask was read first: torch's IndexError
        EncoderInputError, match=r"points: padding_mask: expected bool tensor of shape \(2, 4\)"
    ):
        encoder(
            torch.zeros(2, 4, 5), torch.zeros(4, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
        )


def _rotation(seed: int) -> torch.Tensor:
    """A random proper rotation (QR of a Gaussian matrix, signs fixed, det +1)."""
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed)))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.linalg.det(q) > 0 else q * torch.tensor([-1.0, 1.0, 1.0])


def _skewed_cloud(n: int, seed: int, features: int = 2) -> torch.Tensor:
    """(1, n, 3 + features): distinct spreads per axis and a non-zero third moment along each."""
    gen = torch.Generator().manual_seed(seed)
    xyz = torch.empty(n, 3).exponential_(generator=gen) * torch.tensor([3.0, 1.5, 0.4])
    return torch.cat([xyz, torch.randn(n, features, generator=gen)], dim=1)[None]


def test_principal_frame_is_a_right_handed_frame_by_decreasing_variance():
    cloud = _skewed_cloud(200, seed=1)[..., :3] @ _rotation(4).T
    centre, axes = principal_frame(cloud, torch.ones(1, 200, dtype=torch.bool))
    torch.testing.assert_close(axes[0].T @ axes[0], torch.eye(3), atol=1e-5, rtol=0)
    assert torch.linalg.det(axes[0]).item() == pytest.approx(1.0, abs=1e-5)
    projected = (cloud - centre[:, None]) @ axes
    variance = projected.square().mean(dim=1)[0]
    assert variance[0] > variance[1] > variance[2]
    torch.testing.assert_close(projected.mean(dim=1), torch.zeros(1, 3), atol=1e-5, rtol=0)
    assert bool((projected[..., :2].pow(3).sum(dim=1) > 0).all())


def test_principal_frame_ignores_padding():
    cloud = _skewed_cloud(50, seed=2)[..., :3]
    padded = torch.cat([cloud, torch.full((1, 10, 3), 100.0)], dim=1)
    valid = torch.arange(60)[None] < 50
    alone, with_padding = principal_frame(cloud, valid[:, :50]), principal_frame(padded, valid)
    for a, b in zip(alone, with_padding, strict=True):
        torch.testing.assert_close(a, b)


def test_pca_frame_makes_tokens_invariant_to_rotation_and_translation():
    torch.manual_seed(0)
    config = PointCloudEncoderConfig(
        dim=DIM, in_features=5, num_groups=8, group_size=6, hidden=16, frame="pca"
    )
    pca = PointCloudEncoder(config)
    given = PointCloudEncoder(config.model_copy(update={"frame": "input"}))
    given.load_state_dict(pca.state_dict())
    cloud = _skewed_cloud(64, seed=3)
    moved = cloud.clone()
    moved[..., :3] = cloud[..., :3] @ _rotation(7).T + torch.tensor([5.0, -2.0, 0.5])
    torch.testing.assert_close(pca(moved).tokens, pca(cloud).tokens, atol=1e-4, rtol=1e-4)
    # The frame is what makes it so: the same weights on the coordinates as given differ.
    assert not torch.allclose(given(moved).tokens, given(cloud).tokens, atol=1e-2)


def test_pca_frame_keeps_padding_invariance_and_the_input_gradient():
    torch.manual_seed(0)
    encoder = PointCloudEncoder(
        PointCloudEncoderConfig(dim=DIM, in_features=3, num_groups=8, group_size=6, frame="pca")
    )
    counts = torch.tensor([40, 25, 5])
    points = torch.cat([_skewed_cloud(40, seed=s, features=0) for s in (5, 6, 7)])
    mask = torch.arange(40)[None] >= counts[:, None]
    points[mask] = 100.0
    batched = encoder(points, mask)
    for row, n in enumerate(counts.tolist()):
        assert_row_matches(batched, row, encoder(points[row : row + 1, :n].clone()))
    cloud = _skewed_cloud(30, seed=8, features=0).requires_grad_(True)
    encoder(cloud).tokens.sum().backward()
    assert cloud.grad is not None and bool(torch.isfinite(cloud.grad).all())
    assert cloud.grad.abs().sum() > 0


def test_frame_config_names_the_field_and_its_choices():
    with pytest.raises(pydantic.ValidationError, match=r"frame[\s\S]*'input' or 'pca'"):
        PointCloudEncoderConfig(dim=DIM, frame="pcaa")


def _voxel_encoder(frame: str = "input", in_features: int = 5) -> PointCloudEncoder:
    torch.manual_seed(0)
    config = PointCloudEncoderConfig(
        dim=DIM,
        in_features=in_features,
        hidden=16,
        stem="voxels",
        frame=frame,
        voxel_grid=8,
        token_grid=2,
        stem_channels=(4, 8),
    )
    return PointCloudEncoder(config).eval()


def test_voxels_bin_each_real_point_once_with_its_offset():
    encoder = _voxel_encoder(in_features=4)
    # Centroid 0, farthest point at norm 1: voxel coordinate = 4 * xyz + 4 on an 8^3 grid.
    cloud = torch.tensor(
        [
            [
                [1.0, 0.0, 0.0, 2.0],
                [-1.0, 0.0, 0.0, 4.0],
                [0.0, 0.1, 0.5, 6.0],
                [0.0, -0.1, -0.5, 8.0],
            ]
        ]
    )
    padded = torch.cat([cloud, torch.full((1, 3, 4), 50.0)], dim=1)
    mask = torch.tensor([[False] * 4 + [True] * 3])
    voxels, counts = encoder.voxelize(padded, mask)
    assert voxels.shape == (1, 5, 8, 8, 8) and counts.shape == (1, 8, 8, 8)
    assert counts.sum().item() == 4 and counts.max().item() == 1
    # (index, xyz offset from the voxel centre, feature); x=1 lands on the grid's edge.
    expected = [
        ((7, 4, 4), (0.5, -0.5, -0.5), 2.0),
        ((0, 4, 4), (-0.5, -0.5, -0.5), 4.0),
        ((4, 4, 6), (-0.5, -0.1, -0.5), 6.0),
        ((4, 3, 2), (-0.5, 0.1, -0.5), 8.0),
    ]
    for index, offset, feature in expected:
        cell = voxels[(0, slice(None), *index)]
        torch.testing.assert_close(cell[0], torch.log1p(torch.tensor(1.0)))
        torch.testing.assert_close(cell[1:4], torch.tensor(offset), atol=1e-5, rtol=0)
        torch.testing.assert_close(cell[4], torch.tensor(feature))
        assert counts[(0, *index)].item() == 1
    assert bool((voxels[:, 0] > 0).eq(counts > 0).all()), "empty voxels are zero"


def test_voxel_tokens_do_not_depend_on_the_batch_in_eval_mode():
    encoder = _voxel_encoder()
    gen = torch.Generator().manual_seed(3)
    counts = torch.tensor([60, 30, 7, 1])
    points = torch.randn(4, 60, 5, generator=gen)
    mask = torch.arange(60)[None] >= counts[:, None]
    points[mask] = 100.0
    batched = encoder(points, mask)
    assert batched.tokens.shape == (4, 8, DIM)
    for row, n in enumerate(counts.tolist()):
        alone = encoder(points[row : row + 1, :n].clone())
        torch.testing.assert_close(batched.tokens[row], alone.tokens[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched.pos[row], alone.pos[0])
        torch.testing.assert_close(batched.valid_mask[row], alone.valid_mask[0])
    # A single point fills one voxel, so one token is real and seven are padding.
    assert batched.valid_mask[3].sum().item() == 1


def test_voxel_empty_cells_are_padding_and_regression_targets_are_the_cells():
    encoder = _voxel_encoder(in_features=3)
    gen = torch.Generator().manual_seed(5)
    flat = torch.rand(2, 40, 3, generator=gen) * 2 - 1
    flat[..., 2] = 0.3  # a plane: only the upper half of the grid along z holds points
    flat[0, 0, 2] = -0.3  # one point below it in the first cloud
    out = encoder(flat)
    targets, target_mask = encoder.regression_targets(flat)
    assert targets.shape == (2, 8, encoder.target_dim) and encoder.target_dim == 64
    torch.testing.assert_close(torch.expm1(targets).sum(dim=(1, 2)), torch.tensor([40.0, 40.0]))
    assert target_mask is not None
    torch.testing.assert_close(target_mask, ~out.valid_mask)
    assert bool(((torch.expm1(targets).sum(-1) == 0) == target_mask).all())
    assert out.valid_mask[0].sum() > out.valid_mask[1].sum()  # the stray point's cell is a token
    assert bool((out.tokens[~out.valid_mask] == 0).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_voxel_counts_are_exact_in_half_precision(dtype):
    encoder = _voxel_encoder(in_features=3)
    # 2,049 points in one voxel: a bfloat16 running count stops at 256, a float16 one at 2,048.
    cloud = torch.zeros(1, 2050, 3)
    cloud[0, -1] = 1.0
    voxels, counts = encoder.voxelize(cloud.to(dtype))
    assert counts.dtype == torch.float32 and counts.max().item() == 2049
    assert counts.sum().item() == 2050 and voxels.dtype == dtype
    targets, _ = encoder.regression_targets(cloud.to(dtype))
    assert targets.dtype == dtype
    assert targets.max() == torch.log1p(torch.tensor(2049.0)).to(dtype)


def test_voxel_stem_in_the_pca_frame_is_rotation_invariant_and_keeps_the_gradient():
    encoder = _voxel_encoder(frame="pca")
    cloud = _skewed_cloud(64, seed=3)
    moved = cloud.clone()
    moved[..., :3] = cloud[..., :3] @ _rotation(7).T + torch.tensor([5.0, -2.0, 0.5])
    torch.testing.assert_close(encoder.voxelize(moved)[1], encoder.voxelize(cloud)[1])
    torch.testing.assert_close(encoder(moved).tokens, encoder(cloud).tokens, atol=1e-4, rtol=1e-4)
    encoder.train()
    points = torch.cat([cloud, _skewed_cloud(64, seed=4)]).requires_grad_(True)
    encoder(points).tokens.sum().backward()
    grad = points.grad
    assert grad is not None and bool(torch.isfinite(grad).all())
    assert grad[..., :3].abs().sum() > 0 and grad[..., 3:].abs().sum() > 0


def test_voxel_config_names_the_field_and_what_it_expects():
    with pytest.raises(pydantic.ValidationError, match=r"voxel_grid: .*token_grid times a power"):
        PointCloudEncoderConfig(dim=DIM, stem="voxels", voxel_grid=12, token_grid=4)
    with pytest.raises(pydantic.ValidationError, match=r"voxel_grid: .*token_grid times a power"):
        PointCloudEncoderConfig(dim=DIM, stem="voxels", voxel_grid=4, token_grid=4)
    with pytest.raises(pydantic.ValidationError, match=r"stem_channels: expected 2 positive"):
        PointCloudEncoderConfig(dim=DIM, stem="voxels", stem_channels=(8,))
    with pytest.raises(pydantic.ValidationError, match=r"stem_channels: only used with stem='vox"):
        PointCloudEncoderConfig(dim=DIM, stem_channels=(8, 16))
    with pytest.raises(pydantic.ValidationError, match=r"stem[\s\S]*'groups' or 'voxels'"):
        PointCloudEncoderConfig(dim=DIM, stem="voxel")
    with pytest.raises(ValueError, match=r"spatial_dims: expected 2 or 3, got 1"):
        ConvStem(4, DIM, 2, spatial_dims=1)


def test_voxel_stem_batch_statistics_leave_absent_clouds_out():
    encoder = _voxel_encoder().train()
    clouds = torch.cat([_skewed_cloud(32, seed=s) for s in (1, 2, 3)])
    present = torch.tensor([True, False, True])
    placeholder = clouds.clone()
    placeholder[1] = 7.0  # what an absent row holds must not reach the present rows
    with_absent = encoder(placeholder, present=present)
    only_present = encoder(clouds[present])
    torch.testing.assert_close(with_absent.tokens[present], only_present.tokens)
    assert not bool(with_absent.valid_mask[1].any()) and bool((with_absent.tokens[1] == 0).all())
