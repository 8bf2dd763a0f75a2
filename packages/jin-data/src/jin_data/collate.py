"""Collate a decoded batch into padded tensors (docs/CONVENTIONS.md, "Batches from jin-data").

# B batch, T text bytes, C channels, H/W image height/width, S audio samples, N points, F features

Numeric columns are read straight from the Arrow buffers: ``custom`` when every row has it and
images that all share one shape (in a decoded Arrow table) become tensors over the Arrow memory
without a copy; text bytes and points are padded by one vectorised gather from the flat value
buffer; decoded images and waveforms are written row by row into their padded tensor (one copy,
the int16-to-float32 conversion of PCM audio fused into it).

Output, for each selected modality:
- text: ``text`` list[str] ("" where absent), ``text_bytes`` (B,T) uint8, ``text_padding_mask``;
- image: ``image`` (B,C,H,W) uint8 padded to the largest H, W, ``image_sizes`` (B,2) int64 (H, W);
- audio: ``audio`` (B,S) float32 (or int16 PCM on request), ``audio_lengths`` (B,) int64;
- points: ``points`` (B,N,3+C) float32, ``points_padding_mask`` (B,N);
- custom: ``custom`` (B,F) float32, F the data set's (zeros where absent, also when no row of
  the batch has one);
- ``<modality>_present`` (B,) bool; and ``id`` list[str], ``label`` (B,) int64 (-1 absent),
  ``split`` list[str]. Padding masks are True at padding.

With ``shared=True`` (in a DataLoader worker) every tensor of a batch is a view into one
shared-memory buffer, filled in place: the batch crosses to the main process as one file
descriptor instead of one per tensor, and nothing is copied again on the way.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from jin_data._arrow import single_array, to_numpy, valid
from jin_data.decode import AudioDtype, check_pcm16, row_error, wave_into
from jin_data.schema import MODALITIES, declared_custom_dim

__all__ = ["build_batch", "collate", "custom_width", "decoded_modalities"]

# Which decoded column carries each modality.
_COLUMN = {
    "text": "text",
    "image": "image_pixels",
    "audio": "audio_wave",
    "points": "points",
    "custom": "custom",
}
# Tensors in a shared batch buffer start on cache-line boundaries (aligned for any dtype).
_ALIGN = 64


def custom_width(table: pa.Table, custom_dim: int | None = None) -> int | None:
    """F, the width of every custom vector: ``custom_dim`` when given, else what the table's
    schema metadata declares (a table read from a jin-data shard carries the file's), else
    ``None`` (the batch's longest vector sets the width)."""
    return custom_dim if custom_dim is not None else declared_custom_dim(table.schema)


def decoded_modalities(table: pa.Table) -> list[str]:
    """The modalities whose (decoded) column is in ``table``, in canonical order."""
    return [m for m in MODALITIES if _COLUMN[m] in table.column_names]


def _tensor(array: np.ndarray, copy: bool = False) -> torch.Tensor:
    # Arrow buffers are immutable to numpy (read-only flag); torch shares them anyway where the
    # memory belongs to this batch's freshly built table, so nothing else observes an in-place
    # write. ``copy``: the table's memory is shared (a Ray object-store block), so copy it.
    if copy:
        return torch.from_numpy(array.copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _numeric(array: pa.Array) -> np.ndarray:
    """A zero-copy numpy view of a numeric array (nulls, e.g. under a null list slot, become 0)."""
    return to_numpy(array, fill=0)


def _ragged(array: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts (B,), lengths (B,), values) of a list, string or binary array; zero-copy views."""
    n = len(array)
    if pa.types.is_list(array.type):
        offsets = to_numpy(array.offsets)
        child = array.values
        if pa.types.is_fixed_size_list(child.type):
            width = child.type.list_size
            flat = _numeric(child.values)
            values = flat[child.offset * width : (child.offset + len(child)) * width]
            values = values.reshape(-1, width)
        else:
            values = _numeric(child)
    else:  # string / binary: [validity, int32 offsets, data]
        _, offset_buffer, data = array.buffers()
        offsets = np.frombuffer(offset_buffer, np.int32)[array.offset : array.offset + n + 1]
        values = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    starts = offsets[:-1].astype(np.int64)
    lengths = np.where(valid(array), np.diff(offsets), 0).astype(np.int64)
    return starts, lengths, values


Fill = Callable[[np.ndarray], None]


class _Outputs:
    """The tensors of one batch: planned first (shape, dtype, how to fill), then allocated at once.

    Each planned tensor is either ``ready`` (an array already holding its values) or filled in
    place by a function that receives the zeroed array.
    """

    def __init__(self) -> None:
        self.plan: list[tuple[str, tuple[int, ...], np.dtype, Fill | np.ndarray]] = []

    def ready(self, key: str, array: np.ndarray) -> None:
        self.plan.append((key, array.shape, array.dtype, array))

    def fill(self, key: str, shape: tuple[int, ...], dtype: Any, fill: Fill) -> None:
        self.plan.append((key, shape, np.dtype(dtype), fill))

    def tensors(self, shared: bool, copy: bool = False) -> dict[str, torch.Tensor]:
        if shared:
            return self._shared()
        out = {}
        for key, shape, dtype, how in self.plan:
            if isinstance(how, np.ndarray):
                out[key] = _tensor(how, copy)
            else:
                array = np.zeros(shape, dtype)
                how(array)
                out[key] = torch.from_numpy(array)
        return out

    def _shared(self) -> dict[str, torch.Tensor]:
        offsets, total = [], 0
        for _, shape, dtype, _ in self.plan:
            offsets.append(total)
            total += -(-int(np.prod(shape)) * dtype.itemsize // _ALIGN) * _ALIGN
        # What torch's default_collate does in workers: allocate the output in shared memory
        # rather than let pickling copy each tensor there. A new shared-memory file reads as
        # zeros (POSIX ftruncate), so the padding needs no pass of its own.
        storage = torch.UntypedStorage._new_shared(max(total, 1))
        buffer = torch.empty(0, dtype=torch.uint8).set_(storage)
        out = {}
        for (key, shape, dtype, how), offset in zip(self.plan, offsets, strict=True):
            nbytes = int(np.prod(shape)) * dtype.itemsize
            kind = torch.from_numpy(np.empty(0, dtype)).dtype
            tensor = buffer[offset : offset + nbytes].view(kind).view(shape)
            if isinstance(how, np.ndarray):
                tensor.numpy()[...] = how
            else:
                how(tensor.numpy())
            out[key] = tensor
        return out


def _padded(
    outputs: _Outputs,
    key: str,
    mask_key: str | None,
    ragged: tuple[np.ndarray, ...],
    width: int | None = None,
) -> None:
    """Plan ragged rows as a (B, T, ...) zero-padded tensor and a (B, T) mask, True at padding;
    T is ``width`` when given (no row longer), else the longest row's length."""
    starts, lengths, values = ragged
    longest = int(lengths.max()) if len(lengths) else 0
    longest = longest if width is None else width
    steps = np.arange(longest)
    real = steps[None, :] < lengths[:, None]
    total = int(lengths.sum())

    def fill(out: np.ndarray) -> None:
        if total and (starts[1:] == starts[:-1] + lengths[:-1]).all():
            # Rows lie back to back in the buffer (the usual case): one masked copy, no index array.
            out[real] = values[starts[0] : starts[0] + total]
        elif total:
            out[real] = values[(starts[:, None] + steps[None, :])[real]]

    outputs.fill(key, (len(lengths), longest, *values.shape[1:]), values.dtype, fill)
    if mask_key is not None:
        outputs.ready(mask_key, ~real)


def _rows_into(rows: list[np.ndarray | None], write: Callable[[np.ndarray, np.ndarray], None]):
    def fill(out: np.ndarray) -> None:
        for i, row in enumerate(rows):
            if row is not None:
                write(out[i], row)

    return fill


def _image(images: list[np.ndarray | None] | np.ndarray, outputs: _Outputs) -> np.ndarray:
    """Plan ``image`` and ``image_sizes``: (C, H, W) rows, or one ready (B, C, H, W) array."""
    if isinstance(images, np.ndarray):
        shape = np.tile(np.array(images.shape[1:], np.int64), (len(images), 1))
        outputs.ready("image", images)
        outputs.ready("image_sizes", shape[:, 1:].copy())
        return np.ones(len(images), bool)
    present = np.array([i is not None for i in images], bool)
    shape = np.array([(0, 0, 0) if i is None else i.shape for i in images], np.int64)
    shape = shape.reshape(len(images), 3)
    channels = int(shape[:, 0].max()) if present.any() else 1
    height, width = (int(shape[:, 1].max()), int(shape[:, 2].max())) if present.any() else (0, 0)

    def write(out: np.ndarray, pixels: np.ndarray) -> None:
        # A grayscale image in a batch with colour ones is broadcast to every channel.
        out[:, : pixels.shape[1], : pixels.shape[2]] = pixels

    fill = _rows_into(images, write)
    outputs.fill("image", (len(images), channels, height, width), np.uint8, fill)
    outputs.ready("image_sizes", shape[:, 1:].copy())
    return present


def _arrow_images(pixels: pa.Array, shapes: pa.Array) -> list[np.ndarray | None] | np.ndarray:
    """Decoded Arrow images as (C, H, W) row views, or one zero-copy (B, C, H, W) view."""
    present = valid(pixels)
    starts, lengths, values = _ragged(pixels)
    shape = np.zeros((len(pixels), 3), np.int64)
    if present.any():
        flat = _numeric(shapes.values)[shapes.offset * 3 :]
        shape[present] = flat[: len(shapes) * 3].reshape(-1, 3)[present]
    if len(pixels) and present.all() and (shape == shape[0]).all():
        # One shape for all: a view over the Arrow buffer, no copy.
        c, h, w = shape[0].tolist()
        return values[starts[0] : starts[0] + len(pixels) * c * h * w].reshape(-1, c, h, w)
    return [
        values[s : s + n].reshape(c, h, w) if p else None
        for s, n, (c, h, w), p in zip(starts, lengths, shape.tolist(), present, strict=True)
    ]


def _audio(waves: list[np.ndarray | None], dtype: AudioDtype, outputs: _Outputs) -> np.ndarray:
    lengths = np.array([0 if w is None else len(w) for w in waves], np.int64)
    longest = int(lengths.max()) if len(lengths) else 0
    fill = _rows_into(waves, lambda out, wave: wave_into(out[: len(wave)], wave))
    outputs.fill("audio", (len(waves), longest), dtype, fill)
    outputs.ready("audio_lengths", lengths)
    return np.array([w is not None for w in waves], bool)


def _arrow_waves(array: pa.Array) -> list[np.ndarray | None]:
    starts, lengths, values = _ragged(array)
    present = valid(array)
    rows = zip(starts.tolist(), lengths.tolist(), present.tolist(), strict=True)
    return [values[s : s + n] if v else None for s, n, v in rows]


def _custom(array: pa.Array, outputs: _Outputs, width: int | None) -> None:
    """Plan ``custom`` (B, F); ``width`` is F, or ``None`` to take the longest vector's."""
    starts, lengths, values = _ragged(array)
    if width is not None:
        # The readers check widths against F first (`jin_data.decode.Decoder`), naming the row's
        # place; this guards a table built by other means.
        wrong = np.flatnonzero(valid(array) & (lengths != width))
        if len(wrong):
            raise ValueError(
                f"custom: row {wrong[0]} of the batch holds {lengths[wrong[0]]} values, "
                f"expected F={width}"
            )
    if (
        len(lengths)
        and lengths.min() == lengths.max() > 0
        and (np.diff(starts) == lengths[0]).all()
    ):
        # Every vector present and back to back: a zero-copy (B, F) view of the value buffer.
        width = int(lengths[0])
        vectors = values[starts[0] : starts[0] + width * len(lengths)]
        outputs.ready("custom", vectors.reshape(-1, width))
    else:  # some absent: pad to (B, F), zeros where absent
        _padded(outputs, "custom", None, (starts, lengths, values), width)


def build_batch(
    table: pa.Table,
    modalities: Sequence[str],
    *,
    images: list[np.ndarray | None] | np.ndarray | None = None,
    waves: list[np.ndarray | None] | None = None,
    audio_dtype: AudioDtype = "float32",
    shared: bool = False,
    custom_dim: int | None = None,
    copy: bool = False,
) -> dict[str, Any]:
    """The batch of ``modalities`` from ``table`` (bookkeeping, text, points, custom) plus decoded
    ``images`` and ``waves`` given per row in the table's order (see `jin_data.decode.Media`).
    ``custom`` is (B, F), F as `custom_width` finds it.

    ``audio_dtype="int16"`` gives ``audio`` as 16-bit PCM (full scale 32768; float sources are
    rounded and clipped to full scale, and must be finite, as a `jin_data.decode.Decoder` of that
    ``audio_dtype`` checks): half the bytes to move, converted to float on the accelerator.
    ``shared=True`` allocates every tensor in one shared-memory buffer (for DataLoader workers).
    ``copy=True`` copies what would otherwise view ``table``'s memory (``custom``, same-shape
    images): for a table whose buffers others read too, such as a Ray object-store block, which
    an in-place edit of the batch would otherwise change.
    """
    if audio_dtype not in ("float32", "int16"):
        raise ValueError(f"audio_dtype: expected 'float32' or 'int16', received {audio_dtype!r}")
    label = single_array(table["label"])
    batch: dict[str, Any] = {
        "id": single_array(table["id"]).to_pylist(),
        "split": single_array(table["split"]).to_pylist(),
    }
    outputs = _Outputs()
    outputs.ready("label", to_numpy(label, fill=-1).astype(np.int64))
    for modality in modalities:
        if modality == "image":
            assert images is not None
            present = _image(images, outputs)
        elif modality == "audio":
            assert waves is not None
            present = _audio(waves, audio_dtype, outputs)
        else:
            column = single_array(table[modality])
            present = valid(column)
            if modality == "text":
                batch["text"] = ["" if s is None else s for s in column.to_pylist()]
                _padded(outputs, "text_bytes", "text_padding_mask", _ragged(column))
            elif modality == "points":
                _padded(outputs, "points", "points_padding_mask", _ragged(column))
            else:
                _custom(column, outputs, custom_width(table, custom_dim))
        outputs.ready(f"{modality}_present", present)
    batch.update(outputs.tensors(shared, copy))
    return batch


def collate(
    table: pa.Table,
    modalities: Sequence[str] | None = None,
    audio_dtype: AudioDtype = "float32",
    custom_dim: int | None = None,
    copy: bool = False,
) -> dict[str, Any]:
    """Padded tensors and masks from a decoded batch (see `jin_data.decode.Decoder`).

    ``modalities`` defaults to every modality whose decoded column is in ``table``; naming one
    that is not there raises a ValueError listing the columns. ``audio_dtype`` and ``copy`` as in
    `build_batch`; ``custom_dim`` (F) as in `custom_width`. With ``audio_dtype="int16"`` a
    waveform holding NaN or infinity raises a `jin_data.errors.DecodeError` naming its row.
    """
    chosen = decoded_modalities(table) if modalities is None else list(modalities)
    for modality in chosen:
        if modality not in _COLUMN or _COLUMN[modality] not in table.column_names:
            raise ValueError(
                f"modality {modality!r}: expected column {_COLUMN.get(modality, modality)!r} in "
                f"the decoded batch, received columns {table.column_names}"
            )
    images = waves = None
    if "image" in chosen:
        images = _arrow_images(
            single_array(table["image_pixels"]), single_array(table["image_shape"])
        )
    if "audio" in chosen:
        waves = _arrow_waves(single_array(table["audio_wave"]))
        if audio_dtype == "int16":
            for row, wave in enumerate(waves):
                if wave is None:
                    continue
                try:
                    check_pcm16(wave)
                except ValueError as err:
                    raise row_error(table, row, "audio", f"does not convert: {err}") from None
    return build_batch(
        table,
        chosen,
        images=images,
        waves=waves,
        audio_dtype=audio_dtype,
        custom_dim=custom_dim,
        copy=copy,
    )
