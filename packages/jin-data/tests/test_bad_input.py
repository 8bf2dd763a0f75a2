"""Corrupt, truncated and foreign files and undecodable rows: named errors, or counted skips."""

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jin_data import (
    DataError,
    DecodeError,
    SchemaError,
    ShardDataset,
    ShardError,
    verify_dataset,
    write_dataset,
)
from jin_data.schema import AUDIO_TYPE, sample_schema


def _read_all(url, **kwargs):
    data = ShardDataset(url, batch_size=8, shuffle=False, **kwargs)
    return data, [i for batch in data for i in batch["id"]]


@pytest.mark.parametrize("read_threads", [1, 3])
def test_truncated_shard_names_url(dataset, read_threads):
    path = f"{dataset}/shard-00002.parquet"
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=r"url='[^']*shard-00002.parquet'.*cannot open shard"):
        _read_all(dataset, read_threads=read_threads)


@pytest.mark.parametrize("read_threads", [1, 3])
def test_truncated_shard_is_skipped_and_counted(dataset, caplog, read_threads):
    path = f"{dataset}/shard-00002.parquet"
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:-100])
    with caplog.at_level(logging.WARNING, logger="jin_data"):
        reader, ids = _read_all(dataset, on_error="skip", read_threads=read_threads)
    assert len(ids) == 44 and reader.last_report.skipped_rows == 16
    assert len(reader.last_report.errors) == 1  # the shard, once
    assert "skipped 16 rows" in caplog.text and "shard-00002.parquet" in caplog.text


def test_truncated_shard_without_a_manifest_is_named_or_skipped(dataset, caplog):
    # Without a manifest the shards are listed from their footers; a truncated file has none.
    Path(f"{dataset}/manifest.json").unlink()
    path = f"{dataset}/shard-00001.parquet"
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=r"url='[^']*shard-00001.parquet'.*Parquet footer"):
        ShardDataset(dataset, batch_size=8)
    with caplog.at_level(logging.WARNING, logger="jin_data"):
        _, ids = _read_all(dataset, on_error="skip")
    assert len(ids) == 44  # 60 samples, the 16 of shard 1 lost
    assert "no manifest counts this shard's" in caplog.text and "shard-00001.parquet" in caplog.text
    for shard in Path(dataset).glob("*.parquet"):
        shard.write_bytes(b"junk")
    with pytest.raises(ShardError, match="left no readable shard"):
        ShardDataset(dataset, batch_size=8, on_error="skip")


def _corrupt_row_group(url, shard, row_group):
    path = f"{url}/shard-{shard:05d}.parquet"
    meta = pq.ParquetFile(path).metadata.row_group(row_group)
    column = meta.column(meta.num_columns - 1)  # the custom column's data page
    data = bytearray(Path(path).read_bytes())
    middle = column.data_page_offset + column.total_compressed_size // 2
    data[middle] ^= 0xFF
    Path(path).write_bytes(bytes(data))


@pytest.mark.parametrize("read_threads", [1, 3])
def test_corrupt_page_names_url_and_row_group(dataset, read_threads):
    _corrupt_row_group(dataset, 1, 2)
    with pytest.raises(ShardError) as err:
        _read_all(dataset, read_threads=read_threads)
    assert err.value.url.endswith("shard-00001.parquet") and err.value.row_group == 2
    assert "row_group=2" in str(err.value)


@pytest.mark.parametrize("read_threads", [1, 3])
def test_corrupt_row_group_skipped_and_counted(dataset, samples, read_threads):
    _corrupt_row_group(dataset, 1, 2)
    reader, ids = _read_all(dataset, on_error="skip", read_threads=read_threads)
    lost = {s["id"] for s in samples[26:31]}  # shard 1 starts at row 16; row group 2 = rows 10..14
    assert set(ids) == {s["id"] for s in samples} - lost
    assert reader.last_report.skipped_rows == 5


@pytest.mark.parametrize("read_threads", [1, 3])
def test_under_a_split_a_skipped_row_group_or_shard_counts_its_rows_of_the_split(
    dataset, samples, read_threads
):
    """Row group 2 of shard 1 (samples 26..30) holds 2 train rows; shard 2 (32..47, declaring
    another F than the manifest) 8: only those are lost to ``split="train"``, not 5 and 16. Its
    ``split`` column reads, so it counts them (no ``equal_batches``: no count read up front)."""
    _corrupt_row_group(dataset, 1, 2)
    shard = f"{dataset}/shard-00002.parquet"
    table = pq.read_table(shard)
    metadata = {**table.schema.metadata, b"jin_data.custom_dim": b"6"}
    pq.write_table(table.replace_schema_metadata(metadata), shard, row_group_size=5)
    reader, ids = _read_all(dataset, on_error="skip", split="train", read_threads=read_threads)
    train = {s["id"] for s in samples if s["split"] == "train"}
    lost = {s["id"] for s in samples[26:31] + samples[32:48]} & train
    assert len(lost) == 10 and set(ids) == train - lost
    assert reader.last_report.skipped_rows == 10


def test_file_of_another_schema(tmp_path, dataset):
    pq.write_table(pa.table({"id": ["x"], "value": [1.0]}), f"{dataset}/shard-00001.parquet")
    with pytest.raises(SchemaError, match=r"shard-00001.parquet.*not a jin-data shard"):
        _read_all(dataset)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    pq.write_table(pa.table({"id": ["x"]}), foreign / "part.parquet")
    with pytest.raises(SchemaError, match=r"part\.parquet"):
        _read_all(str(foreign))


@pytest.fixture
def broken_rows(tmp_path):
    rows = [{"id": f"r{i}", "image": np.full((3, 3), i, np.uint8)} for i in range(12)]
    rows[7]["image"] = b"\x89PNG\r\n\x1a\nnot really a png"
    rows[9]["audio"] = b"RIFF....WAVEjunk"
    url = str(tmp_path / "broken")
    write_dataset(rows, url, row_group_size=5)
    return url


def test_undecodable_row_names_url_row_group_row_and_column(broken_rows):
    with pytest.raises(DecodeError) as err:
        _read_all(broken_rows)
    e = err.value
    assert (e.row_group, e.row, e.column, e.id) == (1, 2, "image", "r7")
    assert e.url.endswith("shard-00000.parquet") and "does not decode" in str(e)


def test_undecodable_rows_skipped_and_reported(broken_rows, caplog):
    with caplog.at_level(logging.WARNING, logger="jin_data"):
        reader, ids = _read_all(broken_rows, on_error="skip")
    assert ids == [f"r{i}" for i in range(12) if i not in (7, 9)]
    report = reader.last_report
    assert report.skipped_rows == 2 and report.rows == 10
    assert "column='image'" in report.errors[0] and "column='audio'" in report.errors[1]
    assert "skipped 2 rows, read 10" in caplog.text


def _two_rank_rows(tmp_path, broken: range):
    """16 rows in row groups of 4; rank 0 of 2 reads row groups 0 and 2, rank 1 groups 1 and 3
    (no shuffle); the rows in ``broken`` hold an image that does not decode."""
    rows = [{"id": f"r{i:02d}", "image": np.full((2, 2), i, np.uint8)} for i in range(16)]
    for i in broken:
        rows[i]["image"] = b"\x89PNG\r\n\x1a\nnot really a png"
    url = str(tmp_path / "ranks")
    write_dataset(rows, url, row_group_size=4)
    return url


def _rank_batches(url, rank):
    data = ShardDataset(
        url,
        batch_size=4,
        shuffle=False,
        rank=rank,
        world_size=2,
        equal_batches=True,
        on_error="skip",
    )
    return data, [b["id"] for b in data]


def test_equal_batches_repeat_a_batch_when_skipped_rows_leave_a_rank_short(tmp_path, caplog):
    url = _two_rank_rows(tmp_path, range(12, 16))  # all of row group 3: rank 1 fills 1 of 2
    with caplog.at_level(logging.WARNING, logger="jin_data"):
        _, first = _rank_batches(url, 0)
        data, second = _rank_batches(url, 1)
    assert len(first) == len(second) == 2
    assert second == [[f"r{i:02d}" for i in range(4, 8)]] * 2
    report = data.last_report
    assert (report.skipped_rows, report.repeated_batches, report.left_out_rows) == (4, 1, 0)
    assert "left it 1 batches short of its quota of 2" in caplog.text


def test_equal_batches_name_a_rank_with_nothing_to_give(tmp_path):
    url = _two_rank_rows(tmp_path, [*range(4, 8), *range(12, 16)])  # all of rank 1's rows
    assert len(_rank_batches(url, 0)[1]) == 2
    with pytest.raises(DataError, match=r"equal_batches: rank 1 worker 0 read no batch of the 2"):
        _rank_batches(url, 1)


def test_a_shard_whose_row_groups_differ_from_the_manifest_is_named(tmp_path):
    url = str(tmp_path / "ds")
    write_dataset([{"id": f"s{i}"} for i in range(8)], url, row_group_size=8)
    shard = f"{url}/shard-00000.parquet"
    pq.write_table(pq.read_table(shard), shard, row_group_size=2)  # same rows, other groups
    with pytest.raises(ShardError, match=r"row groups: manifest says \[8\] rows, file has \[2, 2"):
        _read_all(url)


def _write_raw(path: Path, point_features: int, custom_dim: int, custom: list) -> None:
    """A conforming file written with pyarrow alone, as another producer would."""
    n = len(custom)
    table = pa.table(
        {
            "id": [f"{path.stem}-{i}" for i in range(n)],
            "split": ["train"] * n,
            "label": [None] * n,
            "text": [None] * n,
            "image": pa.nulls(n, pa.binary()),
            "audio": pa.nulls(n, AUDIO_TYPE),
            "points": [[[0.0] * (3 + point_features)]] * n,
            "custom": custom,
        },
        schema=sample_schema(point_features, custom_dim),
    )
    pq.write_table(table, path)


def test_files_declaring_another_c_or_f_than_the_first_are_refused_or_skipped(tmp_path, caplog):
    folder = tmp_path / "mixed"
    folder.mkdir()
    _write_raw(folder / "a.parquet", 2, 0, [None, None])
    _write_raw(folder / "b.parquet", 0, 0, [None])
    with pytest.raises(SchemaError, match=r"b\.parquet.*column='points'.*point_features=0"):
        _read_all(str(folder))
    with caplog.at_level(logging.WARNING, logger="jin_data"):
        _, ids = _read_all(str(folder), on_error="skip")
    assert sorted(ids) == ["a-0", "a-1"] and "skipped 1 rows" in caplog.text


@pytest.mark.parametrize(
    ("key", "column"), [("point_features", "points"), ("custom_dim", "custom")]
)
def test_a_file_declaring_a_negative_c_or_f_is_a_schema_error_or_skipped(tmp_path, key, column):
    folder = tmp_path / "negative"
    folder.mkdir()
    _write_raw(folder / "a.parquet", 0, 0, [None, None])
    table = pq.read_table(folder / "a.parquet")
    metadata = {**table.schema.metadata, f"jin_data.{key}".encode(): b"-1"}
    pq.write_table(table.replace_schema_metadata(metadata), folder / "a.parquet")
    with pytest.raises(SchemaError, match=rf"a\.parquet' column='{column}'.*expected >= 0"):
        _read_all(str(folder))
    data, ids = _read_all(str(folder), on_error="skip")
    assert ids == [] and data.last_report.skipped_rows == 2


def test_a_file_declaring_another_f_than_its_manifest_is_named(tmp_path):
    url = str(tmp_path / "ds")
    write_dataset([{"id": "a", "custom": np.zeros(3)}], url)
    _write_raw(tmp_path / "ds" / "shard-00000.parquet", 0, 4, [[0.0] * 4])
    with pytest.raises(SchemaError, match=r"column='custom'.*custom_dim: the data set has 3"):
        _read_all(url)


def test_custom_vectors_of_another_width_than_f_are_named_or_skipped(tmp_path, caplog):
    folder = tmp_path / "foreign"
    folder.mkdir()
    _write_raw(folder / "part.parquet", 0, 4, [[1.0] * 4, [1.0] * 6, None, [2.0]])
    with pytest.raises(DecodeError) as err:
        _read_all(str(folder))
    assert (err.value.row_group, err.value.row, err.value.column) == (0, 1, "custom")
    assert "holds 6 values, the data set's F is 4" in str(err.value)
    reader, ids = _read_all(str(folder), on_error="skip")
    assert ids == ["part-0", "part-2"] and reader.last_report.skipped_rows == 2


def test_a_row_with_several_bad_columns_counts_as_one_skipped_row(tmp_path):
    url = str(tmp_path / "ds")
    rows = [{"id": "ok"}, {"id": "bad", "image": b"\x89PNGjunk", "audio": b"RIFF....WAVEjunk"}]
    write_dataset(rows, url)
    reader, ids = _read_all(url, on_error="skip")
    report = reader.last_report
    assert ids == ["ok"] and (report.rows, report.skipped_rows, len(report.errors)) == (1, 1, 2)


def test_no_modalities_reads_no_modality_column(broken_rows):
    reader, ids = _read_all(broken_rows, modalities=[])  # the broken image is not read
    assert len(ids) == 12 and reader.columns == ["id", "split", "label"]
    assert set(next(iter(reader))) == {"id", "split", "label"}


def test_a_negative_seed_is_refused_naming_it(dataset):
    with pytest.raises(ValueError, match="seed"):
        ShardDataset(dataset, batch_size=1, seed=-1)


@pytest.mark.parametrize(("column", "skipped"), [("split", 4), ("custom", 2)])
def test_equal_batches_with_a_split_count_the_rows_left_out_past_a_skipped_row_group(
    tmp_path, column, skipped
):
    """Row groups of 4, no shuffle: rank 0 of 2 reads groups 0, 2, 4, rank 1 groups 1, 3, 5, of
    which only group 5 holds train rows, so each rank owes 2 batches of 2. Rank 0's group 0 does
    not read (its ``split`` column, so the train rows are not counted either; or ``custom``, after
    they were): whatever it skips, the 4 train rows of its group 4 are left out, and counted."""
    splits = ["train", "train", "val", "val"] + ["val"] * 4 + ["train"] * 4 + ["val"] * 4
    rows = [
        {"id": f"r{i:02d}", "split": split, "custom": np.full(2, i, np.float32)}
        for i, split in enumerate(splits + ["train"] * 8)
    ]
    url = str(tmp_path / "ds")
    write_dataset(rows, url, row_group_size=4)
    path = f"{url}/shard-00000.parquet"
    meta = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(
        meta.column(i)
        for i in range(meta.num_columns)
        if meta.column(i).path_in_schema.split(".")[0] == column
    )
    data = bytearray(Path(path).read_bytes())
    data[chunk.data_page_offset + chunk.total_compressed_size // 2] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    data = ShardDataset(
        url,
        batch_size=2,
        shuffle=False,
        split="train",
        rank=0,
        world_size=2,
        equal_batches=True,
        on_error="skip",
    )
    assert [b["id"] for b in data] == [["r08", "r09"], ["r10", "r11"]]
    report = data.last_report
    assert (report.rows, report.skipped_rows, report.left_out_rows) == (4, skipped, 4)


def test_a_damaged_manifest_is_a_shard_error_naming_it(dataset):
    path = Path(dataset) / "manifest.json"
    text = bytearray(path.read_bytes())
    text[10] = 0xFF  # not UTF-8 any more
    path.write_bytes(bytes(text))
    for call in (lambda: ShardDataset(dataset, batch_size=2), lambda: verify_dataset(dataset)):
        with pytest.raises(ShardError, match=r"manifest\.json'.*unreadable manifest"):
            call()


def _list_a_shard_twice(dataset: str, path: str) -> None:
    """Hand-edit the manifest so that its first shard is listed again, as ``path``."""
    manifest_path = Path(dataset) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"].append({**manifest["shards"][0], "path": path})
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("path", ["shard-00000.parquet", "./shard-00000.parquet"])
def test_a_manifest_listing_a_shard_twice_is_refused_naming_it(dataset, path):
    _list_a_shard_twice(dataset, path)
    for call in (lambda: ShardDataset(dataset, batch_size=2), lambda: verify_dataset(dataset)):
        with pytest.raises(
            ShardError, match=r"manifest\.json'.*shard '(\./)?shard-00000\.parquet' more than once"
        ):
            call()
