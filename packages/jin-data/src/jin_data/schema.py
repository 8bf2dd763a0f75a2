"""The Arrow schema of one multimodal sample, version 2.

One row is one sample. Every modality column is nullable: a sample may lack any of them.

- ``id``: string, not null, unique within a data set;
- ``split``: string, not null ("train", "val", "test", ...);
- ``label``: int64 class index, null for none;
- ``text``: string (UTF-8);
- ``image``: binary, encoded PNG/JPEG (anything Pillow opens);
- ``audio``: struct<bytes: binary, samples: list<float32>, sample_rate: int32>, either WAV/FLAC
  bytes or mono float32 samples (then ``sample_rate`` is required);
- ``points``: list<fixed_size_list<float32>[3 + C]>, N points, xyz then C features;
- ``custom``: list<float32> of exactly F values (null where absent), one feature vector; stored
  as a plain list because pyarrow < 26 cannot read a Parquet ``fixed_size_list`` with null rows.

``C`` and ``F`` are fixed per data set and also recorded in the file metadata. The schema version
lives in the Parquet key-value metadata under ``jin_data.schema_version``; a reader refuses a file
without it or with a version it does not know.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from jin_data.errors import SchemaError

__all__ = [
    "MODALITIES",
    "SCHEMA_VERSION",
    "SchemaInfo",
    "check_schema",
    "declared_custom_dim",
    "sample_schema",
]

SCHEMA_VERSION = "2"
MODALITIES = ("text", "image", "audio", "points", "custom")
META_VERSION = b"jin_data.schema_version"
META_POINT_FEATURES = b"jin_data.point_features"
META_CUSTOM_DIM = b"jin_data.custom_dim"

AUDIO_TYPE = pa.struct(
    [
        pa.field("bytes", pa.binary()),
        pa.field("samples", pa.list_(pa.float32())),
        pa.field("sample_rate", pa.int32()),
    ]
)


def _points_type(point_features: int) -> pa.DataType:
    return pa.list_(pa.list_(pa.float32(), 3 + point_features))


def _custom_type(custom_dim: int) -> pa.DataType:
    # A plain list on disk, F checked by the writer and kept in the file metadata: pyarrow < 26
    # (which MLflow pins) cannot read back a Parquet fixed_size_list column holding null rows.
    del custom_dim
    return pa.list_(pa.float32())


def sample_schema(point_features: int = 0, custom_dim: int = 0) -> pa.Schema:
    """The sample schema (version 2) with ``C = point_features`` and ``F = custom_dim``."""
    if point_features < 0 or custom_dim < 0:
        raise ValueError(
            f"point_features and custom_dim must be >= 0, got {point_features}, {custom_dim}"
        )
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("label", pa.int64()),
        pa.field("text", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("audio", AUDIO_TYPE),
        pa.field("points", _points_type(point_features)),
        pa.field("custom", _custom_type(custom_dim)),
    ]
    metadata = {
        META_VERSION: SCHEMA_VERSION.encode(),
        META_POINT_FEATURES: str(point_features).encode(),
        META_CUSTOM_DIM: str(custom_dim).encode(),
    }
    return pa.schema(fields, metadata=metadata)


@dataclass(frozen=True)
class SchemaInfo:
    """What a reader needs to know about a conforming file."""

    version: str
    point_features: int
    custom_dim: int


def check_schema(schema: pa.Schema, url: str) -> SchemaInfo:
    """Validate ``schema`` against this version; raise `SchemaError` naming ``url`` and field.

    Field order and extra columns are allowed (a producer may add its own); the required columns
    must exist with exactly the documented types.
    """
    metadata = schema.metadata or {}
    version = metadata.get(META_VERSION)
    if version is None:
        raise SchemaError(
            f"not a jin-data shard: no {META_VERSION.decode()!r} in the file metadata "
            f"(columns: {schema.names})",
            url=url,
        )
    if version.decode() != SCHEMA_VERSION:
        raise SchemaError(
            f"schema version {version.decode()!r} is not supported; expected {SCHEMA_VERSION!r}",
            url=url,
        )
    try:
        point_features = int(metadata.get(META_POINT_FEATURES, b"0"))
        custom_dim = int(metadata.get(META_CUSTOM_DIM, b"0"))
    except ValueError as err:
        raise SchemaError(
            f"unreadable point/custom sizes in file metadata: {err}", url=url
        ) from None
    for column, key, size in (
        ("points", META_POINT_FEATURES, point_features),
        ("custom", META_CUSTOM_DIM, custom_dim),
    ):
        if size < 0:
            raise SchemaError(
                f"file metadata {key.decode()!r}: expected >= 0, received {size}",
                url=url,
                column=column,
            )
    expected = sample_schema(point_features, custom_dim)
    for field in expected:
        index = schema.get_field_index(field.name)
        if index < 0:
            raise SchemaError(
                f"missing column {field.name!r} of type {field.type}; file has {schema.names}",
                url=url,
                column=field.name,
            )
        received = schema.field(index).type
        if received != field.type:
            raise SchemaError(
                f"column type: expected {field.type}, received {received}",
                url=url,
                column=field.name,
            )
    return SchemaInfo(SCHEMA_VERSION, point_features, custom_dim)


def declared_custom_dim(schema: pa.Schema) -> int | None:
    """F as ``schema``'s metadata declares it (a table read from a shard carries the file's), or
    ``None`` where it declares none."""
    declared = (schema.metadata or {}).get(META_CUSTOM_DIM)
    return None if declared is None else int(declared)
