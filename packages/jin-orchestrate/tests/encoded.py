"""Encoded media for tests: seeded PNG and WAV bytes, and base64 for request bodies."""

import base64
import io

import numpy as np
import soundfile
from PIL import Image


def png(height: int, width: int, seed: int) -> bytes:
    """A random grayscale PNG."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def wav(samples: int, seed: int, rate: int = 16000) -> bytes:
    """Random noise as a mono 16-bit WAV."""
    wave = np.random.default_rng(seed).normal(0, 0.1, samples).astype(np.float32)
    out = io.BytesIO()
    soundfile.write(out, wave, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def b64(data: bytes) -> str:
    """Base64 text of ``data``, as an item's ``data`` field."""
    return base64.b64encode(data).decode()
