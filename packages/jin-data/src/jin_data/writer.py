"""Write samples as sharded Parquet to any fsspec URL, with a manifest.

Each shard is written under a hidden temporary name and renamed when complete; the manifest is
written last, the same way. A reader therefore never sees half a shard, and a data set with a
``manifest.json`` is whole (DESIGN.md, "write then rename"). A writer claims its folder with a
hidden ``.writing-<token>`` file while it writes, so that two writers started on one URL at once
(every rank of a job, say) never mix their shards under one manifest.

A sample is a mapping (see `Sample`); arrays are validated and converted here, so a bad sample fails
with its index, id and key before anything reaches the file.
"""

from __future__ import annotations

import io
import posixpath
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, TypedDict

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from jin_data.errors import SampleError
from jin_data.manifest import MANIFEST_NAME, Manifest, ShardInfo, sha256_file
from jin_data.schema import AUDIO_TYPE, SCHEMA_VERSION, sample_schema

__all__ = ["Sample", "ShardWriter", "write_dataset"]

SHARD_PATTERN = "shard-{:05d}.parquet"
CLAIM_PREFIX = ".writing-"
# Columns holding encoded media (PNG/JPEG, WAV/FLAC bytes): compressed by their own codec already,
# or raw PCM, which zstd shrinks by ~15% at the price of doubling the reader's cost per row.
MEDIA_COLUMNS = ("image", "audio.bytes")


def _leaf_paths(name: str, kind: pa.DataType) -> list[str]:
    """Parquet's dotted paths of the leaf columns of an Arrow field (3-level lists)."""
    if pa.types.is_struct(kind):
        return [p for f in kind for p in _leaf_paths(f"{name}.{f.name}", f.type)]
    if pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind):
        return _leaf_paths(f"{name}.list.element", kind.value_type)
    return [name]


def _codecs(schema: pa.Schema, compression: str, media_compression: str) -> dict[str, str]:
    leaves = [p for field in schema for p in _leaf_paths(field.name, field.type)]
    return {p: media_compression if p in MEDIA_COLUMNS else compression for p in leaves}


class Sample(TypedDict, total=False):
    """One sample for the writer; only ``id`` is required.

    - ``image``: encoded bytes (PNG/JPEG), a PIL image, or a uint8 array (H,W) / (H,W,C);
      arrays and PIL images are stored as PNG.
    - ``audio``: encoded WAV/FLAC bytes (or a bytearray/memoryview of them), or a mono float
      array (S,) with ``audio_sample_rate``.
    - ``points``: float array (N, 3 + C); ``custom``: float array (F,).
    """

    id: str
    split: str
    label: int | None
    text: str | None
    image: bytes | np.ndarray | Image.Image | None
    audio: bytes | np.ndarray | None
    audio_sample_rate: int | None
    points: np.ndarray | None
    custom: np.ndarray | None


def _check_utf8(value: str, where: str, key: str) -> None:
    """Strings are stored as UTF-8: a lone surrogate (``errors="surrogateescape"`` text, say) has
    no encoding, and would fail the whole shard when it is written, not this sample."""
    try:
        value.encode()
    except UnicodeEncodeError as err:
        raise SampleError(
            f"{where} key {key!r}: not encodable as UTF-8 ({err.reason} at position {err.start}: "
            f"{value[err.start : err.end]!r})"
        ) from None


def _encode_png(image: np.ndarray | Image.Image, where: str) -> bytes:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise SampleError(
                f"{where} key 'image': expected uint8 (H,W) or (H,W,C), "
                f"received {image.dtype} {image.shape}"
            )
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
    buffer = io.BytesIO()
    try:
        (Image.fromarray(image) if isinstance(image, np.ndarray) else image).save(buffer, "PNG")
    except (OSError, TypeError, ValueError) as err:  # 5 channels, a 0-pixel side, mode F / CMYK
        shape = image.shape if isinstance(image, np.ndarray) else f"{image.mode} {image.size}"
        raise SampleError(
            f"{where} key 'image': cannot store {shape} as PNG ({err}); pass encoded bytes, "
            "or a uint8 (H,W) / (H,W,C) array with C in 1-4"
        ) from None
    return buffer.getvalue()


class _Row:
    """A validated sample in column-ready form."""

    __slots__ = ("audio", "custom", "id", "image", "label", "points", "split", "text")

    def __init__(self, sample: Mapping[str, Any], index: int) -> None:
        unknown = set(sample) - set(Sample.__annotations__)
        sample_id = sample.get("id")
        where = f"sample {index} (id={sample_id!r})"
        if unknown:
            raise SampleError(
                f"{where}: unknown keys {sorted(unknown)}; "
                f"allowed: {sorted(Sample.__annotations__)}"
            )
        if not isinstance(sample_id, str) or not sample_id:
            raise SampleError(f"{where} key 'id': expected a non-empty str, received {sample_id!r}")
        _check_utf8(sample_id, where, "id")
        self.id = sample_id
        self.split = sample.get("split", "train")
        if not isinstance(self.split, str) or not self.split:
            raise SampleError(
                f"{where} key 'split': expected a non-empty str, received {self.split!r}"
            )
        _check_utf8(self.split, where, "split")
        label = sample.get("label")
        if label is not None and (
            isinstance(label, (bool, np.bool_))
            or not isinstance(label, (int, np.integer))
            or not -(2**63) <= int(label) < 2**63
        ):
            raise SampleError(
                f"{where} key 'label': expected an int or None (int64), received {label!r}"
            )
        self.label = None if label is None else int(label)
        self.text = sample.get("text")
        if self.text is not None and not isinstance(self.text, str):
            raise SampleError(
                f"{where} key 'text': expected a str or None, received {type(self.text).__name__}"
            )
        if self.text is not None:
            _check_utf8(self.text, where, "text")
        self.image = self._image(sample.get("image"), where)
        self.audio = self._audio(sample, where)
        self.points = self._array(sample.get("points"), 2, where, "points")
        if self.points is not None and self.points.shape[1] < 3:
            raise SampleError(
                f"{where} key 'points': expected (N, 3 + C), received {self.points.shape}"
            )
        self.custom = self._array(sample.get("custom"), 1, where, "custom")

    @staticmethod
    def _image(image: Any, where: str) -> bytes | None:
        if image is None or isinstance(image, bytes):
            return image
        if isinstance(image, (bytearray, memoryview)):
            return bytes(image)
        if isinstance(image, (np.ndarray, Image.Image)):
            return _encode_png(image, where)
        raise SampleError(
            f"{where} key 'image': expected encoded bytes, a PIL image or a uint8 array, "
            f"received {type(image).__name__}"
        )

    @staticmethod
    def _audio(sample: Mapping[str, Any], where: str) -> dict[str, Any] | None:
        audio = sample.get("audio")
        rate = sample.get("audio_sample_rate")
        if audio is None:
            return None
        if rate is not None:  # stored as int32: checked here, not when the shard is written
            try:
                rate = int(rate)
            except (TypeError, ValueError):
                rate = None
            if rate is None or not 0 < rate < 2**31:
                raise SampleError(
                    f"{where} key 'audio_sample_rate': expected an int in 1..2**31-1 or None, "
                    f"received {sample.get('audio_sample_rate')!r}"
                )
        if isinstance(audio, (bytes, bytearray, memoryview)):
            return {"bytes": bytes(audio), "samples": None, "sample_rate": rate}
        array = np.asarray(audio)
        if array.dtype.kind != "f":
            # Integer PCM stored as floats would read back far beyond +-1.
            raise SampleError(
                f"{where} key 'audio': expected encoded bytes or float samples in [-1, 1], "
                f"received {array.dtype} (encode PCM as WAV bytes, or scale it)"
            )
        samples = _Row._array(array, 1, where, "audio")
        if rate is None:
            raise SampleError(
                f"{where} key 'audio_sample_rate': required (> 0) with raw samples, got {rate!r}"
            )
        return {"bytes": None, "samples": samples, "sample_rate": rate}

    @staticmethod
    def _array(value: Any, ndim: int, where: str, key: str) -> np.ndarray | None:
        if value is None:
            return None
        array = np.asarray(value, dtype=np.float32)
        if array.ndim != ndim:
            raise SampleError(f"{where} key {key!r}: expected {ndim}-D, received {array.shape}")
        return array


def _fixed_list(rows: list[np.ndarray | None], width: int, key: str, ids: list[str]) -> pa.Array:
    for row, sample_id in zip(rows, ids, strict=True):
        if row is not None and row.shape[-1] != width:
            raise SampleError(
                f"sample id={sample_id!r} key {key!r}: expected last dim {width}, "
                f"received {row.shape} (fixed per data set by the first sample or the argument)"
            )
    absent = np.array([row is None for row in rows])
    lengths = np.where(absent, 0, width).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    present = [row.reshape(-1) for row in rows if row is not None]
    flat = np.concatenate(present) if present else np.zeros(0, np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat), mask=pa.array(absent))


def _points_array(points: list[np.ndarray | None], channels: int, ids: list[str]) -> pa.Array:
    for row, sample_id in zip(points, ids, strict=True):
        if row is not None and row.shape[1] != channels:
            raise SampleError(
                f"sample id={sample_id!r} key 'points': expected (N, {channels}), received "
                f"{row.shape} (3 + C is fixed per data set by the first sample or the argument)"
            )
    lengths = np.array([0 if p is None else len(p) for p in points], np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    present = [p for p in points if p is not None]
    flat = np.concatenate(present) if present else np.zeros((0, channels), np.float32)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), channels)
    mask = pa.array(np.array([p is None for p in points]))
    return pa.ListArray.from_arrays(pa.array(offsets), inner, mask=mask)


def _audio_array(rows: list[_Row]) -> pa.Array:
    audio = [row.audio for row in rows]
    return pa.array(
        [
            None
            if a is None
            else {**a, "samples": None if a["samples"] is None else a["samples"].tolist()}
            for a in audio
        ],
        type=AUDIO_TYPE,
    )


class ShardWriter:
    """Accumulate samples and write them as Parquet shards under ``url``.

    Args:
        url: any fsspec URL (``/local/dir``, ``file://``, ``memory://``, ``s3://``...).
        rows_per_shard: samples per Parquet file.
        row_group_size: samples per row group, the reader's unit of streaming and of sharding
            across ranks and workers (small enough to hold a few in memory, large enough for I/O).
        point_features, custom_dim: ``C`` and ``F`` of the schema; inferred from the first
            sample carrying points / a custom vector when ``None`` (0 if the first shard has none).
        overwrite: replace an existing data set (its manifest and shards, or the shards a
            failed write left without a manifest); otherwise refuse. A folder another writer is
            writing into is refused too; with ``overwrite`` that writer fails at its next shard.
        compression: Parquet codec of every column but the encoded media.
        media_compression: Parquet codec of the encoded image and audio bytes. ``"none"`` by
            default: PNG, JPEG and FLAC are compressed already, and a general-purpose codec on
            raw PCM WAV saves ~15% of space but doubles the reader's decompression cost.
    """

    def __init__(
        self,
        url: str,
        *,
        rows_per_shard: int = 2048,
        row_group_size: int = 256,
        point_features: int | None = None,
        custom_dim: int | None = None,
        overwrite: bool = False,
        compression: str = "zstd",
        media_compression: str = "none",
    ) -> None:
        if rows_per_shard < 1 or row_group_size < 1:
            raise ValueError(
                f"rows_per_shard and row_group_size must be >= 1, got {rows_per_shard}, "
                f"{row_group_size}"
            )
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.rows_per_shard = rows_per_shard
        self.row_group_size = row_group_size
        self.point_features = point_features
        self.custom_dim = custom_dim
        self.compression = compression
        self.media_compression = media_compression
        self._rows: list[_Row] = []
        # The first point-cloud channels (3 + C) and custom width F seen, until they are fixed.
        self._first_widths: dict[str, int] = {}
        self._shards: list[ShardInfo] = []
        self._count = 0
        self._closed = False
        self.manifest: Manifest | None = None
        # Temporary names and the claim are this writer's own: two writers never share a file.
        self._token = uuid.uuid4().hex
        self._claim = posixpath.join(self.root, CLAIM_PREFIX + self._token)
        self._prepare_root(overwrite)

    def _prepare_root(self, overwrite: bool) -> None:
        # Claim first, then look: of two writers started at once, at least one sees the other.
        self.fs.makedirs(self.root, exist_ok=True)
        self.fs.touch(self._claim)
        try:
            # Shards without a manifest (a write that failed midway) are a data set too: readers
            # read every *.parquet file of such a folder, so writing over some would mix two sets.
            manifest = posixpath.join(self.root, MANIFEST_NAME)
            old = self.fs.glob(posixpath.join(self.root, "shard-*.parquet"))
            complete = self.fs.exists(manifest)
            others = [
                path
                for path in self.fs.glob(posixpath.join(self.root, CLAIM_PREFIX + "*"))
                if posixpath.basename(path) != posixpath.basename(self._claim)
            ]
            if (complete or old or others) and not overwrite:
                if others:
                    what = (
                        f"another ShardWriter is writing into {self.url!r} (claim "
                        f"{posixpath.basename(others[0])!r}; a killed writer leaves it)"
                    )
                elif complete:
                    what = f"a data set already exists at {self.url!r}"
                else:
                    what = (
                        "an unfinished data set (shards, no manifest) already exists at "
                        f"{self.url!r}"
                    )
                raise FileExistsError(f"{what} (overwrite=True)")
            for path in [*([manifest] if complete else []), *old, *others]:
                self.fs.rm(path)
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self.fs.exists(self._claim):
            self.fs.rm(self._claim)

    def _check_claim(self) -> None:
        """Before a rename: an overwriting writer removed this one's claim (and its shards)."""
        if not self.fs.exists(self._claim):
            raise FileExistsError(
                f"another ShardWriter replaced the data set at {self.url!r} (overwrite=True) "
                "while this one was writing it"
            )

    def write(self, sample: Mapping[str, Any]) -> None:
        """Validate and buffer one sample; a full shard is written out."""
        if self._closed:
            raise RuntimeError(f"ShardWriter for {self.url!r} is closed")
        row = _Row(sample, self._count)
        self._check_widths(row)
        self._rows.append(row)
        self._count += 1
        if len(self._rows) >= self.rows_per_shard:
            self._flush()

    def _check_widths(self, row: _Row) -> None:
        """Points' 3 + C and custom's F must be the data set's (the arguments, else the first
        sample's): checked here, so that a bad sample fails alone and nothing is buffered."""
        fixed = {
            "points": None if self.point_features is None else 3 + self.point_features,
            "custom": self.custom_dim,
        }
        for key, array in (("points", row.points), ("custom", row.custom)):
            if array is None:
                continue
            width = array.shape[-1]
            expected = fixed[key] if fixed[key] is not None else self._first_widths.get(key)
            if expected is None:
                self._first_widths[key] = width
            elif width != expected:
                what = f"(N, {expected})" if key == "points" else f"({expected},)"
                raise SampleError(
                    f"sample {self._count} (id={row.id!r}) key {key!r}: expected {what}, received "
                    f"{array.shape} (fixed per data set by the argument or the first sample)"
                )

    def _schema(self) -> pa.Schema:
        if self.point_features is None:
            first = next((r.points for r in self._rows if r.points is not None), None)
            self.point_features = 0 if first is None else first.shape[1] - 3
        if self.custom_dim is None:
            first = next((r.custom for r in self._rows if r.custom is not None), None)
            self.custom_dim = 0 if first is None else first.shape[0]
        return sample_schema(self.point_features, self.custom_dim)

    def _table(self, schema: pa.Schema) -> pa.Table:
        assert self.point_features is not None and self.custom_dim is not None
        rows = self._rows
        ids = [r.id for r in rows]
        columns = {
            "id": pa.array(ids, pa.string()),
            "split": pa.array([r.split for r in rows], pa.string()),
            "label": pa.array([r.label for r in rows], pa.int64()),
            "text": pa.array([r.text for r in rows], pa.string()),
            "image": pa.array([r.image for r in rows], pa.binary()),
            "audio": _audio_array(rows),
            "points": _points_array([r.points for r in rows], 3 + self.point_features, ids),
            "custom": _fixed_list([r.custom for r in rows], self.custom_dim, "custom", ids),
        }
        return pa.Table.from_pydict(columns, schema=schema)

    def _flush(self) -> None:
        if not self._rows:
            return
        table = self._table(self._schema())
        name = SHARD_PATTERN.format(len(self._shards))
        final = posixpath.join(self.root, name)
        temporary = posixpath.join(self.root, f".{name}.{self._token}.inprogress")
        try:
            with (
                self.fs.open(temporary, "wb") as f,
                pq.ParquetWriter(
                    f,
                    table.schema,
                    compression=_codecs(table.schema, self.compression, self.media_compression),
                    write_page_checksum=True,
                ) as writer,
            ):
                writer.write_table(table, row_group_size=self.row_group_size)
            self._check_claim()
            self.fs.mv(temporary, final)
        except BaseException:
            if self.fs.exists(temporary):
                self.fs.rm(temporary)
            raise
        n = table.num_rows
        sizes = [min(self.row_group_size, n - start) for start in range(0, n, self.row_group_size)]
        self._shards.append(
            ShardInfo(
                path=name,
                num_rows=n,
                row_groups=sizes,
                splits=dict(sorted(Counter(r.split for r in self._rows).items())),
                num_bytes=self.fs.size(final),
                sha256=sha256_file(self.fs, final),
            )
        )
        self._rows = []

    def close(self) -> Manifest:
        """Write the last shard and the manifest; returns the manifest."""
        if self._closed:
            raise RuntimeError(f"ShardWriter for {self.url!r} is already closed")
        self._flush()
        self._closed = True
        if self.point_features is None or self.custom_dim is None:
            self._schema()
        from jin_data import __version__

        splits: Counter[str] = Counter()
        for shard in self._shards:
            splits.update(shard.splits)
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            point_features=self.point_features or 0,
            custom_dim=self.custom_dim or 0,
            num_rows=sum(s.num_rows for s in self._shards),
            splits=dict(sorted(splits.items())),
            shards=self._shards,
            writer=f"jin-data {__version__}",
        )
        final = posixpath.join(self.root, MANIFEST_NAME)
        temporary = posixpath.join(self.root, f".{MANIFEST_NAME}.{self._token}.inprogress")
        with self.fs.open(temporary, "wb") as f:
            f.write(manifest.to_json().encode())
        try:
            self._check_claim()
        except FileExistsError:
            self.fs.rm(temporary)
            raise
        self.fs.mv(temporary, final)
        self._release()
        self.manifest = manifest
        return manifest

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # On an exception the shards written so far stay, but no manifest is written: the data set
        # is visibly incomplete rather than silently short.
        if exc_type is None:
            self.close()
        else:
            self._closed = True
            self._release()


def write_dataset(
    samples: Iterable[Mapping[str, Any]],
    url: str,
    *,
    rows_per_shard: int = 2048,
    row_group_size: int = 256,
    point_features: int | None = None,
    custom_dim: int | None = None,
    overwrite: bool = False,
    compression: str = "zstd",
    media_compression: str = "none",
) -> Manifest:
    """Write every sample to sharded Parquet under ``url``; see `ShardWriter` for the arguments."""
    with ShardWriter(
        url,
        rows_per_shard=rows_per_shard,
        row_group_size=row_group_size,
        point_features=point_features,
        custom_dim=custom_dim,
        overwrite=overwrite,
        compression=compression,
        media_compression=media_compression,
    ) as writer:
        for sample in samples:
            writer.write(sample)
    assert writer.manifest is not None
    return writer.manifest
