"""Vision encoder: dynamic resolution, mixed sizes in one batch, interpolated positions."""

import pytest
import torch
import torch.nn.functional as F
from _encoder_helpers import DIM, assert_row_matches

from jin_encoders import EncoderInputError, VisionEncoder, VisionEncoderConfig, image_to_tensor


def _encoder(**fields) -> VisionEncoder:
    torch.manual_seed(0)
    return VisionEncoder(VisionEncoderConfig(dim=DIM, **fields))


def test_default_patch_is_14_with_rgb():
    enc = _encoder()
    assert enc.patch_size == 14 and enc.in_channels == 3 and enc.target_dim == 14 * 14 * 3
    out = enc(torch.randint(0, 256, (2, 3, 56, 42), dtype=torch.uint8))
    assert out.tokens.shape == (2, 12, DIM) and out.grid == (4, 3) and out.padding_mask is None


@pytest.mark.parametrize("channels", [1, 3])
def test_padding_invariance_with_images_of_several_sizes(channels):
    enc = _encoder(patch_size=8, in_channels=channels, pos_grid=4)
    gen = torch.Generator().manual_seed(1)
    sizes = torch.tensor([[40, 33], [17, 9], [24, 40], [8, 8]])
    images = torch.randint(0, 256, (4, channels, 40, 40), dtype=torch.uint8, generator=gen)
    batched = enc(images, sizes=sizes)
    assert batched.grid is None  # grids differ, so I-JEPA block masks cannot assume one
    for row, (h, w) in enumerate(sizes.tolist()):
        alone = enc(images[row : row + 1, :, :h, :w].clone())
        assert_row_matches(batched, row, alone)
    # Whatever is in the collate padding must not leak in.
    noisy = images.clone()
    noisy[0, :, 17:, :] = 255
    noisy_out = enc(noisy, sizes=sizes)
    torch.testing.assert_close(noisy_out.tokens[1], batched.tokens[1])


def test_positions_equal_bilinear_interpolation_of_the_learned_grid():
    enc = _encoder(patch_size=4, in_channels=1, pos_grid=5)
    sizes = torch.tensor([[12, 28], [20, 8]])
    out = enc(torch.zeros(2, 1, 20, 28), sizes=sizes)
    for row, (h, w) in enumerate((sizes // 4).tolist()):
        expected = F.interpolate(enc.pos_embed, size=(h, w), mode="bilinear", align_corners=False)
        expected = expected.flatten(2).transpose(1, 2)[0]
        torch.testing.assert_close(out.pos[row, : h * w], expected, atol=1e-6, rtol=1e-6)


def test_uint8_input_is_normalised_like_the_front_end():
    enc = _encoder(patch_size=8, in_channels=3, pos_grid=4)
    image = torch.randint(0, 256, (3, 16, 24), dtype=torch.uint8)
    a = enc(image[None])
    b = enc(image_to_tensor(image, channels=3)[None])
    torch.testing.assert_close(a.tokens, b.tokens, atol=1e-5, rtol=1e-5)


def test_regression_targets_are_the_patches_of_each_token():
    enc = _encoder(patch_size=4, in_channels=1, pos_grid=2)
    images = torch.arange(2 * 8 * 12, dtype=torch.float32).reshape(2, 1, 8, 12)
    sizes = torch.tensor([[8, 12], [4, 8]])
    targets, mask = enc.regression_targets(images, sizes)
    assert targets.shape == (2, 6, 16) and mask[1].tolist() == [
        False,
        False,
        True,
        True,
        True,
        True,
    ]
    # Token 4 of sample 0 is grid cell (1, 1): rows 4..7, columns 4..7.
    torch.testing.assert_close(targets[0, 4], images[0, 0, 4:8, 4:8].reshape(-1))
    torch.testing.assert_close(targets[1, 1], images[1, 0, 0:4, 4:8].reshape(-1))


def test_bad_input_names_modality_expected_and_received():
    enc = _encoder(patch_size=8, in_channels=3, pos_grid=4)
    with pytest.raises(
        EncoderInputError,
        match=r"image: images: expected \(B,3,H,W\) tensor, received \(2, 1, 16, 16\)",
    ):
        enc(torch.zeros(2, 1, 16, 16))
    with pytest.raises(EncoderInputError, match=r"image: images: expected \(B,3,H,W\)"):
        enc(torch.zeros(3, 16, 16))
    with pytest.raises(EncoderInputError, match="image: images: expected finite values"):
        enc(torch.full((1, 3, 8, 8), float("nan")))
    with pytest.raises(EncoderInputError, match=r"image: sizes: expected \(H_i, W_i\) within"):
        enc(torch.zeros(1, 3, 8, 8), sizes=torch.tensor([[9, 8]]))
    with pytest.raises(  # the dtype is what is wrong, not the (matching) shape
        EncoderInputError,
        match=r"image: sizes: expected integer tensor of shape \(1, 2\), "
        r"received torch.float32 of shape \(1, 2\)",
    ):
        enc(torch.zeros(1, 3, 8, 8), sizes=torch.tensor([[8.0, 8.0]]))
    with pytest.raises(EncoderInputError, match="image: images: expected non-empty"):
        enc(torch.zeros(1, 3, 0, 8))
    with pytest.raises(ValueError, match="in_channels: expected 1 or 3, got 2"):
        VisionEncoderConfig(dim=8, in_channels=2)


def test_absent_images_may_have_zero_size():
    enc = _encoder(patch_size=8, in_channels=1, pos_grid=4)
    images = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    sizes = torch.tensor([[16, 16], [0, 0]])
    out = enc(images, sizes=sizes, present=torch.tensor([True, False]))
    assert bool(out.padding_mask[1].all()) and not bool(out.padding_mask[0].any())
    assert_row_matches(out, 0, enc(images[:1]))


def test_conv_stem_gives_the_patch_grid_and_keeps_padding_invariance_in_eval():
    enc = _encoder(patch_size=8, in_channels=1, pos_grid=4, stem="conv").eval()
    assert enc.target_dim == 64  # regression targets are still the pixels of each patch
    gen = torch.Generator().manual_seed(2)
    sizes = torch.tensor([[40, 33], [17, 9], [24, 40], [8, 8]])
    images = torch.randint(0, 256, (4, 1, 40, 40), dtype=torch.uint8, generator=gen)
    with torch.no_grad():
        batched = enc(images, sizes=sizes)
        assert batched.tokens.shape == (4, 25, DIM) and batched.grid is None
        for row, (h, w) in enumerate(sizes.tolist()):
            # Alone, the convolutions' zero padding surrounds the image; batched, the stem
            # zeroes what lies beyond each image's patches after every stage, to the same effect.
            assert_row_matches(batched, row, enc(images[row : row + 1, :, :h, :w].clone()))


def test_conv_stem_batch_statistics_come_from_present_images_only():
    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8, generator=gen)
    with_absent = _encoder(patch_size=4, in_channels=1, pos_grid=4, stem="conv").train()
    alone = _encoder(patch_size=4, in_channels=1, pos_grid=4, stem="conv").train()
    present = torch.tensor([True, False, True])
    out = with_absent(images, present=present)
    ref = alone(images[present])
    torch.testing.assert_close(out.tokens[present], ref.tokens)
    assert bool((out.tokens[1] == 0).all()) and bool(out.padding_mask[1].all())
    for a, b in zip(with_absent.buffers(), alone.buffers(), strict=True):
        torch.testing.assert_close(a, b)  # running statistics saw the same two images
    none = with_absent(images, present=torch.zeros(3, dtype=torch.bool))
    assert bool(none.padding_mask.all()) and bool((none.tokens == 0).all())


def test_conv_stem_learns_to_tell_images_apart_where_it_is_trained():
    # Two classes that differ only in where a bright bar sits inside a patch; the gradient
    # reaches every stage (a broken mask or pool would leave some parameter without one).
    enc = _encoder(patch_size=4, in_channels=1, pos_grid=2, stem="conv").train()
    images = torch.zeros(8, 1, 8, 8, dtype=torch.uint8)
    images[:4, :, :, 1] = 255
    images[4:, :, :, 2] = 255
    labels = torch.tensor([0] * 4 + [1] * 4)
    head = torch.nn.Linear(DIM, 2)
    loss = F.cross_entropy(head(enc(images).tokens.mean(1)), labels)
    loss.backward()
    assert all(
        p.grad is not None and bool(p.grad.abs().sum() > 0) for p in enc.x_embedder.parameters()
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"patch_size": 14, "stem": "conv"}, "power of two"),
        ({"patch_size": 8, "stem": "conv", "stem_channels": (8, 8)}, "expected 3 positive"),
        ({"patch_size": 8, "stem_channels": (8, 8, 8)}, "only used with stem='conv'"),
        ({"patch_size": 8, "stem": "cnn"}, "stem"),
    ],
)
def test_conv_stem_config_errors_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        VisionEncoderConfig(dim=DIM, **fields)
