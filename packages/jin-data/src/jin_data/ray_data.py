"""The Ray Data path: the same shards as a ``ray.data.Dataset``, decoded in ``map_batches``.

Ray is an optional extra (``pip install "jin-data[ray]"``) and is imported inside these functions
only, so ``import jin_data`` never imports it. Usage with Ray Train::

    dataset = read_ray_dataset("s3://bucket/numberworld", split="train")
    trainer = TorchTrainer(..., datasets={"train": dataset})
    # in the training loop:
    shard = ray.train.get_dataset_shard("train")
    for batch in shard.iter_torch_batches(batch_size=64, collate_fn=ray_collate_fn()):
        ...  # the batch layout of docs/CONVENTIONS.md, as from `ShardDataset`

The data set starts as one item per row group (`ray.data.from_items`); ``map_batches`` runs
`RowGroupDecoder` on each, which reads it with the streaming reader's own code (page checksums,
split filter, provenance) and decodes it with `Decoder`. Blocks stay Arrow to the end: the collate
function is an ``ArrowBatchCollateFn``, so `jin_data.collate.collate` sees decoded tables. Errors
name the file, row group, row and sample id, as in the streaming reader. With ``on_error="skip"``
each skipped row group or row is logged by the Ray worker that read it.

Why not ``ray.data.read_parquet``: it plans reads per file and, for a few files of this size, ran
the whole data set as one task producing ~128 MB blocks (Ray 2.60): no parallel decoding, and the
first batch only after half the data set was decoded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jin_data.collate import collate
from jin_data.decode import AudioDtype, Decoder, OnError
from jin_data.errors import DataError, ShardError
from jin_data.reader import list_shards, open_shard, read_row_group, split_rows
from jin_data.schema import MODALITIES, check_schema

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger("jin_data")

__all__ = ["RayCollateFn", "RowGroupDecoder", "ray_collate_fn", "read_ray_dataset"]


class RowGroupDecoder:
    """``map_batches`` step: read each ``(shard, row_group)`` of its input, keep the rows of
    ``split``, decode them; yields one decoded Arrow table per row group.

    With ``on_error="skip"`` an unreadable shard or row group, or a row that does not decode, is
    logged on the ``jin_data`` logger by the Ray worker and left out; a row group is logged with
    its rows of ``split`` (`jin_data.reader.split_rows`).
    """

    def __init__(
        self,
        fs: Any,
        shards: list[Any],
        columns: list[str],
        split: Sequence[str] | None,
        decoder: Decoder,
    ) -> None:
        self.fs, self.shards, self.columns, self.split = fs, shards, columns, split
        self.decoder = decoder

    def __call__(self, units: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        for s, g in zip(units["shard"].tolist(), units["row_group"].tolist(), strict=True):
            shard = self.shards[s]
            try:
                table = read_row_group(
                    open_shard(self.fs, shard), shard, g, self.columns, self.split
                )
            except DataError as err:
                if self.decoder.on_error == "raise":
                    raise
                lost = split_rows(self.fs, shard, g, self.split)
                logger.warning("jin_data: skipped %d rows: %s", lost, err)
                continue
            yield self.decoder(table)


def read_ray_dataset(
    url: str,
    *,
    split: str | Sequence[str] | None = None,
    modalities: Sequence[str] | None = None,
    audio_sample_rate: int = 16000,
    image_mode: Literal["L", "RGB"] | None = None,
    on_error: OnError = "raise",
) -> ray.data.Dataset:
    """The data set at ``url`` as a decoded ``ray.data.Dataset`` (one row per sample).

    Every shard's schema is checked first (`SchemaError` or `ShardError` names the file; with
    ``on_error="skip"`` such a shard is logged with its row count and left out). The data set is one
    block per row group: each is read, split-filtered and decoded by one Ray task
    (`RowGroupDecoder`), so decoding runs on every CPU Ray has and the first batches arrive after
    one row group rather than after a whole file.
    """
    import ray.data

    unknown = sorted(set(modalities or []) - set(MODALITIES))
    if unknown:
        raise ValueError(f"modalities: unknown {unknown}; expected a subset of {MODALITIES}")
    fs, listed = list_shards(url, on_error)
    splits = [split] if isinstance(split, str) else split
    shards = _readable_shards(fs, listed, on_error, splits)
    if listed and not shards:
        raise ShardError(f"on_error='skip' left no readable shard of {url!r}", url=url)
    units = [
        {"shard": s, "row_group": g}
        for s, shard in enumerate(shards)
        for g in range(len(shard.row_groups))
    ]
    columns = ["id", "split", "label", *(MODALITIES if modalities is None else modalities)]
    decoder = Decoder(audio_sample_rate=audio_sample_rate, image_mode=image_mode, on_error=on_error)
    step = RowGroupDecoder(fs, shards, columns, splits, decoder)
    if not units:  # a data set of no rows (Ray refuses zero blocks)
        return ray.data.from_items([])
    return ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        step, batch_size=1, batch_format="numpy"
    )


def _readable_shards(
    fs: Any, shards: list[Any], on_error: OnError, split: Sequence[str] | None = None
) -> list[Any]:
    """The shards whose Parquet schema reads and is a jin-data one. Another shard raises its
    `SchemaError` (or `ShardError` where the file cannot be read at all), or with
    ``on_error="skip"`` is logged, with its rows of ``split`` (`jin_data.reader.split_rows`), on
    the driver and left out."""
    kept = []
    for shard in shards:
        try:
            with fs.open(shard.path, "rb") as f:
                check_schema(pq.read_schema(f), shard.url)
        except DataError as err:
            error: DataError = err
        except (OSError, pa.ArrowException) as err:
            error = ShardError(f"cannot read the Parquet schema: {err}", url=shard.url)
        else:
            kept.append(shard)
            continue
        if on_error == "raise":
            raise error from None
        lost = sum(split_rows(fs, shard, g, split) for g in range(len(shard.row_groups)))
        logger.warning("jin_data: skipped %d rows: %s", lost, error)
    return kept


def ray_collate_fn(
    modalities: Sequence[str] | None = None,
    audio_dtype: AudioDtype = "float32",
    custom_dim: int | None = None,
) -> Any:
    """A collate function for ``iter_torch_batches(collate_fn=...)`` giving jin-data batches.

    ``audio_dtype="int16"`` gives audio as 16-bit PCM, as `jin_data.collate.build_batch` does.
    ``custom_dim`` is F, the width of ``custom``; by default the decoded blocks' schema metadata
    gives it (see `jin_data.collate.custom_width`). No tensor views a block's memory: the blocks
    live in Ray's object store, where an in-place edit of a batch would change the data set
    (a materialised one, read again next epoch).
    """
    from ray.data.collate_fn import ArrowBatchCollateFn

    class _JinCollate(ArrowBatchCollateFn):
        def __init__(self, chosen: Sequence[str] | None) -> None:
            super().__init__()
            self.modalities = None if chosen is None else list(chosen)

        def __call__(self, batch: pa.Table) -> dict[str, Any]:
            return collate(batch, self.modalities, audio_dtype, custom_dim, copy=True)

    return _JinCollate(modalities)


RayCollateFn = ray_collate_fn
