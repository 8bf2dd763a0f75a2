"""Collate a decoded Arrow batch into padded tensors (docs/CONVENTIONS.md, "Batches from jin-data").

# B batch, T text bytes, C channels, H/W image height/width, S audio samples, N points, F features

Numeric columns are read straight from the Arrow buffers: ``custom`` when every row has it and
images that all share one shape become tensors over the Arrow memory without a copy; ragged columns
(text bytes, audio, points) are padded by one vectorised gather from the flat value buffer, never a
Python loop over rows. Only images of differing sizes are placed one by one.

Output, for each selected modality:
- text: ``text`` list[str] ("" where absent), ``text_bytes`` (B,T) uint8, ``text_padding_mask``;
- image: ``image`` (B,C,H,W) uint8 padded to the largest H, W, ``image_sizes`` (B,2) int64 (H, W);
- audio: ``audio`` (B,S) float32, ``audio_lengths`` (B,) int64;
- points: ``points`` (B,N,3+C) float32, ``points_padding_mask`` (B,N);
- custom: ``custom`` (B,F) float32;
- ``<modality>_present`` (B,) bool; and ``id`` list[str], ``label`` (B,) int64 (-1 absent),
  ``split`` list[str]. Padding masks are True at padding.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from jin_data.schema import MODALITIES

__all__ = ["collate", "decoded_modalities"]

# Which decoded column carries each modality.
_COLUMN = {
    "text": "text",
    "image": "image_pixels",
    "audio": "audio_wave",
    "points": "points",
    "custom": "custom",
}


def decoded_modalities(table: pa.Table) -> list[str]:
    """The modalities whose (decoded) column is in ``table``, in canonical order."""
    return [m for m in MODALITIES if _COLUMN[m] in table.column_names]


def _tensor(array: np.ndarray) -> torch.Tensor:
    # Arrow buffers are immutable to numpy (read-only flag); torch shares them anyway. The memory
    # belongs to this batch's freshly built table, so nothing else observes an in-place write.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _array(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(column, pa.Array):
        return column
    # combine_chunks copies even a single chunk; keep that one as is (zero-copy).
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _valid(array: pa.Array) -> np.ndarray:
    if array.null_count == 0:
        return np.ones(len(array), bool)
    return pc.is_valid(array).to_numpy(zero_copy_only=False)


def _numeric(array: pa.Array) -> np.ndarray:
    """A zero-copy numpy view of a numeric array (nulls, e.g. under a null list slot, become 0)."""
    if array.null_count:
        array = pc.fill_null(array, 0)
    return array.to_numpy(zero_copy_only=False)


def _ragged(array: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts (B,), lengths (B,), values) of a list, string or binary array; zero-copy views."""
    n = len(array)
    if pa.types.is_list(array.type):
        offsets = array.offsets.to_numpy()
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
    lengths = np.where(_valid(array), np.diff(offsets), 0).astype(np.int64)
    return starts, lengths, values


def _pad(starts: np.ndarray, lengths: np.ndarray, values: np.ndarray):
    """Ragged rows -> (B, T, ...) zero-padded array and (B, T) mask, True at padding."""
    longest = int(lengths.max()) if len(lengths) else 0
    steps = np.arange(longest)
    real = steps[None, :] < lengths[:, None]
    out = np.zeros((len(lengths), longest, *values.shape[1:]), values.dtype)
    total = int(lengths.sum())
    if total and (starts[1:] == starts[:-1] + lengths[:-1]).all():
        # Rows lie back to back in the buffer (the usual case): one masked copy, no index array.
        out[real] = values[starts[0] : starts[0] + total]
    elif total:
        out[real] = values[(starts[:, None] + steps[None, :])[real]]
    return _tensor(out), _tensor(~real)


def _text(array: pa.Array, batch: dict[str, Any]) -> None:
    batch["text"] = ["" if s is None else s for s in array.to_pylist()]
    batch["text_bytes"], batch["text_padding_mask"] = _pad(*_ragged(array))


def _image(pixels: pa.Array, shapes: pa.Array, batch: dict[str, Any]) -> None:
    present = _valid(pixels)
    starts, lengths, values = _ragged(pixels)
    shape = np.zeros((len(pixels), 3), np.int64)
    if present.any():
        flat = _numeric(shapes.values)[shapes.offset * 3 :]
        shape[present] = flat[: len(shapes) * 3].reshape(-1, 3)[present]
    channels = int(shape[:, 0].max()) if present.any() else 1
    height, width = (int(shape[:, 1].max()), int(shape[:, 2].max())) if present.any() else (0, 0)
    uniform = present.all() and (shape == shape[0]).all()
    if uniform:  # one shape for all: a view over the Arrow buffer, no copy
        total = len(pixels) * channels * height * width
        images = values[starts[0] : starts[0] + total].reshape(-1, channels, height, width)
    else:
        images = np.zeros((len(pixels), channels, height, width), np.uint8)
        for i in np.flatnonzero(present):
            c, h, w = shape[i]
            # A grayscale image in a batch with colour ones is broadcast to every channel.
            images[i, :, :h, :w] = values[starts[i] : starts[i] + lengths[i]].reshape(c, h, w)
    batch["image"] = _tensor(images)
    batch["image_sizes"] = torch.from_numpy(shape[:, 1:].copy())


def _custom(array: pa.Array, batch: dict[str, Any]) -> None:
    # Every present row holds exactly F values (the writer checks), absent rows none.
    starts, lengths, values = _ragged(array)
    if (
        len(lengths)
        and lengths.min() == lengths.max() > 0
        and (np.diff(starts) == lengths[0]).all()
    ):
        # Every vector present and back to back: a zero-copy (B, F) view of the value buffer.
        width = int(lengths[0])
        batch["custom"] = _tensor(
            values[starts[0] : starts[0] + width * len(lengths)].reshape(-1, width)
        )
    else:  # some absent: pad to (B, F), zeros where absent
        batch["custom"], _ = _pad(starts, lengths, values)


def collate(table: pa.Table, modalities: Sequence[str] | None = None) -> dict[str, Any]:
    """Padded tensors and masks from a decoded batch (see `jin_data.decode.Decoder`).

    ``modalities`` defaults to every modality whose decoded column is in ``table``; naming one
    that is not there raises a ValueError listing the columns.
    """
    chosen = decoded_modalities(table) if modalities is None else list(modalities)
    for modality in chosen:
        if modality not in _COLUMN or _COLUMN[modality] not in table.column_names:
            raise ValueError(
                f"modality {modality!r}: expected column {_COLUMN.get(modality, modality)!r} in "
                f"the decoded batch, received columns {table.column_names}"
            )
    label = _array(table["label"])
    batch: dict[str, Any] = {
        "id": _array(table["id"]).to_pylist(),
        "split": _array(table["split"]).to_pylist(),
        "label": torch.from_numpy(
            pc.fill_null(label, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        ),
    }
    for modality in chosen:
        column = _array(table[_COLUMN[modality]])
        if modality == "text":
            _text(column, batch)
        elif modality == "image":
            _image(column, _array(table["image_shape"]), batch)
        elif modality == "audio":
            starts, lengths, values = _ragged(column)
            batch["audio"], _ = _pad(starts, lengths, values)
            batch["audio_lengths"] = torch.from_numpy(lengths)
        elif modality == "points":
            batch["points"], batch["points_padding_mask"] = _pad(*_ragged(column))
        else:
            _custom(column, batch)
        batch[f"{modality}_present"] = torch.from_numpy(_valid(column))
    return batch
