"""Output heads: PixelDiffusionHead's shapes, start state, conditioning, skips and errors."""

import pytest
import torch

from jin_encoders import PixelDiffusionHead


def _head(seed: int = 0, **kwargs) -> PixelDiffusionHead:
    torch.manual_seed(seed)
    head = PixelDiffusionHead(in_channels=1, dim=16, patch_size=4, channels=(4, 8), **kwargs)
    with torch.no_grad():  # what training does to the zero-initialised last layer
        head.out.weight.normal_(std=0.1)
    return head


def test_encode_gives_the_patch_grid_and_decode_returns_pixels():
    head = _head()
    pixels = torch.randn(3, 1, 8, 12)
    tokens, skips = head.encode(pixels)
    assert tokens.shape == (3, 2 * 3, 16)
    assert [tuple(s.shape) for s in skips] == [(3, 4, 8, 12), (3, 8, 4, 6)]
    out = head.decode(tokens, skips, torch.randn(3, 16))
    assert out.shape == pixels.shape and torch.isfinite(out).all()


def test_a_fresh_head_predicts_zero():
    torch.manual_seed(0)
    head = PixelDiffusionHead(in_channels=3, dim=16, patch_size=2)
    tokens, skips = head.encode(torch.randn(2, 3, 4, 4))
    assert torch.equal(head.decode(tokens, skips, torch.randn(2, 16)), torch.zeros(2, 3, 4, 4))


def test_the_conditioning_vector_and_the_skips_reach_the_output():
    head = _head()
    tokens, skips = head.encode(torch.randn(2, 1, 8, 8))
    c = torch.randn(2, 16)
    out = head.decode(tokens, skips, c)
    assert not torch.allclose(out, head.decode(tokens, skips, c + 1.0))
    # The skips carry full-resolution detail past the token bottleneck.
    nudged = [skips[0] + 0.5, skips[1]]
    assert not torch.allclose(out, head.decode(tokens, nudged, c))


def test_every_parameter_gets_a_gradient():
    head = _head()
    tokens, skips = head.encode(torch.randn(2, 1, 8, 8))
    head.decode(tokens, skips, torch.randn(2, 16)).square().mean().backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_default_widths_double_per_stage():
    head = PixelDiffusionHead(in_channels=1, dim=8, patch_size=8)
    assert head.channels == (32, 64, 128)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patch_size": 6}, "patch_size: expected a power of two"),
        ({"patch_size": 1}, "patch_size: expected a power of two"),
        ({"patch_size": 4, "channels": (8,)}, r"channels: expected 2 positive widths"),
        ({"patch_size": 4, "channels": (8, 0)}, r"channels: expected 2 positive widths"),
    ],
)
def test_bad_configuration_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PixelDiffusionHead(in_channels=1, dim=8, **kwargs)


def test_stage_widths_are_the_heads_rules_naming_the_callers_fields():
    assert PixelDiffusionHead.stage_widths(8) == (32, 64, 128)
    assert PixelDiffusionHead.stage_widths(4, (8, 16)) == (8, 16)
    assert PixelDiffusionHead.stage_widths(4, ()) == (32, 64)
    names = {"patch_name": "vision.patch", "channels_name": "head.widths"}
    with pytest.raises(ValueError, match=r"^vision.patch: expected a power of two >= 2, got 1$"):
        PixelDiffusionHead.stage_widths(1, **names)
    with pytest.raises(
        ValueError, match=r"^head.widths: expected 2 positive widths \(log2 of vision.patch=4\)"
    ):
        PixelDiffusionHead.stage_widths(4, (8,), **names)


def test_an_image_off_the_patch_grid_is_rejected():
    with pytest.raises(ValueError, match=r"multiples of 4, got \(1, 1, 8, 10\)"):
        _head().encode(torch.randn(1, 1, 8, 10))


def test_frames_one_token_per_patch_of_frames_and_back():
    torch.manual_seed(0)
    head = PixelDiffusionHead(in_channels=5, dim=16, patch_size=4, channels=(8, 8), spatial_dims=1)
    with torch.no_grad():
        head.out.weight.normal_(std=0.1)
    frames = torch.randn(3, 5, 12)  # (B, mel bins, frames)
    tokens, skips = head.encode(frames)
    assert tokens.shape == (3, 3, 16)
    assert [tuple(s.shape) for s in skips] == [(3, 8, 12), (3, 8, 6)]
    c = torch.randn(3, 16)
    out = head.decode(tokens, skips, c)
    assert out.shape == frames.shape
    assert not torch.allclose(out, head.decode(tokens, skips, c + 1.0))
    out.square().mean().backward()
    assert [n for n, p in head.named_parameters() if p.grad is None or not p.grad.any()] == []


def test_frames_off_the_patch_grid_or_bad_dims_are_rejected():
    head = PixelDiffusionHead(in_channels=4, dim=8, patch_size=4, spatial_dims=1)
    with pytest.raises(ValueError, match=r"\(B, C, L\) with L multiples of 4, got \(1, 4, 10\)"):
        head.encode(torch.randn(1, 4, 10))
    with pytest.raises(ValueError, match=r"spatial_dims: expected 1 or 2, got 3"):
        PixelDiffusionHead(in_channels=4, dim=8, patch_size=4, spatial_dims=3)
