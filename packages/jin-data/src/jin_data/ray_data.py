"""The Ray Data path: the same shards as a ``ray.data.Dataset``, decoded in ``map_batches``.

Ray is an optional extra (``pip install "jin-data[ray]"``) and is imported inside these functions
only, so ``import jin_data`` never imports it. Usage with Ray Train::

    dataset = read_ray_dataset("s3://bucket/numberworld", split="train")
    trainer = TorchTrainer(..., datasets={"train": dataset})
    # in the training loop:
    shard = ray.train.get_dataset_shard("train")
    for batch in shard.iter_torch_batches(batch_size=64, collate_fn=ray_collate_fn()):
        ...  # the batch layout of docs/CONVENTIONS.md, as from `ShardDataset`

Blocks stay Arrow end to end: ``map_batches`` runs `Decoder` on ``pyarrow`` batches and the
collate function is an ``ArrowBatchCollateFn``, so `jin_data.collate.collate` sees the same table
as in the streaming reader. Decode errors name the file (``__url``) and the sample id; Ray does not
expose row groups. With ``on_error="skip"`` each skipped row is logged by the Ray worker that
decoded it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jin_data.collate import collate
from jin_data.decode import AudioDtype, Decoder, OnError
from jin_data.errors import SchemaError
from jin_data.reader import list_shards
from jin_data.schema import MODALITIES, check_schema

if TYPE_CHECKING:
    import ray.data

__all__ = ["RayCollateFn", "SplitFilter", "ray_collate_fn", "read_ray_dataset"]


class SplitFilter:
    """``map_batches`` step: keep rows of the given splits; name the source file ``__url``."""

    def __init__(self, split: Sequence[str] | None) -> None:
        self.split = None if split is None else pa.array(list(split))

    def __call__(self, table: pa.Table) -> pa.Table:
        if "path" in table.column_names:
            table = table.rename_columns(
                ["__url" if c == "path" else c for c in table.column_names]
            )
        if self.split is not None:
            table = table.filter(pc.is_in(table["split"], self.split))
        return table


def read_ray_dataset(
    url: str,
    *,
    split: str | Sequence[str] | None = None,
    modalities: Sequence[str] | None = None,
    audio_sample_rate: int = 16000,
    image_mode: Literal["L", "RGB"] | None = None,
    on_error: OnError = "raise",
    **read_parquet_args: Any,
) -> ray.data.Dataset:
    """The data set at ``url`` as a decoded ``ray.data.Dataset`` (one row per sample).

    Every shard's schema is checked first (`SchemaError` names the file). ``read_parquet_args``
    go to ``ray.data.read_parquet`` (e.g. ``override_num_blocks``).
    """
    import pyarrow.fs as pafs
    import ray.data
    from fsspec.implementations.local import LocalFileSystem

    unknown = sorted(set(modalities or []) - set(MODALITIES))
    if unknown:
        raise ValueError(f"modalities: unknown {unknown}; expected a subset of {MODALITIES}")
    fs, shards = list_shards(url)
    for shard in shards:
        with fs.open(shard.path, "rb") as f:
            try:
                check_schema(pq.read_schema(f), shard.url)
            except (OSError, pa.ArrowException) as err:
                raise SchemaError(f"cannot read the Parquet schema: {err}", url=shard.url) from None
    columns = ["id", "split", "label", *(modalities or MODALITIES)]
    # Local files through Arrow's own filesystem, anything else through fsspec.
    local = isinstance(fs, LocalFileSystem)
    dataset = ray.data.read_parquet(
        [shard.path for shard in shards],
        filesystem=pafs.LocalFileSystem() if local else pafs.PyFileSystem(pafs.FSSpecHandler(fs)),
        include_paths=True,
        **read_parquet_args,
    ).select_columns([*columns, "path"])
    splits = [split] if isinstance(split, str) else split
    dataset = dataset.map_batches(SplitFilter(splits), batch_format="pyarrow")
    decoder = Decoder(audio_sample_rate=audio_sample_rate, image_mode=image_mode, on_error=on_error)
    return dataset.map_batches(decoder, batch_format="pyarrow")


def ray_collate_fn(
    modalities: Sequence[str] | None = None, audio_dtype: AudioDtype = "float32"
) -> Any:
    """A collate function for ``iter_torch_batches(collate_fn=...)`` giving jin-data batches.

    ``audio_dtype="int16"`` gives audio as 16-bit PCM, as `jin_data.collate.build_batch` does.
    """
    from ray.data.collate_fn import ArrowBatchCollateFn

    class _JinCollate(ArrowBatchCollateFn):
        def __init__(self, chosen: Sequence[str] | None) -> None:
            super().__init__()
            self.modalities = None if chosen is None else list(chosen)

        def __call__(self, batch: pa.Table) -> dict[str, Any]:
            return collate(batch, self.modalities, audio_dtype)

    return _JinCollate(modalities)


RayCollateFn = ray_collate_fn
