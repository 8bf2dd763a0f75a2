"""Input front-ends: images, audio files/arrays and point clouds into what the encoders take.

- ``image_to_tensor``: a PIL image, numpy array or tensor -> ``(C,H,W)`` float, normalised (or
  uint8 for the encoder to normalise); ``collate_images`` pads several sizes into one batch.
- ``load_audio``: WAV/FLAC bytes or a path (decoded by ``soundfile``, which bundles libsndfile),
  or an array at any sample rate -> mono float32 waveform at 16 kHz (resampled in torch).
- ``normalize_points``: centre each cloud at its centroid and scale it into the unit sphere.

Shape legend: B batch, C channels, H/W pixels, S samples, N points.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from jin_encoders.base import EncoderInputError
from jin_encoders.resample import resample
from jin_encoders.vision import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["collate_images", "image_to_tensor", "load_audio", "normalize_points"]

# ITU-R BT.601 luma weights, as PIL's convert("L").
_LUMA = torch.tensor([0.299, 0.587, 0.114])
# Pillow's 16-/32-bit integer grayscale modes: its convert("RGB") clips them at 255.
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def image_to_tensor(
    image: Any,
    channels: int = 3,
    normalize: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Tensor:
    """Convert one image to ``(C,H,W)``.

    Args:
        image: a PIL image, a numpy array ``(H,W)`` / ``(H,W,C)`` (channels last), or a tensor
            ``(H,W)`` / ``(C,H,W)`` (channels first); uint8 in [0, 255] or float in [0, 1]. A
            16-bit PIL image keeps its top 8 bits (32-bit integer ones clipped to 0-65535, as
            jin-data), a float one (mode "F") is read as float in [0, 1].
        channels: 1 or 3; grayscale is repeated to RGB, RGB is reduced by BT.601 luma, an alpha
            channel is dropped.
        normalize: True gives float32 ``(x - mean) / std``; False gives uint8 (what jin-data
            stores and ``VisionEncoder`` normalises itself).
        mean: per-channel mean; ImageNet's for RGB and 0.5 for grayscale by default, as the encoder.
        std: per-channel std; defaults as ``mean``.
    """
    if channels not in (1, 3):
        raise EncoderInputError(f"image: channels: expected 1 or 3, received {channels}")
    if hasattr(image, "mode") and hasattr(image, "convert"):  # a PIL image, without importing PIL
        if image.mode in _WIDE_GRAY_MODES:
            image = (np.clip(np.asarray(image).astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        elif image.mode == "F":
            image = np.array(image, dtype=np.float32)
        else:
            image = np.asarray(image.convert("RGBA" if "A" in image.mode else "RGB"))
    if isinstance(image, np.ndarray):
        array = _native_byte_order(image)
        if array.ndim == 3:
            array = np.moveaxis(array, -1, 0)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    elif isinstance(image, Tensor):
        tensor = image
    else:
        raise EncoderInputError(
            f"image: expected a PIL image, numpy array or tensor, received {type(image).__name__}"
        )
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4) or min(tensor.shape[1:]) == 0:
        raise EncoderInputError(
            "image: expected (H,W), (C,H,W) tensor or (H,W,C) array with C in {1,3,4}, "
            f"received shape {tuple(tensor.shape)}"
        )
    if tensor.dtype == torch.uint8:
        pixels = tensor.float() / 255.0
    elif tensor.is_floating_point():
        if not bool(torch.isfinite(tensor).all()):
            raise EncoderInputError("image: expected finite pixel values, received NaN/Inf")
        pixels = tensor.float().clamp(0.0, 1.0)
    else:
        raise EncoderInputError(f"image: expected uint8 or float pixels, received {tensor.dtype}")
    pixels = pixels[:3]
    if pixels.shape[0] != channels:
        pixels = (
            pixels.expand(3, -1, -1)
            if channels == 3
            else (pixels * _LUMA.to(pixels.device)[:, None, None]).sum(0, keepdim=True)
        )
    if not normalize:
        return (pixels * 255.0).round().to(torch.uint8)
    default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))
    mean, std = tuple(mean or default_mean), tuple(std or default_std)
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise EncoderInputError(
            f"image: mean/std: expected {channels} values each (one per channel), std positive, "
            f"received mean {mean}, std {std}"
        )
    mean_t = torch.tensor(mean, dtype=torch.float32, device=pixels.device)
    std_t = torch.tensor(std, dtype=torch.float32, device=pixels.device)
    return (pixels - mean_t[:, None, None]) / std_t[:, None, None]


def _native_byte_order(array: np.ndarray) -> np.ndarray:
    """``array`` in the machine's byte order (torch refuses big-endian arrays, e.g. ``>i2`` PCM
    read from AIFF or a network buffer); a copy only when the order differs."""
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def collate_images(images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Pad ``(C,H_i,W_i)`` images at the bottom/right into ``(B,C,H,W)`` with ``sizes (B,2)``."""
    if not images:
        raise EncoderInputError("image: expected at least one image, received 0")
    channels = {img.shape[0] for img in images}
    if len(channels) != 1 or any(img.ndim != 3 for img in images):
        raise EncoderInputError(
            "image: expected (C,H,W) images with one C, received shapes "
            f"{[tuple(img.shape) for img in images]}"
        )
    dtypes = sorted({str(img.dtype) for img in images})
    if len(dtypes) != 1:  # copied into the first image's dtype, float pixels would be truncated
        raise EncoderInputError(
            f"image: expected images of one dtype (all uint8 or all float), received {dtypes}"
        )
    sizes = torch.tensor([img.shape[1:] for img in images], dtype=torch.long)
    height, width = (int(v) for v in sizes.max(dim=0).values)
    batch = images[0].new_zeros(len(images), channels.pop(), height, width)
    for row, img in enumerate(images):
        batch[row, :, : img.shape[1], : img.shape[2]] = img
    return batch, sizes


def load_audio(
    source: bytes | str | os.PathLike[str] | np.ndarray | Tensor,
    sample_rate: int | None = None,
    target_rate: int = 16000,
    channels_first: bool = False,
) -> Tensor:
    """Decode or take a waveform and return it mono, float32, at ``target_rate`` Hz, shape ``(S,)``.

    Args:
        source: WAV/FLAC (any format libsndfile reads) as bytes or a path; or an array/tensor of
            samples, ``(S,)`` or 2-D with channels (integer PCM is scaled to [-1, 1]; unsigned
            PCM, as 8-bit WAV's uint8, is centred at mid-scale first).
        sample_rate: the rate of an array ``source``; required for arrays, ignored for files.
        target_rate: output rate (16 kHz, the audio encoder's).
        channels_first: for 2-D arrays, whether the layout is ``(C,S)`` (else ``(S,C)``).
    """
    if isinstance(source, (bytes, bytearray, str, os.PathLike)):
        import soundfile

        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        try:
            data, sample_rate = soundfile.read(handle, dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError) as err:
            where = "bytes" if isinstance(source, (bytes, bytearray)) else f"file {source!s}"
            raise EncoderInputError(f"audio: could not decode {where}: {err}") from err
        samples = torch.from_numpy(data).mean(dim=1)
    else:
        if sample_rate is None:
            raise EncoderInputError(
                "audio: sample_rate: expected the rate of the array in Hz, received None"
            )
        if isinstance(source, np.ndarray):
            source = _native_byte_order(source)
        samples = torch.as_tensor(source)
        if samples.dtype == torch.bool:
            raise EncoderInputError("audio: expected float or integer PCM samples, received bool")
        if not samples.is_floating_point():
            info = torch.iinfo(samples.dtype)
            scale = float(info.max) + 1.0
            if info.min == 0:  # unsigned PCM (8-bit WAV) is offset binary: silence at mid-scale
                scale /= 2.0
                samples = samples.double() - scale
            samples = samples.float() / scale
        if samples.ndim == 2:
            samples = samples.float().mean(dim=0 if channels_first else 1)
        if samples.ndim != 1:
            raise EncoderInputError(
                f"audio: expected (S,) or 2-D (S,C)/(C,S) samples, received {tuple(samples.shape)}"
            )
    samples = samples.float()
    if samples.numel() == 0:
        raise EncoderInputError("audio: expected at least one sample, received 0")
    if not bool(torch.isfinite(samples).all()):
        raise EncoderInputError("audio: expected finite samples, received NaN/Inf")
    if int(sample_rate) != target_rate:
        samples, _ = resample(samples, int(sample_rate), target_rate)
    return samples


def normalize_points(points: Tensor, padding_mask: Tensor | None = None) -> Tensor:
    """Centre xyz at each cloud's centroid and scale it so its farthest point has norm 1.

    ``points`` is ``(N,3+C)`` or ``(B,N,3+C)`` with an optional ``(B,N)`` padding mask; extra
    features are kept, padded points are zeroed, a single-point cloud is only centred.
    """
    squeeze = points.ndim == 2
    batch = points[None] if squeeze else points
    if batch.ndim != 3 or batch.shape[-1] < 3 or not batch.is_floating_point():
        raise EncoderInputError(
            f"points: expected float (N,3+C) or (B,N,3+C), received {points.dtype} "
            f"{tuple(points.shape)}"
        )
    mask = padding_mask[None] if squeeze and padding_mask is not None else padding_mask
    if mask is not None and (
        tuple(mask.shape) != tuple(batch.shape[:2]) or mask.dtype != torch.bool
    ):
        raise EncoderInputError(
            f"points: padding_mask: expected bool tensor of shape {tuple(points.shape[:-1])}, "
            f"received {padding_mask.dtype} of shape {tuple(padding_mask.shape)}"
        )
    valid = (
        torch.ones(batch.shape[:2], dtype=torch.bool, device=batch.device)
        if mask is None
        else ~mask
    )
    # Filled, not only multiplied by the mask: 0 * NaN is NaN, and padding may hold anything.
    batch = batch.masked_fill(~valid[..., None], 0.0)
    keep = valid[..., None].to(batch.dtype)
    xyz = batch[..., :3]
    centre = (xyz * keep).sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True).clamp(min=1.0)
    centred = (xyz - centre) * keep
    radius = centred.norm(dim=-1).amax(dim=1)[:, None, None]
    scaled = centred / torch.where(radius > 0, radius, torch.ones_like(radius))
    out = torch.cat([scaled, batch[..., 3:] * keep], dim=-1)
    return out[0] if squeeze else out
