"""Front-ends: images from PIL/numpy/tensors, WAV/FLAC bytes at any rate, point normalisation."""

import io
import math
import wave

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from jin_encoders import (
    EncoderInputError,
    collate_images,
    image_to_tensor,
    load_audio,
    normalize_points,
    resample,
)


def test_pil_numpy_and_tensor_images_agree():
    rgb = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    from_pil = image_to_tensor(Image.fromarray(rgb))
    from_numpy = image_to_tensor(rgb)
    from_tensor = image_to_tensor(torch.from_numpy(rgb).permute(2, 0, 1))
    assert from_pil.shape == (3, 10, 12) and from_pil.dtype == torch.float32
    assert torch.equal(from_pil, from_numpy) and torch.equal(from_numpy, from_tensor)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - mean[:, None, None]) / std[
        :, None, None
    ]
    torch.testing.assert_close(from_pil, expected)


def test_channel_conversion_and_uint8_output():
    gray = np.full((4, 5), 200, dtype=np.uint8)
    assert image_to_tensor(gray, channels=3, normalize=False).shape == (3, 4, 5)
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    luma = image_to_tensor(rgba, channels=1, normalize=False)
    assert luma.shape == (1, 4, 5) and int(luma[0, 0, 0]) == round(0.299 * 255)
    pil_gray = image_to_tensor(Image.fromarray(gray), channels=1)
    torch.testing.assert_close(pil_gray, torch.full((1, 4, 5), (200 / 255 - 0.5) / 0.5))


@pytest.mark.parametrize(("channels", "normalize"), [(1, True), (1, False), (3, True)])
def test_image_to_tensor_stays_on_the_images_device(channels, normalize):
    # The meta device stands in for an accelerator: a host constant meeting a meta tensor fails
    # as it would meeting a GPU one.
    image = torch.zeros(3, 4, 5, dtype=torch.uint8, device="meta")
    out = image_to_tensor(image, channels=channels, normalize=normalize)
    assert out.device == torch.device("meta") and out.shape == (channels, 4, 5)


def test_wide_and_float_pil_images_keep_their_range():
    # Pillow's convert("RGB") clips a 16-bit image at 255 and truncates a float one to 0/1.
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    wide = image_to_tensor(Image.fromarray(ramp), channels=1, normalize=False)
    assert torch.equal(wide[0], torch.from_numpy((ramp >> 8).astype(np.uint8)))
    floats = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    from_pil = image_to_tensor(Image.fromarray(floats), channels=3)
    assert torch.equal(from_pil, image_to_tensor(floats, channels=3))


def test_collate_images_pads_and_records_sizes():
    images = [torch.ones(1, 4, 6, dtype=torch.uint8), torch.ones(1, 7, 2, dtype=torch.uint8)]
    batch, sizes = collate_images(images)
    assert batch.shape == (2, 1, 7, 6) and sizes.tolist() == [[4, 6], [7, 2]]
    assert int(batch[0].sum()) == 24 and int(batch[1].sum()) == 14
    # Mixed dtypes were copied into the first image's: float pixels truncated to uint8 zeros,
    # or uint8 values kept as floats in [0, 255].
    floats = image_to_tensor(torch.rand(1, 3, 5), channels=1)
    for mixed in ([images[0], floats], [floats, images[0]]):
        with pytest.raises(
            EncoderInputError,
            match=r"image: expected images of one dtype .*\['torch.float32', 'torch.uint8'\]",
        ):
            collate_images(mixed)


def test_bad_images_are_rejected():
    with pytest.raises(
        EncoderInputError,
        match=r"image: expected \(H,W\), \(C,H,W\) tensor .* received shape \(2, 3, 4, 5\)",
    ):
        image_to_tensor(np.zeros((2, 3, 4, 5), dtype=np.uint8))
    with pytest.raises(
        EncoderInputError, match="image: expected a PIL image, numpy array or tensor, received list"
    ):
        image_to_tensor([[0]])
    with pytest.raises(EncoderInputError, match=r"image: mean/std: expected 3 values each"):
        image_to_tensor(np.zeros((4, 4, 3), dtype=np.uint8), mean=(0.5, 0.5))
    with pytest.raises(EncoderInputError, match=r"std positive, .* std \(0.0,\)"):
        image_to_tensor(np.zeros((4, 4), dtype=np.uint8), channels=1, std=(0.0,))


def _tone(rate: int, seconds: float = 0.5, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return 0.5 * np.sin(2 * np.pi * freq * t)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
@pytest.mark.parametrize("rate", [16000, 22050, 44100])
def test_wav_and_flac_bytes_decode_to_16k_mono(fmt, rate):
    stereo = np.stack([_tone(rate), _tone(rate)], axis=1)
    buffer = io.BytesIO()
    soundfile.write(buffer, stereo, rate, format=fmt, subtype="PCM_16")
    waveform = load_audio(buffer.getvalue())
    assert waveform.dtype == torch.float32 and waveform.ndim == 1
    assert waveform.shape[0] == math.ceil(len(stereo) * 16000 / rate)
    expected = _tone(16000)[: waveform.shape[0]]
    # Band-limited resampling of a 440 Hz tone, away from the edges, to 16-bit precision.
    np.testing.assert_allclose(waveform[200:-200].numpy(), expected[200:-200], atol=2e-3)


def test_stdlib_wav_int16_and_arrays_agree(tmp_path):
    samples = (_tone(16000) * 32767).astype(np.int16)
    path = tmp_path / "tone.wav"
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(16000)
        handle.writeframes(samples.tobytes())
    from_file = load_audio(path)
    from_array = load_audio(samples, sample_rate=16000)
    torch.testing.assert_close(from_file, from_array)
    channels_first = load_audio(
        np.stack([samples, samples]), sample_rate=16000, channels_first=True
    )
    torch.testing.assert_close(channels_first, from_array)


def test_unsigned_pcm_arrays_are_centred_at_mid_scale():
    # 8-bit WAV PCM is unsigned (silence at 128): an array of it reads as soundfile reads the file.
    samples = (np.round(_tone(16000) * 127) + 128).astype(np.uint8)
    buffer = io.BytesIO()
    soundfile.write(buffer, (samples.astype(np.float64) - 128) / 128, 16000, "PCM_U8", format="WAV")
    from_file = load_audio(buffer.getvalue())
    torch.testing.assert_close(load_audio(samples, sample_rate=16000), from_file)
    assert float(load_audio(np.full(8, 32768, np.uint16), sample_rate=16000).abs().max()) == 0.0


def test_big_endian_arrays_read_as_their_values():
    # AIFF PCM and network buffers are big-endian; torch refuses a non-native byte order.
    pcm = (np.round(_tone(16000) * 20000)).astype(np.int16)
    for native in (pcm, pcm.astype(np.float32) / 32768, np.stack([pcm, pcm], axis=1)):
        swapped = native.astype(native.dtype.newbyteorder(">"))
        assert np.array_equal(swapped, native)
        torch.testing.assert_close(
            load_audio(swapped, sample_rate=16000), load_audio(native, sample_rate=16000)
        )
    image = np.random.default_rng(0).random((4, 5, 3))
    torch.testing.assert_close(image_to_tensor(image.astype(">f8")), image_to_tensor(image))


def test_bad_audio_is_rejected():
    with pytest.raises(EncoderInputError, match="audio: could not decode bytes"):
        load_audio(b"not audio at all")
    with pytest.raises(
        EncoderInputError,
        match="audio: sample_rate: expected the rate of the array in Hz, received None",
    ):
        load_audio(np.zeros(100, dtype=np.float32))
    with pytest.raises(EncoderInputError, match="audio: expected finite samples"):
        load_audio(np.array([0.0, np.nan]), sample_rate=16000)
    with pytest.raises(EncoderInputError, match="audio: expected float or integer PCM samples"):
        load_audio(np.zeros(8, dtype=bool), sample_rate=16000)


def test_resampling_is_band_limited_and_padding_invariant():
    tone = torch.from_numpy(_tone(44100, 1.0, 1000.0)).float()
    batch = torch.zeros(2, tone.shape[0])
    batch[0] = tone
    batch[1, :20000] = tone[:20000]
    batch[1, 20000:] = 9.0  # junk past the length
    batch[1, 20000:20005] = float("nan")  # of any kind
    out, lengths = resample(batch, 44100, 16000, torch.tensor([tone.shape[0], 20000]))
    alone, alone_len = resample(tone[:20000], 44100, 16000)
    assert (
        lengths.tolist() == [16000, math.ceil(20000 * 16000 / 44100)]
        and int(alone_len) == lengths[1]
    )
    torch.testing.assert_close(out[1, : lengths[1]], alone, atol=1e-6, rtol=0)
    assert bool((out[1, lengths[1] :] == 0).all())
    t = torch.arange(16000, dtype=torch.float64) / 16000
    reference = 0.5 * torch.sin(2 * math.pi * 1000.0 * t)
    assert float((out[0].double() - reference)[300:-300].abs().max()) < 1e-3
    # A tone above the new Nyquist (10 kHz > 8 kHz) is removed, not aliased.
    high = torch.from_numpy(_tone(44100, 1.0, 10000.0)).float()
    assert float(resample(high, 44100, 16000)[0][300:-300].abs().max()) < 0.02


def test_normalize_points_centres_and_scales_valid_points_only():
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(2, 10, 4, generator=gen) * 5 + 3
    mask = torch.arange(10)[None] >= torch.tensor([[10], [6]])
    out = normalize_points(points, mask)
    for row, n in enumerate([10, 6]):
        xyz = out[row, :n, :3]
        torch.testing.assert_close(xyz.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(xyz.norm(dim=-1).max(), torch.tensor(1.0))
        assert torch.equal(out[row, :n, 3], points[row, :n, 3])
    assert bool((out[1, 6:] == 0).all())
    alone = normalize_points(points[1, :6])
    torch.testing.assert_close(alone, out[1, :6])
    points[1, 6:] = float("nan")  # whatever padding holds never reaches the real points
    torch.testing.assert_close(normalize_points(points, mask), out)


def test_normalize_points_refuses_a_mask_that_is_not_bool_per_point():
    points = torch.randn(2, 5, 3)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    for bad in (mask.to(torch.uint8), mask[0]):  # ~uint8 is -1/-2; (N,) would broadcast
        with pytest.raises(
            EncoderInputError, match=r"points: padding_mask: expected bool .*\(2, 5\)"
        ):
            normalize_points(points, bad)
