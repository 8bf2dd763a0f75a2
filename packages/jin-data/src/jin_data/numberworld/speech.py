"""Spoken numbers from espeak-ng, synthesised once per (text, voice variant) and cached as WAV.

espeak-ng writes 22.05 kHz 16-bit mono; the cache holds the waveform resampled to 16 kHz (the
audio rate of docs/CONVENTIONS.md), so a warm cache costs one small file read per variant.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

from jin_data.decode import resample

__all__ = ["DEFAULT_VOICES", "EspeakNotFoundError", "SpeechCache", "Voice"]

SAMPLE_RATE = 16000
INSTALL_HINT = (
    "install it with `sudo apt-get install espeak-ng` (Debian/Ubuntu), `sudo dnf install "
    "espeak-ng` (Fedora) or `brew install espeak-ng` (macOS)"
)


class EspeakNotFoundError(RuntimeError):
    """espeak-ng is not installed (or not on PATH)."""


@dataclass(frozen=True)
class Voice:
    """One espeak-ng voice variant: voice name (``language+variant``), words/min, pitch 0-99."""

    name: str
    speed: int
    pitch: int


# A modest set: enough variety in timbre, rate and pitch that the audio encoder cannot key on one
# voice, few enough that a cold cache is 100 numbers x 6 voices = 600 short syntheses.
DEFAULT_VOICES = (
    Voice("en-us", 160, 50),
    Voice("en-us+f3", 175, 70),
    Voice("en-gb+m3", 140, 35),
    Voice("en-gb-x-rp+f4", 190, 60),
    Voice("en-us+m7", 130, 45),
    Voice("en-gb-scotland+f2", 165, 55),
)


def default_cache_dir() -> Path:
    """``$JIN_DATA_CACHE`` or ``~/.cache/jin_data``."""
    return Path(os.environ.get("JIN_DATA_CACHE", Path.home() / ".cache" / "jin_data"))


class SpeechCache:
    """Synthesise-once waveforms keyed by (text, voice) under ``cache_dir / "speech"``."""

    def __init__(self, cache_dir: Path | str | None = None, executable: str = "espeak-ng") -> None:
        self.directory = Path(cache_dir or default_cache_dir()) / "speech"
        self.executable = executable

    def path(self, text: str, voice: Voice) -> Path:
        """Where the waveform for ``(text, voice)`` lives."""
        key = hashlib.sha1(f"{text}|{voice.name}|{voice.speed}|{voice.pitch}".encode()).hexdigest()
        return self.directory / f"{key[:16]}.wav"

    def _synthesise(self, text: str, voice: Voice) -> None:
        command = [self.executable, "-v", voice.name, "-s", str(voice.speed)]
        command += ["-p", str(voice.pitch), "--stdout", text]
        result = subprocess.run(command, capture_output=True, check=False)
        if result.returncode != 0 or not result.stdout:
            raise RuntimeError(
                f"espeak-ng failed for text={text!r} voice={voice}: {result.stderr.decode()}"
            )
        wave, rate = soundfile.read(io.BytesIO(result.stdout), dtype="float32")
        wave = resample(wave, rate, SAMPLE_RATE)
        target = self.path(text, voice)
        temporary = target.with_suffix(f".{os.getpid()}.tmp")
        soundfile.write(temporary, wave, SAMPLE_RATE, format="WAV", subtype="PCM_16")
        temporary.replace(target)

    def ensure(self, items: set[tuple[str, Voice]], threads: int = 4) -> int:
        """Synthesise the missing ``(text, voice)`` pairs; returns how many were missing."""
        missing = sorted(
            (item for item in items if not self.path(*item).exists()),
            key=lambda item: (item[0], item[1].name),
        )
        if not missing:
            return 0
        if shutil.which(self.executable) is None:
            raise EspeakNotFoundError(f"{self.executable} not found on PATH; {INSTALL_HINT}")
        self.directory.mkdir(parents=True, exist_ok=True)
        # espeak-ng runs in its own process, so threads give real parallelism here.
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda item: self._synthesise(*item), missing))
        return len(missing)

    def load(self, text: str, voice: Voice) -> np.ndarray:
        """The cached 16 kHz float32 waveform (call `ensure` first)."""
        wave, _ = soundfile.read(self.path(text, voice), dtype="float32")
        return wave
