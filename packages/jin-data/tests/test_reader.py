"""The streaming reader: exactly-once across ranks and workers, seeded order, filters, workers."""

import collections
import itertools
import shutil

import numpy as np
import pytest
import torch

from jin_data import ShardDataset


def _ids(dataset, **kwargs):
    return [i for batch in ShardDataset(dataset, **kwargs) for i in batch["id"]]


@pytest.mark.parametrize("shuffle", [True, False])
def test_union_over_ranks_and_workers_is_the_data_set_without_duplicates(dataset, samples, shuffle):
    seen = []
    for rank in range(3):
        data = ShardDataset(dataset, batch_size=4, shuffle=shuffle, seed=5, rank=rank, world_size=3)
        data.set_epoch(2)
        for batch in data.dataloader(num_workers=2):
            seen.extend(batch["id"])
    counts = collections.Counter(seen)
    assert sorted(counts) == sorted(s["id"] for s in samples)
    assert max(counts.values()) == 1


@pytest.mark.parametrize("start", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_set_epoch_reaches_persistent_workers(dataset, start):
    """Workers kept across epochs (``persistent_workers=True``) follow `set_epoch`: each epoch
    gives the batches that workers started for that epoch give, and the epochs differ."""

    def ids(loader) -> list[str]:
        return [i for batch in loader for i in batch["id"]]

    data = ShardDataset(dataset, batch_size=4, seed=3)
    kept = data.dataloader(num_workers=2, persistent_workers=True, multiprocessing_context=start)
    epochs = []
    for epoch in (0, 1, 2):
        data.set_epoch(epoch)
        epochs.append(ids(kept))
        fresh = ShardDataset(dataset, batch_size=4, seed=3, epoch=epoch)
        assert epochs[-1] == ids(fresh.dataloader(num_workers=2))
    assert epochs[0] != epochs[1] != epochs[2]
    with pytest.raises(ValueError, match="epoch: expected an integer >= 0, received -1"):
        data.set_epoch(-1)
    with pytest.raises(ValueError, match=r"epoch: expected an integer >= 0, received 1\.5"):
        ShardDataset(dataset, batch_size=4, epoch=1.5)


def test_equal_quotas_take_from_the_fullest_workers():
    from jin_data.reader import equal_quotas

    # rows per consumer (rank * workers + worker), batches of 2
    assert equal_quotas(np.array([10, 3, 7, 7]), 2, 2, 2).tolist() == [5, 1, 3, 3]
    assert equal_quotas(np.array([9, 9, 2, 2]), 2, 2, 2).tolist() == [1, 1, 1, 1]
    assert equal_quotas(np.array([9, 1, 3, 4, 8, 8]), 2, 3, 2).tolist() == [3, 0, 1, 2, 1, 2]
    assert equal_quotas(np.array([1, 9]), 2, 2, 1).tolist() == [0, 0]


@pytest.mark.parametrize(("split", "workers", "size"), [(None, 0, 4), ("train", 2, 2)])
def test_equal_batches_give_every_rank_the_same_number_of_full_batches(
    dataset, split, workers, size
):
    """The DDP contract: every rank yields as many full batches as the emptiest rank can fill;
    nothing is read twice, and in-process the rows left out are counted."""
    world = 3
    for epoch in (0, 1):
        per_rank, seen, fillable = [], [], []
        for rank in range(world):
            common = {"batch_size": size, "seed": 7, "epoch": epoch, "split": split}
            common |= {"rank": rank, "world_size": world}
            data = ShardDataset(dataset, equal_batches=True, **common)
            batches = list(data.dataloader(num_workers=workers))
            per_rank.append(len(batches))
            assert all(len(b["id"]) == size for b in batches)
            seen += [i for b in batches for i in b["id"]]
            # What this rank reads without the option: its rows, and the full batches of them.
            alone = [b["id"] for b in ShardDataset(dataset, **common).dataloader(workers)]
            fillable.append(sum(len(ids) == size for ids in alone))
            if workers == 0:
                rows = sum(len(ids) for ids in alone)
                assert data.last_report.rows == len(batches) * size
                assert data.last_report.left_out_rows == rows - len(batches) * size
        assert per_rank == [min(fillable)] * world and min(fillable) > 0
        assert len(seen) == len(set(seen))
        if split is not None:
            assert all(i in set(_ids(dataset, batch_size=4, split=split)) for i in seen)


def test_same_seed_and_epoch_same_batches_other_epoch_other_order(dataset):
    first = _ids(dataset, batch_size=7, seed=3, epoch=1)
    assert first == _ids(dataset, batch_size=7, seed=3, epoch=1)
    assert first != _ids(dataset, batch_size=7, seed=3, epoch=2)
    assert sorted(first) == sorted(_ids(dataset, batch_size=7, seed=3, epoch=2))
    assert _ids(dataset, batch_size=7, shuffle=False) == sorted(first)


def test_shuffle_mixes_rows_across_row_groups(dataset):
    order = _ids(dataset, batch_size=60, seed=0, shuffle_buffer=30)
    positions = [int(i[1:]) for i in order]
    # Row groups hold 5 consecutive ids; a window shuffle must break most adjacencies.
    adjacent = sum(abs(a - b) == 1 for a, b in itertools.pairwise(positions))
    assert adjacent < 15


def test_workers_give_the_same_rows_as_in_process(dataset):
    data = ShardDataset(dataset, batch_size=4, seed=1)
    in_process = sorted(i for b in data for i in b["id"])
    with_workers = sorted(i for b in data.dataloader(num_workers=2) for i in b["id"])
    assert in_process == with_workers


def test_split_filter_and_modality_selection(dataset, samples):
    data = ShardDataset(dataset, batch_size=8, split="val", modalities=["text", "custom"])
    batches = list(data)
    assert sorted(i for b in batches for i in b["id"]) == sorted(
        s["id"] for s in samples if s["split"] == "val"
    )
    assert set(batches[0]) == {
        "id", "split", "label", "text", "text_bytes", "text_padding_mask", "text_present",
        "custom", "custom_present",
    }  # fmt: skip
    assert all(split == "val" for b in batches for split in b["split"])
    both = _ids(dataset, batch_size=8, split=["val", "test"])
    assert len(both) == 30


def test_batch_size_and_drop_last(dataset):
    sizes = [len(b["id"]) for b in ShardDataset(dataset, batch_size=8, shuffle=False)]
    assert sizes == [8] * 7 + [4]
    data = ShardDataset(dataset, batch_size=8, shuffle=True, drop_last=True)
    assert {len(b["id"]) for b in data} == {8}


def test_reads_plain_parquet_without_manifest(dataset, samples, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    (copy / "manifest.json").unlink()
    assert sorted(_ids(str(copy), batch_size=16)) == sorted(s["id"] for s in samples)
    single = _ids(str(copy / "shard-00000.parquet"), batch_size=16, shuffle=False)
    assert single == [s["id"] for s in samples[:16]]


def test_files_that_differ_in_nullability_only_share_batches(dataset, samples, tmp_path):
    """`check_schema` compares types, not nullability: a file whose id and split are nullable (as
    another Parquet writer leaves them) reads in one batch with jin-data's own shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    mixed = tmp_path / "mixed"
    shutil.copytree(dataset, mixed)
    (mixed / "manifest.json").unlink()
    own = mixed / "shard-00001.parquet"
    table = pq.read_table(own)
    loose = pa.schema([f.with_nullable(True) for f in table.schema], metadata=table.schema.metadata)
    pq.write_table(table.cast(loose), own, row_group_size=5)
    ids = _ids(str(mixed), batch_size=60, shuffle=False)
    assert ids == [s["id"] for s in samples]


def test_memory_filesystem(samples):
    from jin_data import write_dataset

    write_dataset(samples, "memory://reader-test", rows_per_shard=20, overwrite=True)
    batch = next(iter(ShardDataset("memory://reader-test", batch_size=60, shuffle=False)))
    assert batch["id"] == [s["id"] for s in samples]
    assert isinstance(batch["custom"], torch.Tensor)


def test_bad_config_names_the_key(dataset):
    with pytest.raises(ValueError, match="rank: expected < world_size=2"):
        ShardDataset(dataset, batch_size=1, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"modalities: unknown \['smell'\]"):
        ShardDataset(dataset, batch_size=1, modalities=["smell"])
    with pytest.raises(ValueError, match="shuffle_bufer"):
        ShardDataset(dataset, batch_size=1, shuffle_bufer=3)


def test_worker_batches_equal_in_process_ones_and_share_one_buffer(dataset):
    # One worker reads every row group in the in-process order: identical batches, padding
    # included (a shared-memory batch is filled in place, never cleared by a pass of its own).
    data = ShardDataset(dataset, batch_size=8, seed=4)
    in_process = list(data)
    with_worker = list(data.dataloader(num_workers=1))
    assert len(in_process) == len(with_worker)
    for ours, theirs in zip(in_process, with_worker, strict=True):
        assert ours.keys() == theirs.keys()
        for key, value in ours.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == theirs[key].dtype and torch.equal(value, theirs[key]), key
            else:
                assert value == theirs[key], key
        tensors = [v for v in theirs.values() if isinstance(v, torch.Tensor)]
        assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1


@pytest.mark.parametrize("groups", [12, 120])
def test_shuffle_pool_is_bounded_and_rows_move_at_most_a_buffer(dataset, groups):
    import pyarrow as pa

    size, buffer, rows = 4, 30, 5
    data = ShardDataset(dataset, batch_size=size, shuffle_buffer=buffer)
    tables = [pa.table({"id": [f"{g}-{r}" for r in range(rows)]}) for g in range(groups)]
    emitted, largest = [], 0
    for pool, pairs in data._batches(iter(tables), np.random.default_rng(0)):
        largest = max(largest, sum(slot.small.num_rows for slot in pool))
        emitted.extend(pool[s].small["id"][r].as_py() for s, r in pairs.tolist())
    assert sorted(emitted) == sorted(f"{g}-{r}" for g in range(groups) for r in range(rows))
    assert largest <= 1.5 * (buffer + rows + size)
    arrival = {f"{g}-{r}": g * rows + r for g in range(groups) for r in range(rows)}
    assert max(i - arrival[row_id] for i, row_id in enumerate(emitted)) <= buffer + rows + size


@pytest.mark.parametrize(("read_ahead", "read_threads"), [(1, 1), (3, 1), (0, 3), (2, 4)])
def test_reading_ahead_gives_the_batches_of_reading_inline(dataset, read_ahead, read_threads):
    def batches(depth, threads):
        options = {"read_ahead": depth, "read_threads": threads}
        return list(ShardDataset(dataset, batch_size=6, seed=4, **options))

    inline, ahead = batches(0, 1), batches(read_ahead, read_threads)
    assert [b["id"] for b in ahead] == [b["id"] for b in inline]
    for a, b in zip(ahead, inline, strict=True):
        for key, value in b.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(a[key], value), key


def test_threaded_reads_keep_order_raise_in_place_and_stop_when_abandoned():
    import threading
    import time

    from jin_data.reader import _ordered_map

    def slow_square(i):
        time.sleep(0.001 * (7 - i % 7))  # later items often finish first
        if i == 30:
            raise ValueError("row group 30 is bad")
        return i * i

    results = _ordered_map(slow_square, range(40), 4, 2)
    assert [next(results) for _ in range(30)] == [i * i for i in range(30)]
    with pytest.raises(ValueError, match="row group 30 is bad"):
        next(results)

    started = []

    def record(i):
        started.append(i)
        return i

    results = _ordered_map(record, itertools.count(), 3, 2)
    assert [next(results) for _ in range(4)] == [0, 1, 2, 3]
    results.close()
    assert not any(t.name.startswith("jin-data-read_") for t in threading.enumerate())
    assert len(started) <= 4 + 3 + 2  # at most threads + depth ahead of the consumer


def test_read_ahead_keeps_order_raises_in_place_and_stops_when_abandoned():
    import threading

    from jin_data.reader import _read_ahead

    assert list(_read_ahead(iter(range(50)), 2)) == list(range(50))

    def failing():
        yield from range(3)
        raise ValueError("row group 3 is bad")

    reader = _read_ahead(failing(), 2)
    assert [next(reader) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="row group 3 is bad"):
        next(reader)

    produced = []

    def endless():
        for i in itertools.count():
            produced.append(i)
            yield i

    reader = _read_ahead(endless(), 2)
    assert [next(reader) for _ in range(3)] == [0, 1, 2]
    reader.close()  # what a consumer's break or garbage collection does
    assert not any(t.name == "jin-data-read-ahead" for t in threading.enumerate())
    assert len(produced) <= 3 + 2 + 1  # at most the queue's depth (and one in hand) ahead
