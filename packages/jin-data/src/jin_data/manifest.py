"""The data set manifest: which shards, how many rows, which schema, and a checksum per shard.

``manifest.json`` sits next to the shards and is written last, so a data set with a manifest is
complete. Readers plan epochs from it without opening every shard footer; `verify_dataset`
re-hashes the shards to catch corruption at rest.
"""

from __future__ import annotations

import hashlib
import json
import posixpath

import fsspec
from pydantic import Field

from jin_data._config import StrictConfig
from jin_data.errors import ShardError

__all__ = ["MANIFEST_NAME", "Manifest", "ShardInfo", "load_manifest", "verify_dataset"]

MANIFEST_NAME = "manifest.json"
_HASH_CHUNK = 1 << 22


class ShardInfo(StrictConfig):
    """One Parquet shard of a data set."""

    path: str = Field(description="file name relative to the data set root")
    num_rows: int = Field(ge=0)
    row_groups: list[int] = Field(description="rows in each row group, in file order")
    splits: dict[str, int] = Field(description="rows per split value")
    num_bytes: int = Field(ge=0)
    sha256: str


class Manifest(StrictConfig):
    """The contents of ``manifest.json``."""

    format: str = "jin-data"
    schema_version: str
    point_features: int = Field(ge=0)
    custom_dim: int = Field(ge=0)
    num_rows: int = Field(ge=0)
    splits: dict[str, int]
    shards: list[ShardInfo]
    writer: str

    def to_json(self) -> str:
        """Stable, sorted JSON (same data set, same bytes)."""
        return json.dumps(self.model_dump(), indent=2, sort_keys=True) + "\n"


def sha256_file(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Hex SHA-256 of a file, streamed in 4 MiB chunks."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(fs: fsspec.AbstractFileSystem, root: str) -> Manifest | None:
    """The manifest under ``root``, or ``None`` where there is none."""
    path = posixpath.join(root, MANIFEST_NAME)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        data = f.read()
    try:  # a damaged file may not even be UTF-8 (UnicodeDecodeError is a ValueError)
        manifest = Manifest.model_validate_json(data.decode())
    except ValueError as err:
        raise ShardError(f"unreadable manifest: {err}", url=path) from None
    # A hand-edited manifest may list a shard twice (also as ``./a.parquet`` next to
    # ``a.parquet``): every reader would then read its rows twice per epoch.
    seen: set[str] = set()
    for shard in manifest.shards:
        name = posixpath.normpath(shard.path)
        if name in seen:
            raise ShardError(f"manifest lists shard {shard.path!r} more than once", url=path)
        seen.add(name)
    return manifest


def verify_dataset(url: str) -> Manifest:
    """Re-hash every shard of the data set at ``url`` against its manifest.

    Raises `ShardError` naming the first shard that is missing, has another size or checksum.
    """
    fs, root = fsspec.core.url_to_fs(url)
    manifest = load_manifest(fs, root)
    if manifest is None:
        raise FileNotFoundError(f"no {MANIFEST_NAME} under {url!r}")
    for shard in manifest.shards:
        path = posixpath.join(root, shard.path)
        if not fs.exists(path):
            raise ShardError("shard listed in the manifest is missing", url=path)
        size = fs.size(path)
        if size != shard.num_bytes:
            raise ShardError(f"size: expected {shard.num_bytes} bytes, received {size}", url=path)
        digest = sha256_file(fs, path)
        if digest != shard.sha256:
            raise ShardError(f"sha256: expected {shard.sha256}, received {digest}", url=path)
    return manifest
