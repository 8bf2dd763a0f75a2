"""Decode the images and audio of a batch of stored samples into pixels and waveforms.

Two consumers share the per-row decoders here. `Decoder` turns an Arrow table into an Arrow table
(Ray Data's ``map_batches``, whose blocks are Arrow tables); its decoded columns are:

| column        | Arrow type                          | meaning |
| ------------- | ----------------------------------- | ------- |
| image_pixels  | list<uint8>                         | C*H*W bytes, channel-first, row-major |
| image_shape   | fixed_size_list<int32>[3]           | (C, H, W) |
| audio_wave    | list<float32>                       | mono waveform at ``audio_sample_rate`` |

``id``, ``split``, ``label``, ``text``, ``points`` and ``custom`` pass through untouched, as do the
provenance columns the reader adds (``__url``, ``__row_group``, ``__row``) that errors quote.

The streaming reader instead calls `Decoder.decode_media` on per-row views of the stored bytes
(`media_views`) and hands the decoded rows to `jin_data.collate.build_batch`, which writes them
straight into the padded batch tensors: no intermediate Arrow table, no copy of the stored bytes.
A mono 16-bit PCM WAV at the target rate stays an ``int16`` view of the stored bytes until then,
so its only pass is the conversion into the batch's float32 buffer.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import soundfile
from PIL import Image
from scipy.signal import resample_poly

from jin_data._arrow import single_array, to_numpy, valid
from jin_data.errors import DecodeError
from jin_data.schema import declared_custom_dim

__all__ = [
    "AudioDtype",
    "AudioView",
    "Decoder",
    "Media",
    "OnError",
    "check_pcm16",
    "load_lazy_modules",
    "media_views",
    "row_error",
    "wave_into",
]

OnError = Literal["raise", "skip"]
AudioDtype = Literal["float32", "int16"]
PROVENANCE = ("__url", "__row_group", "__row")
IMAGE_SHAPE_TYPE = pa.list_(pa.int32(), 3)
PCM16_SCALE = np.float32(1 / 32768)
logger = logging.getLogger("jin_data")


class AudioView(NamedTuple):
    """One stored audio struct: encoded ``data`` or raw float32 ``samples`` at ``rate`` Hz."""

    data: np.ndarray | None
    samples: np.ndarray | None
    rate: int | None


class Media(NamedTuple):
    """The decoded images and waveforms of a batch, the rows kept, and the errors of the others.

    ``images[i]`` is uint8 (C, H, W); ``waves[i]`` is a mono waveform at the target rate, float32 or
    int16 PCM (full scale 32768, see `wave_into`); ``None`` where the row has none or was skipped.
    """

    images: list[np.ndarray | None] | None
    waves: list[np.ndarray | None] | None
    keep: np.ndarray
    errors: list[DecodeError]


def load_lazy_modules() -> None:
    """Load what decoding would otherwise load on first use, in every process that decodes.

    Pillow imports its format plugins on the first open. Called before DataLoader workers fork,
    it is paid once instead of once per worker per epoch. (pyarrow imports pandas, when installed,
    on the first ``pa.array`` or ``to_numpy``: ~0.15 s of CPU; the read path uses neither, see
    `jin_data._arrow`.)
    """
    Image.preinit()


# Pillow modes read as grayscale (one channel unless "RGB" is asked for): 8-bit, 1-bit, with alpha
# (dropped, as from RGBA), and 16-/32-bit integer ones (depth maps, scientific images).
_GRAY_MODES = ("L", "1", "LA", "La")
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def decode_image(data: Any, mode: str | None) -> np.ndarray:
    """Encoded image bytes -> uint8 (C, H, W); ``mode`` "L"/"RGB" forces the channels.

    Without ``mode``, grayscale images (8-bit, 1-bit, with alpha, 16-bit) keep one channel and
    every other mode becomes RGB, alpha dropped. 16-bit grayscale keeps its top 8 bits (Pillow's
    own conversion would clip every value above 255 to 255); 32-bit integer images are read as
    16-bit ones, values outside 0-65535 clipped. Floating-point images raise a ValueError.
    """
    with Image.open(io.BytesIO(data)) as image:
        if image.mode == "F":
            raise ValueError("image mode 'F' (32-bit float) is not supported; store 8 or 16 bits")
        if image.mode in _WIDE_GRAY_MODES:
            wide = np.asarray(image).astype(np.int64)
            gray = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
            pixels = np.stack([gray] * 3, axis=-1) if mode == "RGB" else gray
        else:
            target = mode or ("L" if image.mode in _GRAY_MODES else "RGB")
            pixels = np.asarray(image.convert(target) if image.mode != target else image)
    return pixels[None] if pixels.ndim == 2 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling of a mono float32 waveform from ``rate`` to ``target`` Hz."""
    if rate == target:
        return wave
    g = math.gcd(rate, target)
    return resample_poly(wave, target // g, rate // g).astype(np.float32)


def _pcm16_wav(data: np.ndarray) -> tuple[np.ndarray, int] | None:
    """Mono 16-bit PCM WAV with the canonical 44-byte header: an int16 view and the rate.

    The common case (espeak-ng, NumberWorld, most corpora) read by numpy without a copy, a fraction
    of libsndfile's per-call cost, which dominates for short clips; ``None`` for anything else.
    """
    header = bytes(data[:44])
    if len(header) < 44 or header[:4] != b"RIFF" or header[8:16] != b"WAVEfmt ":
        return None
    if header[36:40] != b"data" or header[20:22] != b"\x01\x00" or header[22:24] != b"\x01\x00":
        return None
    if header[34:36] != b"\x10\x00":
        return None
    size = min(int.from_bytes(header[40:44], "little"), len(data) - 44) // 2
    return np.frombuffer(data, np.int16, size, 44), int.from_bytes(header[24:28], "little")


def check_pcm16(wave: np.ndarray) -> None:
    """Raise a ValueError naming the first NaN or infinite sample of a float ``wave``: those have
    no 16-bit PCM value (a cast would give an arbitrary one); finite ones are clipped to full
    scale (`wave_into`)."""
    if wave.dtype != np.int16 and not np.isfinite(wave).all():
        first = int(np.flatnonzero(~np.isfinite(wave))[0])
        raise ValueError(
            f"sample {first} of {len(wave)} is {wave[first]}: non-finite audio has no 16-bit PCM "
            "value (audio_dtype='int16'; 'float32' keeps it)"
        )


def decode_audio(audio: AudioView, target: int, dtype: AudioDtype = "float32") -> np.ndarray:
    """A stored audio struct -> mono waveform at ``target`` Hz (float32, or int16 PCM).

    ``dtype="int16"``: the waveform is bound for 16-bit PCM, so a NaN or infinite sample raises
    (`check_pcm16`).
    """
    if audio.data is not None:
        fast = _pcm16_wav(audio.data)
        if fast is not None and fast[1] == target:
            return fast[0]
        if fast is not None:
            wave, rate = fast[0] * PCM16_SCALE, fast[1]
        else:
            wave, rate = soundfile.read(io.BytesIO(audio.data), dtype="float32", always_2d=True)
            wave = wave.mean(axis=1) if wave.shape[1] > 1 else wave[:, 0]
    elif audio.samples is not None:
        if audio.rate is None or audio.rate <= 0:
            raise ValueError(f"raw audio samples need sample_rate > 0, received {audio.rate!r}")
        wave, rate = audio.samples, audio.rate
    else:
        raise ValueError("audio struct has neither 'bytes' nor 'samples'")
    wave = resample(np.asarray(wave, np.float32), int(rate), target)
    if dtype == "int16":
        check_pcm16(wave)
    return wave


def wave_into(out: np.ndarray, wave: np.ndarray) -> None:
    """Copy ``wave`` into ``out`` (same length) in one pass, converting between float32 and
    16-bit PCM (full scale 32768) when their dtypes differ; float samples are rounded and clipped.
    """
    if out.dtype == wave.dtype:
        out[...] = wave
    elif wave.dtype == np.int16:
        np.multiply(wave, PCM16_SCALE, out=out)
    else:
        np.clip(np.rint(wave * np.float32(32768)), -32768, 32767, out=out, casting="unsafe")


def _binary_views(array: pa.Array) -> list[np.ndarray | None]:
    """Zero-copy uint8 views of each value of a binary array (``None`` where null)."""
    n = len(array)
    _, offset_buffer, data = array.buffers()[:3]
    offsets = np.frombuffer(offset_buffer, np.int32)[array.offset : array.offset + n + 1].tolist()
    values = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    present = valid(array).tolist() if array.null_count else None
    return [
        values[offsets[i] : offsets[i + 1]] if present is None or present[i] else None
        for i in range(n)
    ]


def _audio_views(array: pa.Array) -> list[AudioView | None]:
    data = _binary_views(pc.struct_field(array, "bytes"))
    samples = pc.struct_field(array, "samples")
    offsets = to_numpy(samples.offsets).tolist()
    flat = to_numpy(samples.values, fill=float("nan"))
    has_samples = valid(samples).tolist()
    rates = pc.struct_field(array, "sample_rate").to_pylist()
    present = valid(array).tolist()
    return [
        AudioView(data[i], flat[offsets[i] : offsets[i + 1]] if has_samples[i] else None, rates[i])
        if present[i]
        else None
        for i in range(len(array))
    ]


def media_views(table: pa.Table) -> tuple[list[np.ndarray | None] | None, list[Any] | None]:
    """Per-row zero-copy views of the stored ``image`` bytes and ``audio`` structs of ``table``.

    ``None`` for a column the table does not have. The views keep ``table``'s buffers alive.
    """
    names = table.column_names
    images = _binary_views(single_array(table["image"])) if "image" in names else None
    audio = _audio_views(single_array(table["audio"])) if "audio" in names else None
    return images, audio


def _list_array(rows: list[np.ndarray | None], value_type: pa.DataType) -> pa.Array:
    lengths = np.array([0 if r is None else r.size for r in rows], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.zeros(int(lengths.sum()), value_type.to_pandas_dtype())
    for row, start, length in zip(rows, offsets[:-1].tolist(), lengths.tolist(), strict=True):
        if row is not None:
            wave_into(values[start : start + length], row.reshape(-1))
    mask = pa.array([r is None for r in rows], pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, value_type), mask=mask)


class Decoder:
    """Callable that decodes images and audio of an Arrow batch; usable in ``map_batches``.

    Args:
        audio_sample_rate: every waveform is resampled to this rate (Hz).
        image_mode: "L" or "RGB" to force the channel count; ``None`` keeps grayscale as one
            channel and converts every other mode to RGB (see `decode_image`).
        on_error: "raise" a `DecodeError` naming the URL, row group, row, column and id; or
            "skip" the row, counting it (``skipped``, rows) and logging it.
        audio_dtype: "int16" when the waveforms are bound for 16-bit PCM (`wave_into`): a NaN or
            infinite sample, which has no PCM value, is then an error of its row, not a silent
            arbitrary integer in the batch.

    Custom vectors are checked too: each present one must hold F values, F as the table's schema
    metadata declares it (a table read from a jin-data shard carries the file's); a table without
    that metadata is not checked.
    """

    def __init__(
        self,
        *,
        audio_sample_rate: int = 16000,
        image_mode: Literal["L", "RGB"] | None = None,
        on_error: OnError = "raise",
        audio_dtype: AudioDtype = "float32",
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error: expected 'raise' or 'skip', received {on_error!r}")
        if audio_dtype not in ("float32", "int16"):
            raise ValueError(
                f"audio_dtype: expected 'float32' or 'int16', received {audio_dtype!r}"
            )
        if image_mode not in (None, "L", "RGB"):
            raise ValueError(f"image_mode: expected None, 'L' or 'RGB', received {image_mode!r}")
        self.audio_sample_rate = audio_sample_rate
        self.image_mode = image_mode
        self.on_error = on_error
        self.audio_dtype = audio_dtype
        self.skipped = 0

    def __call__(self, table: pa.Table) -> pa.Table:
        """Decode ``table``; skipped rows are logged (the reader reports them per epoch)."""
        decoded, errors = self.decode(table)
        for error in errors:
            logger.warning("jin_data: skipped row: %s", error)
        return decoded

    def decode(self, table: pa.Table) -> tuple[pa.Table, list[DecodeError]]:
        """Decode ``table``; returns the decoded table and the errors of the rows skipped."""
        media = self.decode_media(table, *media_views(table))
        out = table.drop_columns([c for c in ("image", "audio") if c in table.column_names])
        if media.images is not None:
            out = out.append_column("image_pixels", _list_array(media.images, pa.uint8()))
            shapes = [None if i is None else list(i.shape) for i in media.images]
            out = out.append_column("image_shape", pa.array(shapes, IMAGE_SHAPE_TYPE))
        if media.waves is not None:
            out = out.append_column("audio_wave", _list_array(media.waves, pa.float32()))
        if not media.keep.all():
            out = out.filter(pa.array(media.keep))
        return out, media.errors

    def decode_media(
        self,
        table: pa.Table,
        images: list[np.ndarray | None] | None,
        audio: list[AudioView | None] | None,
    ) -> Media:
        """Decode the per-row stored ``images`` and ``audio`` of the rows of ``table``.

        ``table`` (its ``id`` and provenance columns) only locates a row in an error; its
        ``custom`` column, where present, is checked against F. A row that does not decode raises,
        or with ``on_error="skip"`` is dropped from ``keep`` and its errors (one per bad column)
        returned; ``skipped`` counts the rows.
        """
        errors: list[DecodeError] = []
        keep = np.ones(table.num_rows, bool)
        pixels = waves = None
        if "custom" in table.column_names:
            self._check_custom(table, keep, errors)
        if images is not None:
            image = lambda data: decode_image(data, self.image_mode)  # noqa: E731
            pixels = self._rows(table, "image", images, image, keep, errors)
        if audio is not None:
            wave = lambda view: decode_audio(  # noqa: E731
                view, self.audio_sample_rate, self.audio_dtype
            )
            waves = self._rows(table, "audio", audio, wave, keep, errors)
        self.skipped += int((~keep).sum())
        return Media(pixels, waves, keep, errors)

    def _check_custom(self, table: pa.Table, keep: np.ndarray, errors: list[DecodeError]) -> None:
        width = declared_custom_dim(table.schema)
        if width is None:
            return
        column = single_array(table["custom"])
        offsets = to_numpy(column.offsets)
        lengths = np.diff(offsets)
        for row in np.flatnonzero(valid(column) & (lengths != width)).tolist():
            error = self._error(
                table, row, "custom", f"holds {lengths[row]} values, the data set's F is {width}"
            )
            if self.on_error == "raise":
                raise error
            errors.append(error)
            keep[row] = False

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

    @staticmethod
    def _error(table: pa.Table, row: int, column: str, problem: str) -> DecodeError:
        return row_error(table, row, column, problem)


def row_error(table: pa.Table, row: int, column: str, problem: str) -> DecodeError:
    """A `DecodeError` for row ``row`` of ``table``, naming its place and id."""
    # Quote where the row came from: the reader adds all three provenance columns; Ray Data's
    # path gives only the file, and then the sample id locates the row.
    names = table.column_names
    where = {
        key: table[name][row].as_py()
        for key, name in zip(("url", "row_group", "row"), PROVENANCE, strict=True)
        if name in names
    }
    return DecodeError(problem, column=column, id=table["id"][row].as_py(), **where)
