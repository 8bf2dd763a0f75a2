"""NumberWorld's image, point cloud and seven-segment views of a number 0..99.

Glyphs are real handwriting: scikit-learn's bundled digits (1,797 8x8 scans, no download), one
random instance per digit, upscaled and composed into the number. The image places the glyphs at
a random position and scale on a larger canvas with clutter strokes and noise, so a model has to
find (zoom into) the number; the point cloud extrudes the same glyphs into 3-D and rotates them.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SEVEN_SEGMENTS", "glyph", "image", "point_cloud", "seven_segment"]

# Segments a..g of each digit, the standard seven-segment encoding.
SEVEN_SEGMENTS = np.array(
    [
        [1, 1, 1, 1, 1, 1, 0],
        [0, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 1, 0, 1],
        [1, 1, 1, 1, 0, 0, 1],
        [0, 1, 1, 0, 0, 1, 1],
        [1, 0, 1, 1, 0, 1, 1],
        [1, 0, 1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 1, 1],
    ],
    np.float32,
)


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, list[np.ndarray]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    scans = (data.images / 16.0 * 255.0).astype(np.uint8)  # (1797, 8, 8), ink is bright
    by_class = [np.flatnonzero(data.target == d) for d in range(10)]
    return scans, by_class


def _digits_of(n: int) -> list[int]:
    return [n] if n < 10 else [n // 10, n % 10]


def glyph(n: int, rng: np.random.Generator, height: int) -> np.ndarray:
    """The number drawn with random handwritten digits, uint8 (height, width), ink bright."""
    scans, by_class = _digits()
    parts = []
    for d in _digits_of(n):
        scan = scans[rng.choice(by_class[d])]
        width = max(4, round(height * rng.uniform(0.7, 0.95)))
        parts.append(np.asarray(Image.fromarray(scan).resize((width, height), Image.BILINEAR)))
        parts.append(np.zeros((height, int(rng.integers(0, 3))), np.uint8))
    return np.concatenate(parts[:-1], axis=1)


def image(ink: np.ndarray, rng: np.random.Generator, canvas: int, clutter: int) -> np.ndarray:
    """Place ``ink`` at a random spot of a noisy ``canvas``-sided square with clutter strokes."""
    background = Image.fromarray(rng.integers(0, 40, (canvas, canvas), dtype=np.uint8))
    draw = ImageDraw.Draw(background)
    for _ in range(int(rng.integers(0, clutter + 1))):
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, canvas, 4))
        draw.line((x0, y0, x1, y1), fill=int(rng.integers(40, 140)), width=int(rng.integers(1, 3)))
    pixels = np.asarray(background).copy()
    h, w = ink.shape
    top = int(rng.integers(0, canvas - h + 1))
    left = int(rng.integers(0, canvas - w + 1))
    region = pixels[top : top + h, left : left + w]
    np.maximum(region, ink, out=region)
    return pixels


def point_cloud(ink: np.ndarray, rng: np.random.Generator, points: int) -> np.ndarray:
    """Extrude the glyph to 3-D: ``points`` samples of its ink, random depth, random rotation."""
    ys, xs = np.nonzero(ink > 64)
    weights = ink[ys, xs].astype(np.float64)
    pick = rng.choice(len(xs), size=points, p=weights / weights.sum())
    xy = np.stack([xs[pick], -ys[pick]], axis=1) + rng.uniform(-0.5, 0.5, (points, 2))
    xy -= xy.mean(axis=0)
    xy /= np.abs(xy).max()
    depth = rng.uniform(-0.15, 0.15, (points, 1))
    # A uniformly random rotation: QR of a Gaussian matrix, sign-fixed to a proper rotation.
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return (np.concatenate([xy, depth], axis=1) @ q.T).astype(np.float32)


def seven_segment(n: int, rng: np.random.Generator, noise: float, flip: float) -> np.ndarray:
    """(14,) two digits x seven segments (tens blank below 10), Gaussian noise, random flips."""
    tens = SEVEN_SEGMENTS[n // 10] if n >= 10 else np.zeros(7, np.float32)
    clean = np.concatenate([tens, SEVEN_SEGMENTS[n % 10]])
    flipped = np.where(rng.random(14) < flip, 1.0 - clean, clean)
    return (flipped + rng.normal(0.0, noise, 14)).astype(np.float32)
