"""Small synthetic data sets with every modality, some of each absent, built in milliseconds."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile

from jin_data import write_dataset


def make_samples(n: int, seed: int = 0) -> list[dict]:
    """``n`` samples; every modality missing in some rows, ragged sizes, two image sizes."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        wave = (0.1 * rng.standard_normal(40 + 7 * i)).astype(np.float32)
        if i % 2:
            # Float WAV (libsndfile), 16-bit PCM at the target rate (numpy fast path), and 16-bit
            # PCM at 22.05 kHz (fast path, then resampled).
            rate_, subtype = ((16000, "FLOAT"), (16000, "PCM_16"), (22050, "PCM_16"))[i // 2 % 3]
            buffer = io.BytesIO()
            soundfile.write(buffer, wave, rate_, format="WAV", subtype=subtype)
            audio, rate = buffer.getvalue(), None
        else:
            audio, rate = wave, 16000
        samples.append(
            {
                "id": f"s{i:04d}",
                "split": ("train", "train", "val", "test")[i % 4],
                "label": i % 10 if i % 9 else None,
                "text": f"sample {i} ünïcode" if i % 5 else None,
                "image": rng.integers(0, 256, (6 + i % 3, 5 + i % 2), dtype=np.uint8)
                if i % 7
                else None,
                "audio": audio if i % 6 else None,
                "audio_sample_rate": rate,
                "points": rng.standard_normal((3 + i % 5, 4)).astype(np.float32) if i % 4 else None,
                "custom": rng.standard_normal(5).astype(np.float32) if i % 3 else None,
            }
        )
    return samples


@pytest.fixture
def samples() -> list[dict]:
    return make_samples(60)


@pytest.fixture
def dataset(tmp_path, samples) -> str:
    url = str(tmp_path / "ds")
    write_dataset(samples, url, rows_per_shard=16, row_group_size=5)
    return url
