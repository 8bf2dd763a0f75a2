"""Arrow arrays built from numpy buffers, without ``pa.array``.

``pa.array`` (and every pyarrow call that converts a Python or numpy object, ``take`` of a numpy
index included) first asks whether the object is a pandas one, which imports pandas when it is
installed: ~0.15 s of CPU once per process, a fifth of reading a 3,000-sample epoch. The read path
builds its few arrays here instead, zero-copy from numpy, so reading never imports pandas.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

__all__ = ["bool_array", "numeric_array", "single_array", "string_array", "to_numpy", "valid"]


def numeric_array(values: np.ndarray) -> pa.Array:
    """A 1-D numeric (not bool) numpy array as an Arrow array of its type, without nulls."""
    values = np.ascontiguousarray(values)
    if values.ndim != 1 or values.dtype == np.bool_:
        raise ValueError(f"numeric_array: expected a 1-D numeric array, received {values.dtype}")
    type = pa.from_numpy_dtype(values.dtype)
    return pa.Array.from_buffers(type, len(values), [None, pa.py_buffer(values)])


def bool_array(values: np.ndarray) -> pa.Array:
    """A 1-D numpy bool array as an Arrow boolean array (bit-packed) without nulls."""
    values = np.asarray(values, dtype=np.bool_)
    bits = np.packbits(values, bitorder="little")
    return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(bits)])


def string_array(values: Sequence[str]) -> pa.Array:
    """Python strings as an Arrow string array without nulls."""
    encoded = [v.encode() for v in values]
    offsets = np.zeros(len(encoded) + 1, np.int32)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    data = b"".join(encoded)
    return pa.Array.from_buffers(
        pa.string(), len(encoded), [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )


_NUMPY = {
    pa.int8(): np.int8,
    pa.int16(): np.int16,
    pa.int32(): np.int32,
    pa.int64(): np.int64,
    pa.uint8(): np.uint8,
    pa.uint16(): np.uint16,
    pa.uint32(): np.uint32,
    pa.uint64(): np.uint64,
    pa.float16(): np.float16,
    pa.float32(): np.float32,
    pa.float64(): np.float64,
}


def valid(array: pa.Array) -> np.ndarray:
    """``(N,)`` bool: which entries of ``array`` are not null (its validity bitmap, unpacked)."""
    bitmap = array.buffers()[0]
    if array.null_count == 0 or bitmap is None:
        return np.ones(len(array), np.bool_)
    return _bits(bitmap, array.offset, len(array))


def to_numpy(array: pa.Array, fill: float | None = None) -> np.ndarray:
    """The values of a fixed-width numeric or boolean ``array`` as numpy, nulls set to ``fill``.

    Numeric arrays without nulls are read-only zero-copy views; an array with nulls needs
    ``fill`` and is copied. Other types fall back to ``Array.to_numpy`` (which imports pandas).
    """
    n, offset = len(array), array.offset
    if pa.types.is_boolean(array.type):
        values = _bits(array.buffers()[1], offset, n)
    elif array.type in _NUMPY:
        dtype = np.dtype(_NUMPY[array.type])
        values = np.frombuffer(array.buffers()[1], dtype, n, offset * dtype.itemsize)
    else:
        values = array.to_numpy(zero_copy_only=False)
    if array.null_count:
        if fill is None:
            raise ValueError(f"to_numpy: the {array.type} array has nulls and no fill was given")
        values = np.where(valid(array), values, np.array(fill, values.dtype))
    return values


def _bits(buffer: pa.Buffer, offset: int, n: int) -> np.ndarray:
    packed = np.frombuffer(buffer, np.uint8)
    return np.unpackbits(packed, count=offset + n, bitorder="little")[offset:].view(np.bool_)


def single_array(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """``column`` as one array: its only chunk as is (``combine_chunks`` copies even that one)."""
    if isinstance(column, pa.Array):
        return column
    if column.num_chunks == 1:
        return column.chunk(0)
    if column.num_chunks == 0:  # combine_chunks would build the empty array with pa.array
        return pa.nulls(0, column.type)
    return column.combine_chunks()
