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

import itertools
import logging
import posixpath
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from pydantic import Field, field_validator, model_validator
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from jin_data._arrow import bool_array, numeric_array, string_array
from jin_data._config import StrictConfig
from jin_data.collate import build_batch
from jin_data.decode import AudioDtype, Decoder, OnError, load_lazy_modules, media_views
from jin_data.errors import DataError, SchemaError, ShardError
from jin_data.manifest import load_manifest
from jin_data.schema import META_CUSTOM_DIM, META_POINT_FEATURES, MODALITIES, check_schema

__all__ = [
    "EpochReport",
    "LoaderConfig",
    "ShardDataset",
    "list_shards",
    "open_shard",
    "read_row_group",
    "split_rows",
]

logger = logging.getLogger("jin_data")
_MAX_REPORTED_ERRORS = 20
# Guards the counts of an `EpochReport`, which the read-ahead thread and the decoding thread both
# add to (module-level: a dataset is pickled into DataLoader workers, a lock could not be).
_REPORT_LOCK = threading.Lock()
_T = TypeVar("_T")
_R = TypeVar("_R")


class LoaderConfig(StrictConfig):
    """Everything that decides which rows a consumer reads, in which order, decoded how."""

    batch_size: int = Field(ge=1)
    shuffle: bool = True
    seed: int = Field(default=0, ge=0)
    shuffle_buffer: int = Field(default=1024, ge=0, description="rows held back for mixing")
    drop_last: bool = False
    rank: int = Field(default=0, ge=0)
    world_size: int = Field(default=1, ge=1)
    on_error: OnError = "raise"
    modalities: list[str] | None = None
    split: list[str] | None = None
    audio_sample_rate: int = Field(default=16000, ge=1)
    audio_dtype: AudioDtype = "float32"
    image_mode: Literal["L", "RGB"] | None = None
    equal_batches: bool = Field(
        default=False,
        description="every rank yields the same number of full batches per epoch, as "
        "DistributedDataParallel needs: the most that every rank can fill; rows beyond a "
        "consumer's quota are left out of the epoch and counted",
    )
    read_ahead: int = Field(
        default=2,
        ge=0,
        description="row groups read ahead on a background thread while the current ones are "
        "decoded (Arrow reads without the GIL); 0 reads them inline",
    )
    read_threads: int = Field(
        default=1,
        ge=1,
        description="row groups fetched at once, each on its own thread and file handle, in "
        "order: for remote storage, where a request's latency rather than the CPU bounds a "
        "consumer; up to read_threads + read_ahead are read ahead of the one being decoded",
    )

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
    # equal_batches: rows read past this consumer's quota of batches (not yielded this epoch), and
    # batches yielded again because skipped rows left it short of its quota.
    left_out_rows: int = 0
    repeated_batches: int = 0


@dataclass(frozen=True)
class _Shard:
    url: str
    path: str
    row_groups: tuple[int, ...]
    num_rows: int
    # C and F of the data set (the manifest's, else the first shard's): every shard must match.
    point_features: int = 0
    custom_dim: int = 0


def _sizes(metadata: Any) -> tuple[int, ...]:
    """Rows of each row group of a Parquet footer, in file order."""
    return tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))


def _declared(metadata: Any) -> tuple[int, int]:
    """(C, F) as a footer's key-value metadata declares them (0 where absent or unreadable:
    `open_shard` checks the schema itself and names what is wrong)."""
    values = metadata.metadata or {}
    sizes = []
    for key in (META_POINT_FEATURES, META_CUSTOM_DIM):
        try:
            sizes.append(int(values.get(key, b"0")))
        except ValueError:
            sizes.append(0)
    return sizes[0], sizes[1]


def list_shards(
    url: str, on_error: OnError = "raise"
) -> tuple[fsspec.AbstractFileSystem, list[_Shard]]:
    """The shards of the data set at ``url``: from its manifest, else ``*.parquet`` footers.

    ``url`` may also name a single Parquet file. Without a manifest, a file whose footer does not
    read raises `ShardError`, or with ``on_error="skip"`` is logged and left out (its row count is
    unknown: the footer holds it); `ShardError` if none is left. Every shard must declare the point
    features C and the custom width F of the first (or of the manifest): a file that declares
    others raises `SchemaError`, or with ``on_error="skip"`` is logged and left out.
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
                shards.append(
                    _Shard(
                        full(path),
                        path,
                        tuple(s.row_groups),
                        s.num_rows,
                        manifest.point_features,
                        manifest.custom_dim,
                    )
                )
            return fs, shards
        paths = sorted(fs.glob(posixpath.join(root, "*.parquet")))
        if not paths:
            raise FileNotFoundError(f"no manifest.json and no *.parquet files under {url!r}")
    shards: list[_Shard] = []
    for path in paths:
        try:
            with fs.open(path, "rb") as f:
                metadata = pq.ParquetFile(f).metadata
        except (OSError, pa.ArrowException) as err:
            error: DataError = ShardError(f"cannot read the Parquet footer: {err}", url=full(path))
            if on_error == "raise":
                raise error from None
            logger.warning(
                "jin_data: skipped %d rows known (no manifest counts this shard's): %s", 0, error
            )
            continue
        shard = _Shard(full(path), path, _sizes(metadata), metadata.num_rows, *_declared(metadata))
        if shards and (shard.point_features, shard.custom_dim) != (
            shards[0].point_features,
            shards[0].custom_dim,
        ):
            first = shards[0]
            column = "points" if shard.point_features != first.point_features else "custom"
            error = SchemaError(
                f"declares point_features={shard.point_features} custom_dim={shard.custom_dim}, "
                f"but {first.url!r} declares point_features={first.point_features} "
                f"custom_dim={first.custom_dim}: one data set has one C and one F",
                url=shard.url,
                column=column,
            )
            if on_error == "raise":
                raise error
            logger.warning("jin_data: skipped %d rows: %s", shard.num_rows, error)
            continue
        shards.append(shard)
    if not shards:
        raise ShardError(f"on_error='skip' left no readable shard of {url!r}", url=url)
    return fs, shards


@dataclass
class _Slot:
    """A row group in a consumer's shuffle pool: its small columns, and its media as row views.

    ``small`` is the row group without the encoded media columns; ``images`` and ``audio`` are
    per-row views of the stored bytes (`jin_data.decode.media_views`), which keep those buffers
    alive. A batch takes its small columns with Arrow and decodes its media from the views, so the
    stored image and audio bytes are never copied.
    """

    small: pa.Table
    images: list[Any] | None
    audio: list[Any] | None

    @classmethod
    def of(cls, table: pa.Table) -> _Slot:
        media = [c for c in ("image", "audio") if c in table.column_names]
        return cls(table.drop_columns(media), *media_views(table))


def open_shard(fs: fsspec.AbstractFileSystem, shard: _Shard) -> pq.ParquetFile:
    """Open a shard checking its schema and row count; `ShardError`/`SchemaError` name it."""
    try:
        # Page checksums (written by `ShardWriter`) turn silent bit rot into a read error;
        # pre_buffer coalesces a row group's column reads into few ranged requests (remote stores).
        parquet = pq.ParquetFile(
            fs.open(shard.path, "rb"), page_checksum_verification=True, pre_buffer=True
        )
        info = check_schema(parquet.schema_arrow, shard.url)
    except (OSError, pa.ArrowException) as err:
        raise ShardError(f"cannot open shard: {err}", url=shard.url) from None
    if parquet.metadata.num_rows != shard.num_rows:
        raise ShardError(
            f"rows: manifest says {shard.num_rows}, file has {parquet.metadata.num_rows}",
            url=shard.url,
        )
    sizes = _sizes(parquet.metadata)
    if sizes != shard.row_groups:
        # Reading the manifest's row groups from this file would leave rows out (or fail).
        raise ShardError(
            f"row groups: manifest says {list(shard.row_groups)} rows, file has {list(sizes)}",
            url=shard.url,
        )
    for column, key, declared, expected in (
        ("points", "point_features", info.point_features, shard.point_features),
        ("custom", "custom_dim", info.custom_dim, shard.custom_dim),
    ):
        if declared != expected:
            raise SchemaError(
                f"{key}: the data set has {expected}, this file declares {declared}",
                url=shard.url,
                column=column,
            )
    return parquet


def read_row_group(
    parquet: pq.ParquetFile,
    shard: _Shard,
    row_group: int,
    columns: list[str],
    split: Sequence[str] | None,
) -> pa.Table:
    """One row group's ``columns``, rows of ``split`` only (all if ``None``), with the provenance
    columns that errors quote (``__url``, ``__row_group``, ``__row``); `ShardError` if unreadable.
    """
    try:
        # One thread: every consumer is a process of its own already, and Arrow's pool threads
        # kept ~40 MB more per worker (memory freed across threads is retained longer).
        table = parquet.read_row_group(row_group, columns=columns, use_threads=False)
    except (OSError, pa.ArrowException) as err:
        raise ShardError(
            f"cannot read row group: {err}", url=shard.url, row_group=row_group
        ) from None
    n = table.num_rows
    table = table.append_column(
        "__url",
        pa.DictionaryArray.from_arrays(
            numeric_array(np.zeros(n, np.int32)), string_array([shard.url])
        ),
    )
    table = table.append_column("__row_group", numeric_array(np.full(n, row_group, np.int32)))
    table = table.append_column("__row", numeric_array(np.arange(n, dtype=np.int32)))
    if split is not None:
        table = table.filter(pc.is_in(table["split"], value_set=string_array(list(split))))
    return table


def split_rows(
    fs: fsspec.AbstractFileSystem, shard: _Shard, row_group: int, split: Sequence[str] | None
) -> int:
    """Rows of ``split`` (all if ``None``) in one row group of ``shard``, to count it skipped.

    Read from its ``split`` column alone, which often reads where the row group as a whole did
    not (a corrupt page of another column, a file declaring another C or F). Where that column
    does not read either, or the file's row group is not the manifest's, all its rows.
    """
    rows = shard.row_groups[row_group]
    if split is None:
        return rows
    try:
        with fs.open(shard.path, "rb") as f:
            parquet = pq.ParquetFile(f, page_checksum_verification=True)
            table = parquet.read_row_group(row_group, columns=["split"], use_threads=False)
            if "split" not in table.column_names or table.num_rows != rows:
                return rows
            kept = pc.is_in(table["split"], value_set=string_array(list(split)))
            return int(pc.sum(kept.cast(pa.int64())).as_py() or 0)
    except (OSError, pa.ArrowException):
        return rows


def _gather(tables: list[pa.Table], rows: np.ndarray) -> pa.Table:
    """The ``(slot, row)`` rows of ``tables``, as one table in the order given."""
    slots = np.unique(rows[:, 0])
    if len(slots) == 1:
        return tables[slots[0]].take(numeric_array(rows[:, 1]))
    parts, placed = [], []
    for slot in slots:
        mine = np.flatnonzero(rows[:, 0] == slot)
        parts.append(tables[slot].take(numeric_array(rows[mine, 1])))
        placed.append(mine)
    # Grouped by row group above; one take of this small batch restores the shuffled order.
    # "default" promotion: files of one data set may differ in nullability (`check_schema`
    # compares types only; another writer may leave id and split nullable).
    order = np.argsort(np.concatenate(placed))
    parts = pa.concat_tables(parts, promote_options="default")
    return parts.combine_chunks().take(numeric_array(order))


def _read_ahead(items: Iterator[_T], depth: int) -> Iterator[_T]:
    """``items``, produced on a background thread up to ``depth`` ahead of the consumer.

    An exception raised producing an item is raised here, in its place. When the consumer stops
    early (``break``, an error, garbage collection), the thread is told to stop and joined.
    ``depth=0``: ``items`` itself, produced inline.
    """
    if depth == 0:
        yield from items
        return
    slots: queue.Queue[tuple[bool, Any]] = queue.Queue(depth)
    stop = threading.Event()

    def offer(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((True, item)):
                    return
            offer((False, None))
        except BaseException as error:  # raised again in the consumer
            offer((False, error))

    thread = threading.Thread(target=produce, name="jin-data-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            more, value = slots.get()
            if not more:
                if value is not None:
                    raise value
                return
            yield value
    finally:
        stop.set()
        thread.join()


def equal_quotas(rows: np.ndarray, batch_size: int, world_size: int, workers: int) -> np.ndarray:
    """Full batches each consumer yields so that every rank yields the same number.

    ``rows`` holds the rows of each consumer (``rank * workers + worker``). A rank's total is the
    least any rank can fill with full batches; a rank with more gives up batches from its
    fullest workers first (lowest worker first among equals), so the rows left out spread over
    its workers.
    """
    full = (np.asarray(rows, np.int64) // batch_size).reshape(world_size, workers)
    target = int(full.sum(axis=1).min())
    for rank in range(world_size):
        for _ in range(int(full[rank].sum()) - target):
            full[rank, int(np.argmax(full[rank]))] -= 1
    return full.reshape(-1)


def _ordered_map(
    function: Callable[[_T], _R], items: Iterable[_T], threads: int, depth: int
) -> Iterator[_R]:
    """``map(function, items)`` on ``threads`` threads, yielded in the order of ``items``, with at
    most ``threads + depth`` items in flight.

    An exception raised computing an item is raised here, in its place. When the consumer stops
    early, the items not started are cancelled and the threads joined.
    """
    pool = ThreadPoolExecutor(threads, thread_name_prefix="jin-data-read")
    pending: deque[Future[_R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= threads + depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True)


class ShardDataset(IterableDataset):
    """Batches of collated tensors streamed from the jin-data set at ``url``.

    Keyword arguments are those of `LoaderConfig`. ``rank``/``world_size`` default to the
    initialised ``torch.distributed`` group, else 0/1. ``split`` keeps only rows of that split (a
    name or a list). ``modalities`` reads only those columns. ``on_error="skip"`` drops and
    counts unreadable shards, row groups and rows; each consumer logs the count when its epoch
    ends and keeps it in ``last_report`` (in-process loading).

    Call `set_epoch` before each epoch, as with ``DistributedSampler``. The epoch lives in shared
    memory, so DataLoader workers see it too, persistent ones (``persistent_workers=True``, which
    are not started again every epoch) included.
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
        # One int64 in shared memory: DataLoader workers, forked or spawned, map the same one, so
        # `set_epoch` in the main process reaches workers that persist across epochs.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.epoch = epoch
        self.fs, self.shards = list_shards(url, on_error)
        self.last_report: EpochReport | None = None
        self._split_counts: list[tuple[int, ...]] | None = None
        if self.config.equal_batches:
            self._split_rows()  # read here, once, rather than in every worker
        load_lazy_modules()  # here, before the DataLoader forks its workers

    @property
    def epoch(self) -> int:
        """The epoch whose order the next iteration follows."""
        return int(self._epoch)

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch: expected an integer >= 0, received {epoch!r}")
        self._epoch.fill_(int(epoch))

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration follows (in every worker as well)."""
        self.epoch = epoch

    @property
    def columns(self) -> list[str]:
        """The stored columns read: bookkeeping plus the selected modalities."""
        return ["id", "split", "label", *self.modalities]

    @property
    def modalities(self) -> list[str]:
        """The modalities read: the configured ones (an empty list reads none), else all."""
        chosen = self.config.modalities
        return list(MODALITIES) if chosen is None else list(chosen)

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
        with _REPORT_LOCK:
            report.skipped_rows += rows
            if len(report.errors) < _MAX_REPORTED_ERRORS:
                report.errors.append(str(error))

    def _row_groups(self, units: list[tuple[int, int]], report: EpochReport) -> Iterator[pa.Table]:
        """Read this consumer's row groups, with provenance columns, split-filtered, in order.

        With ``read_threads > 1`` they are fetched on that many threads, each with its own handle
        of the shard it last read; the tables, errors and counts are those of one thread. A shard
        that does not open is reported once; its row groups raise its error, or are counted as
        skipped.
        """
        local = threading.local()
        failed: dict[int, DataError] = {}
        lock = threading.Lock()

        def handle(s: int) -> pq.ParquetFile | None:
            cached = getattr(local, "shard", None)
            if cached is not None and cached[0] == s:
                return cached[1]
            with lock:
                error = failed.get(s)
            if error is None:
                try:
                    parquet = open_shard(self.fs, self.shards[s])
                except DataError as err:
                    with lock:
                        first = s not in failed
                        error = failed.setdefault(s, err)
                    if first:
                        self._fail(err, report, 0)
                else:
                    local.shard = (s, parquet)
                    return parquet
            if self.config.on_error == "raise":  # whichever of its row groups comes first
                raise error
            return None

        def read(unit: tuple[int, int]) -> pa.Table | None:
            s, g = unit
            shard = self.shards[s]
            parquet = handle(s)
            if parquet is None:  # unreadable shard
                with _REPORT_LOCK:
                    report.skipped_rows += self._lost_rows(s, g)
                return None
            try:
                return read_row_group(parquet, shard, g, self.columns, self.config.split)
            except ShardError as err:
                self._fail(err, report, self._lost_rows(s, g))
                return None

        threads, depth = self.config.read_threads, self.config.read_ahead
        tables = _ordered_map(read, units, threads, depth) if threads > 1 else map(read, units)
        for table in tables:
            if table is not None:
                yield table

    def _batches(
        self, tables: Iterator[pa.Table], rng: np.random.Generator
    ) -> Iterator[tuple[list[_Slot], np.ndarray]]:
        """Cut row groups into batches: ``(slot, row)`` pairs into a pool of row groups.

        With shuffle, each arriving row gets a random deadline, its arrival position plus a
        uniform draw in ``[0, shuffle_buffer)``; the rows waiting are kept in deadline order and,
        once more than ``shuffle_buffer`` wait, batches leave from the front. A row therefore
        moves at most about a buffer's length, every row group leaves the pool within about a
        buffer's worth of rows, and the pool stays under ~1.5x (buffer + row group) rows with no
        row ever copied (a classic shuffle buffer lets a few stragglers pin whole row groups
        indefinitely). Without shuffle the deadline is the arrival position and nothing waits.
        """
        size, shuffle = self.config.batch_size, self.config.shuffle
        reserve = self.config.shuffle_buffer if shuffle else 0
        pool: list[_Slot] = []
        pending = np.zeros((0, 2), np.int64)  # (slot, row), in deadline order
        deadlines = np.zeros(0)
        arrived = 0
        for table in tables:
            n = table.num_rows
            pool.append(_Slot.of(table))
            due = arrived + np.arange(n) + (rng.uniform(0, reserve, n) if shuffle else 0)
            arrived += n
            order = np.argsort(np.concatenate([deadlines, due]), kind="stable")
            deadlines = np.concatenate([deadlines, due])[order]
            pending = np.concatenate(
                [pending, np.stack([np.full(n, len(pool) - 1), np.arange(n)], 1)]
            )
            pending = pending[order]
            if len(pending) < reserve + size:
                continue
            ready = (len(pending) - reserve) // size * size
            for start in range(0, ready, size):
                yield pool, pending[start : start + size]
            pending, deadlines = pending[ready:], deadlines[ready:]
            # Free the row groups that have no row left; renumber the rest, so the pool's size
            # does not depend on how many row groups were read.
            live = np.unique(pending[:, 0])
            renumber = np.zeros(len(pool), np.int64)
            renumber[live] = np.arange(len(live))
            pool = [pool[i] for i in live]
            pending = np.stack([renumber[pending[:, 0]], pending[:, 1]], axis=1)
        for start in range(0, len(pending), size):
            if len(pending) - start >= size or not self.config.drop_last:
                yield pool, pending[start : start + size]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        consumer, consumers, worker = self._consumer()
        epoch = self.epoch
        report = EpochReport(epoch=epoch, rank=self.config.rank, worker=worker)
        plan = self.plan(epoch)
        units = plan[consumer::consumers]
        batches = self._epoch_batches(units, epoch, consumer, report)
        if self.config.equal_batches:
            rows = [self._rows_of(plan[c::consumers]) for c in range(consumers)]
            workers = consumers // self.config.world_size
            quota = int(
                equal_quotas(
                    np.array(rows), self.config.batch_size, self.config.world_size, workers
                )[consumer]
            )
            if quota == 0:
                logger.warning(
                    "jin_data: epoch %d of %r: equal_batches: some rank cannot fill one batch of "
                    "%d rows, so every rank's epoch is empty",
                    epoch,
                    self.url,
                    self.config.batch_size,
                )
            yield from self._quota(batches, quota, rows[consumer], report)
        else:
            yield from batches
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

    def _epoch_batches(
        self, units: list[tuple[int, int]], epoch: int, consumer: int, report: EpochReport
    ) -> Iterator[dict[str, Any]]:
        """This consumer's batches of the epoch: read, shuffled, decoded and collated."""
        decoder = Decoder(
            audio_sample_rate=self.config.audio_sample_rate,
            image_mode=self.config.image_mode,
            on_error=self.config.on_error,
            audio_dtype=self.config.audio_dtype,
        )
        modalities = self.modalities
        # In a DataLoader worker the batch is built in shared memory (see `build_batch`).
        shared = get_worker_info() is not None
        rng = np.random.default_rng([self.config.seed, epoch, consumer])
        tables = self._row_groups(units, report)
        if self.config.read_threads == 1:
            tables = _read_ahead(tables, self.config.read_ahead)
        try:
            for pool, rows in self._batches(tables, rng):
                table = _gather([slot.small for slot in pool], rows)
                pairs = rows.tolist()
                images = [pool[s].images[r] for s, r in pairs] if "image" in modalities else None
                audio = [pool[s].audio[r] for s, r in pairs] if "audio" in modalities else None
                media = decoder.decode_media(table, images, audio)
                for error in media.errors:  # raises the first under on_error="raise"
                    self._fail(error, report, 0)
                if media.errors:  # a row with several bad columns is one row skipped
                    with _REPORT_LOCK:
                        report.skipped_rows += int((~media.keep).sum())
                pixels, waves = media.images, media.waves
                if not media.keep.all():
                    table = table.filter(bool_array(media.keep))
                    kept = np.flatnonzero(media.keep)
                    pixels = None if pixels is None else [pixels[i] for i in kept]
                    waves = None if waves is None else [waves[i] for i in kept]
                if table.num_rows:
                    report.rows += table.num_rows
                    yield build_batch(
                        table,
                        modalities,
                        images=pixels,
                        waves=waves,
                        audio_dtype=self.config.audio_dtype,
                        shared=shared,
                    )
        finally:
            tables.close()  # stops and joins the read-ahead thread when the epoch ends early

    def _lost_rows(self, shard: int, row_group: int) -> int:
        """Rows a skipped row group counts: those of this reader's split, as `_split_rows`
        counted them (``equal_batches``: the quota's left-out rows are the rest), else as
        `split_rows` counts them."""
        if self._split_counts is not None:
            return self._split_counts[shard][row_group]
        return split_rows(self.fs, self.shards[shard], row_group, self.config.split)

    def _rows_of(self, units: list[tuple[int, int]]) -> int:
        """Rows that ``units`` hold of this reader's split (read once, see `_split_rows`)."""
        counts = self._split_rows()
        return sum(counts[s][g] for s, g in units)

    def _split_rows(self) -> list[tuple[int, ...]]:
        """Rows of each row group, by shard, counting only this reader's split.

        From the manifest without a split filter; with one, the ``split`` column of every row
        group is read once per dataset object. A shard or row group that does not read raises, or
        under ``on_error="skip"`` counts what `split_rows` finds (it is skipped when read, too, and
        counted so: `_lost_rows`).
        """
        if self.config.split is None:
            return [shard.row_groups for shard in self.shards]
        if self._split_counts is None:
            counts = []
            for shard in self.shards:
                rows = list(shard.row_groups)
                try:
                    parquet = open_shard(self.fs, shard)
                    for g in range(len(shard.row_groups)):
                        try:
                            split = read_row_group(parquet, shard, g, ["split"], self.config.split)
                            rows[g] = split.num_rows
                        except ShardError:
                            if self.config.on_error == "raise":
                                raise
                except DataError:
                    if self.config.on_error == "raise":
                        raise
                    rows = [
                        split_rows(self.fs, shard, g, self.config.split)
                        for g in range(len(shard.row_groups))
                    ]
                counts.append(tuple(rows))
            self._split_counts = counts
        return self._split_counts

    def _quota(
        self,
        batches: Iterator[dict[str, Any]],
        quota: int,
        expected_rows: int,
        report: EpochReport,
    ) -> Iterator[dict[str, Any]]:
        """Exactly ``quota`` batches of ``batches`` (`equal_batches`): the rest of the epoch is
        left out and counted; a consumer that skipped rows and fell short yields its last batch
        again, counted and logged, so that the ranks stay in step."""
        last, given = None, 0
        try:
            for last in itertools.islice(batches, quota):
                given += 1
                yield last
        finally:
            batches.close()
        report.left_out_rows = max(0, expected_rows - report.rows - report.skipped_rows)
        if report.left_out_rows:
            logger.info(
                "jin_data: epoch %d rank %d worker %d of %r: equal_batches left %d rows out",
                report.epoch,
                report.rank,
                report.worker,
                self.url,
                report.left_out_rows,
            )
        if given < quota:
            if last is None:
                raise DataError(
                    f"equal_batches: rank {report.rank} worker {report.worker} read no batch "
                    f"of the {quota} it owes this epoch ({report.skipped_rows} rows skipped); "
                    "the ranks cannot stay in step",
                    url=self.url,
                )
            report.repeated_batches = quota - given
            logger.warning(
                "jin_data: epoch %d rank %d worker %d of %r: %d skipped rows left it %d batches "
                "short of its quota of %d; its last batch is given again to keep the ranks in step",
                report.epoch,
                report.rank,
                report.worker,
                self.url,
                report.skipped_rows,
                report.repeated_batches,
                quota,
            )
            for _ in range(report.repeated_batches):
                yield {
                    k: v.clone() if isinstance(v, torch.Tensor) else list(v)
                    for k, v in last.items()
                }

    def dataloader(self, num_workers: int = 0, **kwargs: Any) -> DataLoader:
        """A ``DataLoader`` over these ready-made batches (``batch_size=None``)."""
        return DataLoader(self, batch_size=None, num_workers=num_workers, **kwargs)
