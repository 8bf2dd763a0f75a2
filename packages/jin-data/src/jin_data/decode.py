"""Decode a batch of stored samples (an Arrow table) into a batch of pixels and waveforms.

The output is again an Arrow table, so the same function serves the streaming reader and Ray
Data's ``map_batches`` (whose blocks are Arrow tables), and `jin_data.collate.collate` turns either
into padded tensors. Decoded columns:

| column        | Arrow type                          | meaning |
| ------------- | ----------------------------------- | ------- |
| image_pixels  | list<uint8>                         | C*H*W bytes, channel-first, row-major |
| image_shape   | fixed_size_list<int32>[3]           | (C, H, W) |
| audio_wave    | list<float32>                       | mono waveform at ``audio_sample_rate`` |

``id``, ``split``, ``label``, ``text``, ``points`` and ``custom`` pass through untouched, as do the
provenance columns the reader adds (``__url``, ``__row_group``, ``__row``) that errors quote.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import soundfile
from PIL import Image
from scipy.signal import resample_poly

from jin_data.errors import DecodeError

__all__ = ["Decoder", "OnError"]

OnError = Literal["raise", "skip"]
PROVENANCE = ("__url", "__row_group", "__row")
IMAGE_SHAPE_TYPE = pa.list_(pa.int32(), 3)
logger = logging.getLogger("jin_data")


def decode_image(data: bytes, mode: str | None) -> np.ndarray:
    """Encoded image bytes -> uint8 (C, H, W); ``mode`` "L"/"RGB" forces the channels."""
    with Image.open(io.BytesIO(data)) as image:
        target = mode or (image.mode if image.mode in ("L", "RGB") else "RGB")
        pixels = np.asarray(image.convert(target) if image.mode != target else image)
    return pixels[None] if pixels.ndim == 2 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling of a mono float32 waveform from ``rate`` to ``target`` Hz."""
    if rate == target:
        return wave
    g = math.gcd(rate, target)
    return resample_poly(wave, target // g, rate // g).astype(np.float32)


def _pcm16_wav(data: bytes) -> tuple[np.ndarray, int] | None:
    """Mono 16-bit PCM WAV with the canonical 44-byte header, read with numpy; else ``None``.

    The common case (espeak-ng, NumberWorld, most corpora) at a third of libsndfile's per-call
    cost, which dominates for short clips; everything else goes through soundfile.
    """
    if len(data) < 44 or data[:4] != b"RIFF" or data[8:16] != b"WAVEfmt " or data[36:40] != b"data":
        return None
    fmt, channels, rate = int.from_bytes(data[20:22], "little"), data[22], data[24:28]
    if fmt != 1 or channels != 1 or data[34:36] != b"\x10\x00":
        return None
    size = min(int.from_bytes(data[40:44], "little"), len(data) - 44) // 2
    wave = np.frombuffer(data, np.int16, size, 44).astype(np.float32) * np.float32(1 / 32768)
    return wave, int.from_bytes(rate, "little")


def decode_audio(data: bytes | None, samples: np.ndarray | None, rate: int | None, target: int):
    """Encoded bytes or raw samples -> mono float32 waveform at ``target`` Hz."""
    if data is not None:
        fast = _pcm16_wav(data)
        if fast is not None:
            wave, rate = fast
        else:
            wave, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
            wave = wave.mean(axis=1) if wave.shape[1] > 1 else wave[:, 0]
    elif samples is not None:
        if rate is None or rate <= 0:
            raise ValueError(f"raw audio samples need sample_rate > 0, received {rate!r}")
        wave = samples
    else:
        raise ValueError("audio struct has neither 'bytes' nor 'samples'")
    return resample(np.asarray(wave, np.float32), int(rate), target)


def _list_array(rows: list[np.ndarray | None], value_type: pa.DataType) -> pa.Array:
    lengths = np.array([0 if r is None else r.size for r in rows], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    present = [r.reshape(-1) for r in rows if r is not None]
    values = np.concatenate(present) if present else np.zeros(0, value_type.to_pandas_dtype())
    mask = pa.array([r is None for r in rows])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, value_type), mask=mask)


class Decoder:
    """Callable that decodes images and audio of an Arrow batch; usable in ``map_batches``.

    Args:
        audio_sample_rate: every waveform is resampled to this rate (Hz).
        image_mode: "L" or "RGB" to force the channel count; ``None`` keeps grayscale as one
            channel and converts every other mode to RGB.
        on_error: "raise" a `DecodeError` naming the URL, row group, row, column and id; or
            "skip" the row, counting it (``skipped``) and logging it.
    """

    def __init__(
        self,
        *,
        audio_sample_rate: int = 16000,
        image_mode: Literal["L", "RGB"] | None = None,
        on_error: OnError = "raise",
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error: expected 'raise' or 'skip', received {on_error!r}")
        if image_mode not in (None, "L", "RGB"):
            raise ValueError(f"image_mode: expected None, 'L' or 'RGB', received {image_mode!r}")
        self.audio_sample_rate = audio_sample_rate
        self.image_mode = image_mode
        self.on_error = on_error
        self.skipped = 0

    def __call__(self, table: pa.Table) -> pa.Table:
        """Decode ``table``; skipped rows are logged (the reader reports them per epoch)."""
        decoded, errors = self.decode(table)
        for error in errors:
            logger.warning("jin_data: skipped row: %s", error)
        return decoded

    def decode(self, table: pa.Table) -> tuple[pa.Table, list[DecodeError]]:
        """Decode ``table``; returns the decoded table and the errors of the rows skipped."""
        errors: list[DecodeError] = []
        keep = np.ones(table.num_rows, bool)
        images = self._images(table, keep, errors) if "image" in table.column_names else None
        waves = self._waves(table, keep, errors) if "audio" in table.column_names else None
        out = table.drop_columns([c for c in ("image", "audio") if c in table.column_names])
        if images is not None:
            out = out.append_column("image_pixels", _list_array(images, pa.uint8()))
            shapes = [None if i is None else list(i.shape) for i in images]
            out = out.append_column("image_shape", pa.array(shapes, IMAGE_SHAPE_TYPE))
        if waves is not None:
            out = out.append_column("audio_wave", _list_array(waves, pa.float32()))
        if not keep.all():
            out = out.filter(pa.array(keep))
        self.skipped += len(errors)
        return out, errors

    def _rows(
        self,
        table: pa.Table,
        column: str,
        values: list[Any],
        decode: Callable[[Any], np.ndarray],
        keep: np.ndarray,
        errors: list[DecodeError],
    ) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = []
        for row, value in enumerate(values):
            if value is None:
                out.append(None)
                continue
            try:
                out.append(decode(value))
            except Exception as err:
                error = self._error(table, row, column, f"does not decode: {err}")
                if self.on_error == "raise":
                    raise error from err
                errors.append(error)
                keep[row] = False
                out.append(None)
        return out

    def _images(self, table: pa.Table, keep: np.ndarray, errors: list[DecodeError]):
        values = table["image"].to_pylist()
        return self._rows(
            table, "image", values, lambda b: decode_image(b, self.image_mode), keep, errors
        )

    def _waves(self, table: pa.Table, keep: np.ndarray, errors: list[DecodeError]):
        audio = table["audio"]
        valid = pc.is_valid(audio).to_numpy(zero_copy_only=False)
        data = pc.struct_field(audio, "bytes").to_pylist()
        rates = pc.struct_field(audio, "sample_rate").to_pylist()
        samples = pc.struct_field(audio, "samples").to_pylist()
        values = [
            (data[i], None if samples[i] is None else np.asarray(samples[i], np.float32), rates[i])
            if valid[i]
            else None
            for i in range(table.num_rows)
        ]
        return self._rows(
            table,
            "audio",
            values,
            lambda v: decode_audio(*v, target=self.audio_sample_rate),
            keep,
            errors,
        )

    @staticmethod
    def _error(table: pa.Table, row: int, column: str, problem: str) -> DecodeError:
        # Quote where the row came from: the reader adds all three provenance columns; Ray Data's
        # path gives only the file, and then the sample id locates the row.
        names = table.column_names
        where = {
            key: table[name][row].as_py()
            for key, name in zip(("url", "row_group", "row"), PROVENANCE, strict=True)
            if name in names
        }
        return DecodeError(problem, column=column, id=table["id"][row].as_py(), **where)
