"""Stream a jin-data set from any fsspec URL as collated batches: a torch ``IterableDataset``.

An epoch is planned from the manifest as a list of row groups (the unit of I/O and of sharding).
With ``shuffle``, the shard order and the row-group order inside each shard are permuted by
``(seed, epoch)`` (the same on every rank), then row group ``i`` goes to consumer
``i % (world_size * num_workers)``, consumer ``rank * num_workers + worker``. Every row is read by
exactly one consumer per epoch, and neighbouring row groups of one consumer mostly share a shard, so
a file is opened once and its row groups are read in turn. Each consumer then mixes rows through a
shuffle buffer seeded by ``(seed, epoch, consumer)``: the same seed and epoch give the same batches.

The dataset yields whole batches (decoding and collation are vectorised over a batch), so wrap it
as ``DataLoader(dataset, batch_size=None, num_workers=...)`` or call `ShardDataset.dataloader`.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from pydantic import Field, field_validator, model_validator
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from jin_data._config import StrictConfig
from jin_data.collate import collate
from jin_data.decode import Decoder, OnError
from jin_data.errors import DataError, ShardError
from jin_data.manifest import load_manifest
from jin_data.schema import MODALITIES, check_schema

__all__ = ["EpochReport", "LoaderConfig", "ShardDataset", "list_shards"]

logger = logging.getLogger("jin_data")
_MAX_REPORTED_ERRORS = 20


class LoaderConfig(StrictConfig):
    """Everything that decides which rows a consumer reads, in which order, decoded how."""

    batch_size: int = Field(ge=1)
    shuffle: bool = True
    seed: int = 0
    shuffle_buffer: int = Field(default=1024, ge=0, description="rows held back for mixing")
    drop_last: bool = False
    rank: int = Field(default=0, ge=0)
    world_size: int = Field(default=1, ge=1)
    on_error: OnError = "raise"
    modalities: list[str] | None = None
    split: list[str] | None = None
    audio_sample_rate: int = Field(default=16000, ge=1)
    image_mode: Literal["L", "RGB"] | None = None

    @field_validator("modalities")
    @classmethod
    def _known_modalities(cls, value: list[str] | None) -> list[str] | None:
        unknown = sorted(set(value or []) - set(MODALITIES))
        if unknown:
            raise ValueError(f"modalities: unknown {unknown}; expected a subset of {MODALITIES}")
        return value

    @model_validator(mode="after")
    def _rank_in_world(self) -> LoaderConfig:
        if self.rank >= self.world_size:
            raise ValueError(f"rank: expected < world_size={self.world_size}, got {self.rank}")
        return self


@dataclass
class EpochReport:
    """What one consumer (rank, worker) read in one epoch; ``skipped_rows`` is never silent."""

    epoch: int
    rank: int
    worker: int
    rows: int = 0
    skipped_rows: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Shard:
    url: str
    path: str
    row_groups: tuple[int, ...]
    num_rows: int


def list_shards(url: str) -> tuple[fsspec.AbstractFileSystem, list[_Shard]]:
    """The shards of the data set at ``url``: from its manifest, else ``*.parquet`` footers.

    ``url`` may also name a single Parquet file.
    """
    fs, root = fsspec.core.url_to_fs(url)
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol

    def full(path: str) -> str:
        return path if protocol in ("file", "local") else f"{protocol}://{path.lstrip('/')}"

    if fs.isfile(root):
        paths = [root]
    else:
        manifest = load_manifest(fs, root)
        if manifest is not None:
            shards = []
            for s in manifest.shards:
                path = posixpath.join(root, s.path)
                shards.append(_Shard(full(path), path, tuple(s.row_groups), s.num_rows))
            return fs, shards
        paths = sorted(fs.glob(posixpath.join(root, "*.parquet")))
        if not paths:
            raise FileNotFoundError(f"no manifest.json and no *.parquet files under {url!r}")
    shards = []
    for path in paths:
        try:
            with fs.open(path, "rb") as f:
                metadata = pq.ParquetFile(f).metadata
        except (OSError, pa.ArrowException) as err:
            raise ShardError(f"cannot read the Parquet footer: {err}", url=full(path)) from None
        sizes = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
        shards.append(_Shard(full(path), path, sizes, metadata.num_rows))
    return fs, shards


def _gather(pool: list[pa.Table | None], rows: np.ndarray) -> pa.Table:
    """The ``(slot, row)`` rows of the pooled row groups, as one table in the order given."""
    slots = np.unique(rows[:, 0])
    if len(slots) == 1:
        table = pool[slots[0]]
        assert table is not None
        return table.take(rows[:, 1])
    parts, placed = [], []
    for slot in slots:
        table = pool[slot]
        assert table is not None
        mine = np.flatnonzero(rows[:, 0] == slot)
        parts.append(table.take(rows[mine, 1]))
        placed.append(mine)
    # Grouped by row group above; one take of this small batch restores the shuffled order.
    return pa.concat_tables(parts).combine_chunks().take(np.argsort(np.concatenate(placed)))


class ShardDataset(IterableDataset):
    """Batches of collated tensors streamed from the jin-data set at ``url``.

    Keyword arguments are those of `LoaderConfig`. ``rank``/``world_size`` default to the
    initialised ``torch.distributed`` group, else 0/1. ``split`` keeps only rows of that split (a
    name or a list). ``modalities`` reads only those columns. ``on_error="skip"`` drops and
    counts unreadable shards, row groups and rows; each consumer logs the count when its epoch
    ends and keeps it in ``last_report`` (in-process loading).

    Call `set_epoch` before each epoch, as with ``DistributedSampler``. Use non-persistent
    workers (the default) so the workers see the new epoch.
    """

    def __init__(
        self,
        url: str,
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        split: str | Sequence[str] | None = None,
        modalities: Sequence[str] | None = None,
        on_error: OnError = "raise",
        **options: Any,
    ) -> None:
        super().__init__()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.config = LoaderConfig(
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            rank=rank if rank is not None else (torch.distributed.get_rank() if distributed else 0),
            world_size=world_size
            if world_size is not None
            else (torch.distributed.get_world_size() if distributed else 1),
            split=[split] if isinstance(split, str) else split,
            modalities=modalities,
            on_error=on_error,
            **options,
        )
        self.url = url
        self.epoch = epoch
        self.fs, self.shards = list_shards(url)
        self.last_report: EpochReport | None = None

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration follows."""
        self.epoch = epoch

    @property
    def columns(self) -> list[str]:
        """The stored columns read: bookkeeping plus the selected modalities."""
        return ["id", "split", "label", *(self.config.modalities or MODALITIES)]

    def plan(self, epoch: int) -> list[tuple[int, int]]:
        """Every ``(shard, row_group)`` of the data set, in the epoch's order (all consumers)."""
        shard_order = np.arange(len(self.shards))
        rng = np.random.default_rng([self.config.seed, epoch])
        if self.config.shuffle:
            shard_order = rng.permutation(shard_order)
        units = []
        for s in shard_order:
            groups = np.arange(len(self.shards[s].row_groups))
            if self.config.shuffle:
                groups = rng.permutation(groups)
            units.extend((int(s), int(g)) for g in groups)
        return units

    def _consumer(self) -> tuple[int, int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.config.rank * workers + worker, self.config.world_size * workers, worker

    def _fail(self, error: DataError, report: EpochReport, rows: int) -> None:
        if self.config.on_error == "raise":
            raise error
        report.skipped_rows += rows
        if len(report.errors) < _MAX_REPORTED_ERRORS:
            report.errors.append(str(error))

    def _row_groups(self, units: list[tuple[int, int]], report: EpochReport) -> Iterator[pa.Table]:
        """Read this consumer's row groups, with provenance columns, split-filtered."""
        opened: tuple[int, pq.ParquetFile | None] = (-1, None)
        for s, g in units:
            shard = self.shards[s]
            expected = shard.row_groups[g]
            if opened[0] != s:
                opened = (s, self._open(shard, report))
            parquet = opened[1]
            if parquet is None:  # unreadable shard, already reported once by _open
                report.skipped_rows += expected
                continue
            try:
                table = parquet.read_row_group(g, columns=self.columns)
            except (OSError, pa.ArrowException) as err:
                error = ShardError(f"cannot read row group: {err}", url=shard.url, row_group=g)
                self._fail(error, report, expected)
                continue
            n = table.num_rows
            table = table.append_column(
                "__url", pa.DictionaryArray.from_arrays(np.zeros(n, np.int32), [shard.url])
            )
            table = table.append_column("__row_group", pa.array(np.full(n, g, np.int32)))
            table = table.append_column("__row", pa.array(np.arange(n, dtype=np.int32)))
            if self.config.split is not None:
                table = table.filter(pc.is_in(table["split"], pa.array(self.config.split)))
            yield table

    def _open(self, shard: _Shard, report: EpochReport) -> pq.ParquetFile | None:
        try:
            # Page checksums (written by `ShardWriter`) turn silent bit rot into a read error.
            parquet = pq.ParquetFile(
                self.fs.open(shard.path, "rb"), page_checksum_verification=True
            )
            check_schema(parquet.schema_arrow, shard.url)
            if parquet.metadata.num_rows != shard.num_rows:
                raise ShardError(
                    f"rows: manifest says {shard.num_rows}, file has {parquet.metadata.num_rows}",
                    url=shard.url,
                )
            return parquet
        except DataError as err:
            self._fail(err, report, 0)
        except (OSError, pa.ArrowException) as err:
            self._fail(ShardError(f"cannot open shard: {err}", url=shard.url), report, 0)
        return None

    def _batches(self, tables: Iterator[pa.Table], rng: np.random.Generator) -> Iterator[pa.Table]:
        """Cut row groups into batches; with shuffle, mix rows through the shuffle buffer."""
        size = self.config.batch_size
        if not self.config.shuffle:
            pending: pa.Table | None = None
            for table in tables:
                pending = table if pending is None else pa.concat_tables([pending, table])
                ready = pending.num_rows // size * size
                for start in range(0, ready, size):
                    yield pending.slice(start, size)
                pending = pending.slice(ready)
            yield from self._tail(pending, size)
            return
        # The buffer is a pool of row groups plus the (slot, row) pairs not yet emitted; rows are
        # copied only when they leave in a batch (Arrow's take on a many-chunk table would first
        # concatenate every chunk, so each batch takes from each row group separately).
        reserve = self.config.shuffle_buffer
        pool: list[pa.Table | None] = []
        pending_rows = np.zeros((0, 2), np.int64)
        for table in tables:
            slot = np.full(table.num_rows, len(pool))
            pool.append(table)
            rows = np.stack([slot, np.arange(table.num_rows)], axis=1)
            pending_rows = np.concatenate([pending_rows, rows])
            if len(pending_rows) < reserve + size:
                continue
            pending_rows = pending_rows[rng.permutation(len(pending_rows))]
            ready = (len(pending_rows) - reserve) // size * size
            for start in range(0, ready, size):
                yield _gather(pool, pending_rows[start : start + size])
            pending_rows = pending_rows[ready:]
            alive = set(np.unique(pending_rows[:, 0]).tolist())
            pool = [t if i in alive else None for i, t in enumerate(pool)]
            # A row group stays alive while any of its rows waits, so stragglers would pin many
            # row groups; once the pool is mostly emitted rows, copy the waiting ones out (each
            # row is copied at most once more, and memory stays ~2x the buffer, whatever the data).
            pooled = sum(t.num_rows for t in pool if t is not None)
            if pooled > 2 * len(pending_rows) + size:
                pool = [_gather(pool, pending_rows)]
                pending_rows = np.stack(
                    [np.zeros(len(pending_rows), np.int64), np.arange(len(pending_rows))], axis=1
                )
        pending_rows = pending_rows[rng.permutation(len(pending_rows))]
        for start in range(0, len(pending_rows), size):
            if len(pending_rows) - start >= size or not self.config.drop_last:
                yield _gather(pool, pending_rows[start : start + size])

    def _tail(self, pending: pa.Table | None, size: int) -> Iterator[pa.Table]:
        if pending is not None and pending.num_rows and not self.config.drop_last:
            yield pending

    def __iter__(self) -> Iterator[dict[str, Any]]:
        consumer, consumers, worker = self._consumer()
        epoch = self.epoch
        report = EpochReport(epoch=epoch, rank=self.config.rank, worker=worker)
        decoder = Decoder(
            audio_sample_rate=self.config.audio_sample_rate,
            image_mode=self.config.image_mode,
            on_error=self.config.on_error,
        )
        units = self.plan(epoch)[consumer::consumers]
        rng = np.random.default_rng([self.config.seed, epoch, consumer])
        for table in self._batches(self._row_groups(units, report), rng):
            decoded, errors = decoder.decode(table)
            for error in errors:
                self._fail(error, report, 1)
            if decoded.num_rows:
                report.rows += decoded.num_rows
                yield collate(decoded, self.config.modalities)
        self.last_report = report
        if report.skipped_rows:
            logger.warning(
                "jin_data: epoch %d rank %d worker %d of %r: skipped %d rows, read %d; first "
                "errors: %s",
                epoch,
                report.rank,
                worker,
                self.url,
                report.skipped_rows,
                report.rows,
                report.errors[:3],
            )

    def dataloader(self, num_workers: int = 0, **kwargs: Any) -> DataLoader:
        """A ``DataLoader`` over these ready-made batches (``batch_size=None``)."""
        return DataLoader(self, batch_size=None, num_workers=num_workers, **kwargs)
