"""The Ray Data path gives the same batches (layout and values) as the streaming reader."""

import json
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip(
    "ray", reason="Ray Data path needs the extra: pip install 'jin-data[ray]'"
)

from jin_data import (  # noqa: E402
    DecodeError,
    Decoder,
    SchemaError,
    ShardDataset,
    ShardError,
    write_dataset,
)
from jin_data.ray_data import (  # noqa: E402
    RowGroupDecoder,
    _readable_shards,
    ray_collate_fn,
    read_ray_dataset,
)
from jin_data.reader import list_shards  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    # address="local": always a private instance, never a cluster another process started.
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_same_rows_and_values_as_the_streaming_reader(local_ray, dataset):
    ours = next(iter(ShardDataset(dataset, batch_size=100, shuffle=False, split="train")))
    theirs = {}
    batches = read_ray_dataset(dataset, split="train").iter_torch_batches(
        batch_size=7, collate_fn=ray_collate_fn()
    )
    for batch in batches:
        assert set(batch) == set(ours)
        for i, sample_id in enumerate(batch["id"]):
            theirs[sample_id] = {k: v[i] for k, v in batch.items()}
    assert sorted(theirs) == sorted(ours["id"])
    for i, sample_id in enumerate(ours["id"]):
        row = theirs[sample_id]
        assert row["text"] == ours["text"][i] and row["label"] == ours["label"][i]
        np.testing.assert_array_equal(row["custom"], ours["custom"][i])
        n = int(ours["audio_lengths"][i])
        np.testing.assert_array_equal(row["audio"][:n], ours["audio"][i, :n])
        h, w = ours["image_sizes"][i].tolist()
        np.testing.assert_array_equal(row["image"][:, :h, :w], ours["image"][i, :, :h, :w])
        real = ~ours["points_padding_mask"][i]
        np.testing.assert_array_equal(
            row["points"][~row["points_padding_mask"]], ours["points"][i][real]
        )


def test_decode_error_names_file_row_group_row_and_id(local_ray, tmp_path):
    url = str(tmp_path / "bad")
    write_dataset([{"id": "ok", "image": b"\x89PNGjunk"}], url)
    # Ray wraps the task's exception (UserCodeException); its text carries ours, type and message.
    with pytest.raises(Exception) as err:  # noqa: PT011 - the wrapper type is Ray's to choose
        read_ray_dataset(url).take_all()
    assert DecodeError.__name__ in str(err.value)
    where = r"url='[^']*shard-00000.parquet' row_group=0 row=0 column='image' id='ok'"
    assert re.search(where, str(err.value))


def test_skip_leaves_out_bad_rows_and_unreadable_row_groups(local_ray, tmp_path):
    url = str(tmp_path / "bad")
    rows = [{"id": f"r{i}", "image": np.full((2, 2), i, np.uint8)} for i in range(6)]
    rows[1]["image"] = b"\x89PNGjunk"
    write_dataset(rows, url, row_group_size=2)
    path = tmp_path / "bad" / "shard-00000.parquet"
    data = bytearray(path.read_bytes())
    meta = pq.ParquetFile(path).metadata.row_group(2).column(0)  # id column of rows 4, 5
    data[meta.data_page_offset + meta.total_compressed_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    ids = [r["id"] for r in read_ray_dataset(url, on_error="skip").take_all()]
    assert sorted(ids) == ["r0", "r2", "r3"]


def test_unreadable_and_foreign_shards_raise_or_are_skipped_and_logged(local_ray, tmp_path, caplog):
    url = tmp_path / "shards"
    rows = [{"id": f"r{i}", "text": f"row {i}"} for i in range(9)]
    write_dataset(rows, str(url), rows_per_shard=3)
    first, second, _ = sorted(url.glob("*.parquet"))
    data = first.read_bytes()
    first.write_bytes(data[: len(data) // 2])  # truncated: no footer
    pq.write_table(pa.table({"x": [1, 2, 3]}), second)  # another data set's file
    with pytest.raises(ShardError, match=r"url='[^']*shard-00000\.parquet'.*Parquet schema"):
        read_ray_dataset(str(url))
    with caplog.at_level(logging.WARNING, logger="jin_data"):
        ids = [r["id"] for r in read_ray_dataset(str(url), on_error="skip").take_all()]
    assert sorted(ids) == ["r6", "r7", "r8"]
    skipped = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert [(r.args[0], type(r.args[1])) for r in skipped] == [(3, ShardError), (3, SchemaError)]
    third = sorted(url.glob("*.parquet"))[2]
    third.write_bytes(b"junk")
    with pytest.raises(ShardError, match="left no readable shard"):
        read_ray_dataset(str(url), on_error="skip")


def test_skips_under_a_split_are_logged_with_their_rows_of_the_split(dataset, caplog):
    """The driver's shard check and the Ray worker's step, called here without Ray: a foreign
    shard 2 (samples 32..47, no ``text`` column) holds 8 train rows, row group 2 of shard 1
    (samples 26..30, a corrupt page) 2; each is logged with those, not with all 16 or 5 rows."""
    shard = f"{dataset}/shard-00002.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.drop_columns(["text"]), shard, row_group_size=5)
    path = f"{dataset}/shard-00001.parquet"
    meta = pq.ParquetFile(path).metadata.row_group(2)
    chunk = meta.column(meta.num_columns - 1)
    data = bytearray(Path(path).read_bytes())
    data[chunk.data_page_offset + chunk.total_compressed_size // 2] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    fs, shards = list_shards(dataset)
    step = RowGroupDecoder(
        fs, shards, ["id", "split", "custom"], ["train"], Decoder(on_error="skip")
    )
    with caplog.at_level(logging.WARNING, logger="jin_data"):
        kept = _readable_shards(fs, shards, "skip", ["train"])
        decoded = list(step({"shard": np.array([1, 1]), "row_group": np.array([1, 2])}))
    assert [s.url for s in kept] == [s.url for s in shards if s is not shards[2]]
    assert [t["id"].to_pylist() for t in decoded] == [["s0021", "s0024", "s0025"]]
    skipped = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert [(r.args[0], type(r.args[1])) for r in skipped] == [(8, SchemaError), (2, ShardError)]


def test_a_manifest_listing_a_shard_twice_is_refused(local_ray, dataset):
    # The same check as the streaming reader (`load_manifest`), before any Ray task.
    manifest_path = Path(dataset) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"].append(manifest["shards"][0])
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"manifest\.json'.*'shard-00000\.parquet' more than once"):
        read_ray_dataset(dataset)


def test_modalities_are_checked(local_ray, dataset):
    with pytest.raises(ValueError, match=r"unknown \['smell'\]"):
        read_ray_dataset(dataset, modalities=["smell"])


def test_an_empty_data_set_is_an_empty_dataset(local_ray, tmp_path):
    url = str(tmp_path / "empty")
    write_dataset([], url)
    assert read_ray_dataset(url).count() == 0


def test_custom_is_b_by_f_when_no_row_has_one(local_ray, tmp_path):
    # F travels in the decoded blocks' schema metadata from the shard to the collate function.
    url = str(tmp_path / "nocustom")
    write_dataset([{"id": f"{i}", "text": "x"} for i in range(6)], url, custom_dim=4)
    batches = read_ray_dataset(url).iter_torch_batches(batch_size=3, collate_fn=ray_collate_fn())
    shapes = [tuple(b["custom"].shape) for b in batches]
    assert shapes == [(3, 4), (3, 4)]


def test_editing_a_batch_in_place_leaves_the_data_set_unchanged(local_ray, tmp_path):
    # Blocks live in Ray's object store: a batch viewing one would write into a materialised
    # data set, read again in the next epoch.
    url = str(tmp_path / "same-shapes")
    rows = [
        {
            "id": f"{i}",
            "custom": np.full(4, i + 1, np.float32),
            "image": np.full((4, 4), 7, np.uint8),
        }
        for i in range(8)
    ]
    write_dataset(rows, url, row_group_size=4)
    data = read_ray_dataset(url, modalities=["custom", "image"]).materialize()

    def epoch() -> list[tuple[float, int]]:
        sums = []
        for batch in data.iter_torch_batches(batch_size=4, collate_fn=ray_collate_fn()):
            sums.append((float(batch["custom"].sum()), int(batch["image"].sum())))
            batch["custom"] -= 1.0  # e.g. an in-place normalisation
            batch["image"].zero_()
        return sums

    assert epoch() == epoch() == [(40.0, 448), (104.0, 448)]
