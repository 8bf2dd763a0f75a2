"""Generate the NumberWorld corpus: every sample a number 0..99 seen through five modalities.

See the repository's DESIGN.md ("NumberWorld"). Each sample holds the number as a cluttered image
of handwritten digits, a spoken waveform, a caption, a 3-D point cloud of the extruded glyphs and a
noisy seven-segment vector (the ``custom`` column); ``label`` is the number. Numbers in
``held_out`` never appear in the train split, only in val/test, for zero-shot evaluation.

Determinism: the numbers, splits and voices come from one generator seeded by ``seed``; each
sample's rendering from a generator seeded by ``(seed, index)``. The same seed gives
byte-identical shards (with the same library versions).
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import soundfile
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from jin_data._config import StrictConfig
from jin_data.manifest import Manifest
from jin_data.numberworld import render
from jin_data.numberworld.speech import DEFAULT_VOICES, SAMPLE_RATE, SpeechCache, Voice
from jin_data.numberworld.text import caption, number_words
from jin_data.writer import Sample, write_dataset

__all__ = ["DEFAULT_HELD_OUT", "NumberWorldConfig", "generate_numberworld", "numberworld_samples"]

# Ten of the hundred numbers, spread over tens and units so that every digit still occurs in
# training in both positions: zero-shot means "new combination", not "unseen glyph".
DEFAULT_HELD_OUT = (7, 18, 29, 33, 46, 51, 64, 72, 85, 90)


class NumberWorldConfig(StrictConfig):
    """Knobs of the corpus; defaults are sized for the CPU demo."""

    samples: int = Field(ge=1)
    seed: int = Field(default=0, ge=0)
    held_out: list[int] = Field(default_factory=lambda: list(DEFAULT_HELD_OUT))
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    canvas: int = Field(default=64, ge=32, description="image side in pixels (grayscale PNG)")
    glyph_height: tuple[int, int] = (16, 28)
    clutter: int = Field(default=3, ge=0, description="at most this many clutter strokes")
    points: int = Field(default=256, ge=1)
    segment_noise: float = Field(default=0.15, ge=0.0)
    segment_flip: float = Field(default=0.03, ge=0.0, le=1.0)
    voices: int = Field(default=len(DEFAULT_VOICES), ge=1, le=len(DEFAULT_VOICES))
    rows_per_shard: int = Field(default=1024, ge=1)
    row_group_size: int = Field(default=128, ge=1)
    cache_dir: str | None = None

    @field_validator("held_out")
    @classmethod
    def _numbers(cls, value: list[int]) -> list[int]:
        bad = [n for n in value if not 0 <= n <= 99]
        if bad or len(set(value)) != len(value):
            raise ValueError(f"held_out: expected distinct numbers in 0..99, received {value}")
        return sorted(value)

    @model_validator(mode="after")
    def _fits(self) -> NumberWorldConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction: expected < 1 (train needs rows), received "
                f"{self.val_fraction} + {self.test_fraction}"
            )
        low, high = self.glyph_height
        # Two digits of width <= 0.95 h plus a 2-pixel gap must fit on the canvas.
        if not 4 <= low <= high or 2 * round(0.95 * high) + 2 > self.canvas:
            raise ValueError(
                f"glyph_height: expected 4 <= low <= high and two digits of height {high} within "
                f"canvas={self.canvas}, received {self.glyph_height}"
            )
        return self


def _wav_bytes(wave: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def numberworld_samples(
    config: NumberWorldConfig, speech: SpeechCache | None = None
) -> Iterator[Sample]:
    """The corpus as writer samples, in order; synthesises missing speech first."""
    plan = np.random.default_rng(config.seed)
    numbers = plan.integers(0, 100, config.samples)
    voice_ids = plan.integers(0, config.voices, config.samples)
    draws = plan.random(config.samples)
    held_out = set(config.held_out)
    voices: tuple[Voice, ...] = DEFAULT_VOICES[: config.voices]
    speech = speech or SpeechCache(config.cache_dir)
    pairs = {(number_words(int(n)), voices[v]) for n, v in zip(numbers, voice_ids, strict=True)}
    speech.ensure(pairs)
    waves = {pair: speech.load(*pair) for pair in pairs}
    train_cut = 1.0 - config.val_fraction - config.test_fraction
    for index, (n, v, u) in enumerate(zip(numbers.tolist(), voice_ids, draws, strict=True)):
        if n in held_out:  # zero-shot numbers: val or test only
            split = "val" if u < 0.5 else "test"
        else:
            split = (
                "train"
                if u < train_cut
                else "val"
                if u < train_cut + config.val_fraction
                else "test"
            )
        rng = np.random.default_rng([config.seed, index])
        ink = render.glyph(
            n, rng, int(rng.integers(config.glyph_height[0], config.glyph_height[1] + 1))
        )
        wave = waves[(number_words(n), voices[v])] * rng.uniform(0.6, 1.0)
        wave = np.clip(wave + rng.normal(0.0, 0.003, wave.shape), -1.0, 1.0).astype(np.float32)
        yield {
            "id": f"nw{config.seed}-{index:07d}",
            "split": split,
            "label": n,
            "text": caption(n, rng),
            "image": render.image(ink, rng, config.canvas, config.clutter),
            "audio": _wav_bytes(wave),
            "points": render.point_cloud(ink, rng, config.points),
            "custom": render.seven_segment(n, rng, config.segment_noise, config.segment_flip),
        }


def generate_numberworld(
    url: str,
    samples: int,
    seed: int = 0,
    *,
    overwrite: bool = False,
    progress: bool = True,
    **options: object,
) -> Manifest:
    """Write a NumberWorld corpus of ``samples`` rows to ``url``; ``options`` are
    `NumberWorldConfig` fields (``held_out``, ``canvas``, ``cache_dir``, ...).

    Raises `EspeakNotFoundError` (with the install line) when speech must be synthesised and
    espeak-ng is missing.
    """
    config = NumberWorldConfig(samples=samples, seed=seed, **options)
    stream = numberworld_samples(config)
    if progress:
        stream = tqdm(stream, total=samples, desc="NumberWorld", unit="sample")
    return write_dataset(
        stream,
        url,
        rows_per_shard=config.rows_per_shard,
        row_group_size=config.row_group_size,
        point_features=0,
        custom_dim=14,
        overwrite=overwrite,
    )
