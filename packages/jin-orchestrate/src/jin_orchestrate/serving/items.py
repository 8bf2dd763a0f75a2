"""Request items -> a decoded Arrow table, checked against the model, every error located.

# N items, W point width (3 + C), F vector size

The items become one small table of jin-data's sample schema (``jin_data.sample_schema``; runtime
modalities as extra ``list<float32>`` columns named after them), decoded by jin-data's `Decoder`:
the same bytes-to-pixels and bytes-to-waveform path as training shards, so serving and training
see identical inputs. Everything a client can get wrong is caught here, before the request joins
a batch: unknown modality names, data of the wrong JSON shape, invalid base64, files that do not
decode, wrong array widths, NaN/Inf (or values beyond float32), and items over the size limits
(images and audio by their headers, before they are decoded).
Each becomes an :class:`InputError` listing every bad item by its location
(``["body", "items", 3, "data"]``), answered as a 422 (or 413 for size limits).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import soundfile
from PIL import Image, UnidentifiedImageError

from jin_data import Decoder, sample_schema
from jin_orchestrate.inference import ModalitySpec, ModelCard
from jin_orchestrate.serving.api import ErrorDetail, Item, Limits

__all__ = ["InputError", "items_table"]

# Samples (frames x channels) one second of a clip may hold before it is mixed down: 8 channels
# at 48 kHz, or stereo at 192 kHz. The decoder reads every channel as float32, so a duration limit
# alone lets a small Ogg Vorbis file of silence (up to 255 channels) expand to gigabytes.
_AUDIO_SAMPLES_PER_SECOND = 8 * 48_000
# libsndfile's frame count (SF_COUNT_MAX) for a stream whose header does not state its length.
_UNKNOWN_FRAMES = 2**63 - 1
# The largest term of the resampling ratio (model rate / clip rate, in lowest terms) a clip may
# need. jin-data resamples with scipy's resample_poly, whose filter has 20 x that term taps: a 4 KB
# WAV whose header states 5,000,011 Hz took 98 s and 4.5 GiB to decode. Common rates need at most
# a few thousand (44,056 Hz against 22,050 Hz: 22,028); 2**15 costs tens of milliseconds.
_MAX_RESAMPLE_TERM = 2**15


class InputError(ValueError):
    """A client's mistake: the HTTP status and every offending location."""

    def __init__(self, status: int, details: list[ErrorDetail]) -> None:
        self.status = status
        self.details = details
        super().__init__("; ".join(f"{_where(d.loc)}: {d.msg}" for d in details))

    def body(self) -> dict[str, Any]:
        """The JSON body of the answer (`jin_orchestrate.serving.api.ErrorResponse`)."""
        return {"detail": [d.model_dump() for d in self.details]}


def _where(loc: Sequence[str | int]) -> str:
    parts = [p for p in loc if p != "body"]
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")


class _Problems:
    """Collects located errors; ``size`` ones answer 413, all others 422."""

    def __init__(self, field: str) -> None:
        self.field = field
        self.details: list[ErrorDetail] = []
        self.too_large = False

    def add(self, index: int, key: str, msg: str, *, size: bool = False) -> None:
        kind = "too_large" if size else "value_error"
        self.details.append(ErrorDetail(loc=["body", self.field, index, key], msg=msg, type=kind))
        self.too_large |= size

    def raise_any(self) -> None:
        if self.details:
            raise InputError(413 if self.too_large else 422, self.details)


def _finite(array: np.ndarray, name: str) -> str | None:
    bad = np.argwhere(~np.isfinite(array))
    if not len(bad):
        return None
    return (
        f"{name}: values must be finite float32 numbers; NaN, Inf or beyond ±3.4e38 at index "
        f"{bad[0].tolist()}"
    )


def _numbers(data: Any, spec: ModalitySpec) -> tuple[np.ndarray | None, str | None]:
    """Points ``(N, W)`` or a vector ``(F,)`` as float32, or why ``data`` does not fit ``spec``."""
    if spec.kind == "points":
        width = spec.shape[1]
        if not isinstance(data, list) or not data or not isinstance(data[0], list):
            return None, f"points: expected a non-empty list of [x, y, z, ...] rows of {width}"
        if any(len(row) != width for row in data):
            lengths = sorted({len(row) for row in data})
            return None, f"points: expected rows of {width} numbers, received lengths {lengths}"
    else:
        size = spec.shape[0]
        if not isinstance(data, list) or (data and isinstance(data[0], list)):
            return None, f"{spec.name}: expected a flat list of {size} numbers"
        if len(data) != size:
            return None, f"{spec.name}: expected {size} numbers, received {len(data)}"
    with np.errstate(over="ignore"):
        array = np.asarray(data, np.float64).astype(np.float32)
    return array, _finite(array, spec.name)


def _encoded(data: Any, spec: ModalitySpec) -> tuple[bytes | None, str | None]:
    if not isinstance(data, str):
        return None, f"{spec.name}: expected a base64 string of an encoded {spec.kind} file"
    try:
        return base64.b64decode(data, validate=True), None
    except (binascii.Error, ValueError) as exc:
        return None, f"{spec.name}: not valid base64 ({exc})"


def _list_column(rows: list[np.ndarray | None], value_type: pa.DataType) -> pa.Array:
    """Rows (None where absent) as a list column; 2-D rows become fixed-size-list items."""
    lengths = np.array([0 if r is None else len(r) for r in rows], np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    present = [r for r in rows if r is not None]
    flat = np.concatenate([r.reshape(-1) for r in present]) if present else np.zeros(0, np.float32)
    values: pa.Array = pa.array(flat, pa.float32())
    if pa.types.is_fixed_size_list(value_type):
        values = pa.FixedSizeListArray.from_arrays(values, value_type.list_size)
    return pa.ListArray.from_arrays(offsets, values, mask=pa.array([r is None for r in rows]))


def items_table(
    items: Sequence[Item], card: ModelCard, limits: Limits, decoder: Decoder, field: str = "items"
) -> pa.Table:
    """The decoded table of ``items`` (row i is item i), or an :class:`InputError`."""
    problems = _Problems(field)
    n = len(items)
    specs = {m.name: m for m in card.modalities}
    text: list[str | None] = [None] * n
    images: list[bytes | None] = [None] * n
    audio: list[dict[str, Any] | None] = [None] * n
    arrays: dict[str, list[np.ndarray | None]] = {
        m.name: [None] * n for m in card.modalities if m.kind in ("points", "vector")
    }
    for i, item in enumerate(items):
        spec = specs.get(item.modality)
        if spec is None:
            problems.add(
                i, "modality", f"unknown modality {item.modality!r}; this model has {sorted(specs)}"
            )
            continue
        if spec.kind == "text":
            problem = _text_problem(item.data)
            if problem is not None:
                problems.add(i, "data", problem)
            else:
                text[i] = item.data
        elif spec.kind in ("image", "audio"):
            encoded, problem = _encoded(item.data, spec)
            size = False
            if problem is None:
                problem, size = (
                    _image_problem(encoded, limits)
                    if spec.kind == "image"
                    else _audio_problem(encoded, limits, spec.sample_rate or 16000)
                )
            if problem is not None:
                problems.add(i, "data", problem, size=size)
            elif spec.kind == "image":
                images[i] = encoded
            else:
                audio[i] = {"bytes": encoded, "samples": None, "sample_rate": None}
        else:
            array, problem = _numbers(item.data, spec)
            if problem is not None:
                problems.add(i, "data", problem)
            else:
                arrays[spec.name][i] = array
    # Bad items stay empty rows, so one answer names every problem, decoding ones included.

    points = specs.get("points")
    custom = specs.get("custom")
    schema = sample_schema(
        point_features=points.shape[1] - 3 if points else 0,
        custom_dim=custom.shape[0] if custom else 0,
    )
    columns: dict[str, pa.Array] = {
        "id": pa.array([str(i) for i in range(n)]),
        "split": pa.array(["serve"] * n),
        "label": pa.nulls(n, pa.int64()),
        "text": pa.array(text, pa.string()),
        "image": pa.array(images, pa.binary()),
        "audio": pa.array(audio, schema.field("audio").type),
    }
    for name, rows in arrays.items():
        value_type = schema.field("points").type.value_type if name == "points" else pa.float32()
        columns[name] = _list_column(rows, value_type)
    for name in ("points", "custom"):
        if name not in columns:
            columns[name] = pa.nulls(n, schema.field(name).type)
    table = pa.table(columns, metadata=schema.metadata)
    decoded, errors = decoder.decode(table)
    for error in errors:
        problems.add(int(error.id), "data", f"{error.column}: {error.problem}")
    if "audio" in specs:
        _check_audio(decoded, specs["audio"], limits, problems)
    problems.raise_any()
    return decoded


def _text_problem(data: Any) -> str | None:
    """Why ``data`` is not a text item: not a string, or not encodable as UTF-8.

    JSON may escape a lone UTF-16 surrogate (``"\\ud800"``), which Python decodes into a ``str``
    that has no UTF-8 form; Arrow's string column cannot hold it.
    """
    if not isinstance(data, str):
        return "text: expected a string"
    try:
        data.encode("utf-8")
    except UnicodeEncodeError as exc:
        # The character is quoted escaped: the answer itself must be valid UTF-8 JSON.
        return (
            f"text: not valid Unicode: a lone surrogate {data[exc.start]!r} at character "
            f"{exc.start} (JSON \\uD800-\\uDFFF escapes must come in high-low pairs)"
        )
    return None


def _image_problem(data: bytes | None, limits: Limits) -> tuple[str | None, bool]:
    """Why an encoded image cannot be served (and whether it is for its size); reads the header.

    Checking the size before jin-data decodes it keeps a small file that expands to a huge
    bitmap (a decompression bomb) from ever being decoded.
    """
    try:
        with Image.open(io.BytesIO(data or b"")) as image:
            width, height = image.size
    except UnidentifiedImageError:
        return "image: not an image file Pillow can open (PNG, JPEG, WebP, ...)", False
    except Image.DecompressionBombError as exc:  # Pillow's own size check, as it reads the header
        return (
            f"image: over the limit of {limits.max_image_pixels} pixels (max_image_pixels): {exc}",
            True,
        )
    except Exception as exc:  # Pillow raises several types for a damaged header
        return f"image: does not decode: {exc}", False
    if width * height > limits.max_image_pixels:
        return (
            f"image: {width}x{height} pixels is over the limit of {limits.max_image_pixels} "
            "(max_image_pixels)",
            True,
        )
    return None, False


def _audio_problem(data: bytes | None, limits: Limits, rate: int) -> tuple[str | None, bool]:
    """Why an encoded clip cannot be served at ``rate`` Hz (and whether it is for its size); reads
    the header.

    jin-data's decoder allocates as many frames as the header states, every channel as float32,
    and then resamples: checking the header first keeps a small file that expands to hours of
    audio (FLAC and Vorbis compress silence thousands of times; a decompression bomb), or whose
    sample rate needs a huge resampling filter, from ever being decoded. libsndfile reads the same
    header as the decoder's fast path for 16-bit WAV.
    """
    try:
        info = soundfile.info(io.BytesIO(data or b""))
    except soundfile.LibsndfileError as exc:
        return f"audio: does not decode: {exc.error_string}", False
    except Exception as exc:  # a damaged header can fail in soundfile's own code
        return f"audio: does not decode: {exc}", False
    if info.frames == _UNKNOWN_FRAMES:
        return "audio: does not decode: the header does not give the clip's length", False
    if info.duration > limits.max_audio_seconds:
        return (
            f"audio: {info.duration:.1f} s is over the limit of {limits.max_audio_seconds:g} s "
            "(max_audio_seconds)",
            True,
        )
    budget = limits.max_audio_seconds * _AUDIO_SAMPLES_PER_SECOND
    if info.frames * info.channels > budget:
        return (
            f"audio: {info.channels} channels of {info.frames} frames ({info.samplerate} Hz) is "
            f"over the limit of {budget:.0f} samples ({limits.max_audio_seconds:g} s of 8 "
            "channels at 48 kHz; max_audio_seconds)",
            True,
        )
    common = math.gcd(rate, info.samplerate)
    if max(rate, info.samplerate) // common > _MAX_RESAMPLE_TERM:
        return (
            f"audio: a sample rate of {info.samplerate} Hz does not resample to the model's "
            f"{rate} Hz (ratio {rate // common}/{info.samplerate // common}, over "
            f"{_MAX_RESAMPLE_TERM}); use a common rate such as 16000, 44100 or 48000 Hz",
            False,
        )
    return None, False


def _check_audio(table: pa.Table, spec: ModalitySpec, limits: Limits, problems: _Problems) -> None:
    """Decoded clips too short to encode (422) or over ``max_audio_seconds`` (413).

    The length limit backs up `_audio_problem`'s header check. Rows are named by their ``id``
    (the item's index): rows that did not decode are gone.
    """
    rate = spec.sample_rate or 16000
    lengths = pc.list_value_length(table["audio_wave"]).to_numpy(zero_copy_only=False)
    index = [int(i) for i in table["id"].to_pylist()]
    for row in np.flatnonzero(pc.is_valid(table["audio_wave"]).to_numpy(zero_copy_only=False)):
        i, samples = index[row], int(lengths[row])
        if samples < spec.min_length:
            problems.add(
                i,
                "data",
                f"audio: {samples} samples at {rate} Hz after decoding; at least "
                f"{spec.min_length} ({1000 * spec.min_length / rate:g} ms) are needed",
            )
        elif samples > limits.max_audio_seconds * rate:
            problems.add(
                i,
                "data",
                f"audio: {samples / rate:.1f} s is over the limit of "
                f"{limits.max_audio_seconds:g} s (max_audio_seconds)",
                size=True,
            )
