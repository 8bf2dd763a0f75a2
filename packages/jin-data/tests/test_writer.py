"""Writer: shards, row groups, manifest and checksums; write-then-rename; bad samples."""

import io
import posixpath
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
import torch
from PIL import Image

from jin_data import (
    SampleError,
    ShardDataset,
    ShardError,
    ShardWriter,
    load_manifest,
    verify_dataset,
    write_dataset,
)


@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_manifest_describes_the_shards(tmp_path, samples, scheme):
    url = str(tmp_path / "ds") if scheme == "local" else f"memory://writer-{id(samples)}"
    manifest = write_dataset(samples, url, rows_per_shard=16, row_group_size=5)
    fs, root = fsspec.core.url_to_fs(url)
    assert manifest == load_manifest(fs, root)
    assert manifest.num_rows == 60 and [s.num_rows for s in manifest.shards] == [16, 16, 16, 12]
    assert manifest.shards[0].row_groups == [5, 5, 5, 1]
    assert manifest.splits == {"test": 15, "train": 30, "val": 15}
    assert (manifest.point_features, manifest.custom_dim) == (1, 5)
    for shard in manifest.shards:
        with fs.open(f"{root}/{shard.path}", "rb") as f:
            meta = pq.ParquetFile(f).metadata
        assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == shard.row_groups
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) == [
        "manifest.json",
        *(s.path for s in manifest.shards),
    ]
    verify_dataset(url)


def test_values_round_trip(tmp_path, samples):
    url = str(tmp_path / "ds")
    write_dataset(samples, url, rows_per_shard=100, row_group_size=7)
    table = pq.read_table(f"{url}/shard-00000.parquet")
    row = table.slice(1, 1).to_pylist()[0]
    assert row["text"] == samples[1]["text"] and row["label"] == samples[1]["label"]
    np.testing.assert_array_equal(np.array(row["points"], np.float32), samples[1]["points"])
    np.testing.assert_array_equal(np.array(row["custom"], np.float32), samples[1]["custom"])
    assert table["image"][1].as_py()[:8] == b"\x89PNG\r\n\x1a\n"  # arrays stored as PNG
    assert table["custom"].null_count == 20 and table["points"].null_count == 15


def test_failure_midway_leaves_no_manifest_and_no_temporary(tmp_path, samples):
    url = str(tmp_path / "ds")

    def stream():
        yield from samples[:20]
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_dataset(stream(), url, rows_per_shard=16)
    names = sorted(p.name for p in (tmp_path / "ds").iterdir())
    assert names == ["shard-00000.parquet"]  # complete shard only; no manifest, no .inprogress


@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_shards_of_a_failed_write_are_refused_unless_overwritten_never_mixed(tmp_path, scheme):
    """A failed write leaves complete shards and no manifest; readers read such a folder as a data
    set, so a second write there must not replace some of its shards and leave the others."""
    url = str(tmp_path / "ds") if scheme == "local" else f"memory://failed-{tmp_path.name}"

    def stream(prefix: str, fail_at: int):
        for i in range(fail_at):
            yield {"id": f"{prefix}{i}"}
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_dataset(stream("a", 9), url, rows_per_shard=4)  # shards 0 and 1
    with pytest.raises(FileExistsError, match=r"unfinished data set \(shards, no manifest\)"):
        write_dataset(stream("b", 5), url, rows_per_shard=4)
    with pytest.raises(RuntimeError, match="source broke"):
        write_dataset(stream("b", 5), url, rows_per_shard=4, overwrite=True)  # shard 0 only
    ids = [i for batch in ShardDataset(url, batch_size=100, shuffle=False) for i in batch["id"]]
    assert ids == ["b0", "b1", "b2", "b3"]


def test_existing_dataset_is_not_overwritten_unless_asked(dataset, samples):
    with pytest.raises(FileExistsError, match="already exists"):
        write_dataset(samples, dataset)
    manifest = write_dataset(samples[:10], dataset, overwrite=True, rows_per_shard=100)
    assert manifest.num_rows == 10 and len(manifest.shards) == 1
    assert len(list(fsspec.filesystem("file").glob(f"{dataset}/shard-*.parquet"))) == 1


def test_verify_detects_a_changed_shard(dataset):
    path = f"{dataset}/shard-00001.parquet"
    data = bytearray(Path(path).read_bytes())
    data[100] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-00001.parquet.*sha256: expected"):
        verify_dataset(dataset)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"id": ""}, "key 'id': expected a non-empty str"),
        ({"id": "a", "colour": 1}, r"unknown keys \['colour'\]"),
        ({"id": "a", "image": np.zeros((4, 4), np.float32)}, r"key 'image': expected uint8"),
        # What Pillow cannot store as PNG: named like any bad sample, not a bare Pillow error.
        ({"id": "a", "image": np.zeros((4, 4, 5), np.uint8)}, r"'image': cannot store \(4, 4, 5\)"),
        ({"id": "a", "image": np.zeros((0, 4), np.uint8)}, r"'image': cannot store \(0, 4\)"),
        ({"id": "a", "image": Image.new("F", (4, 4))}, r"'image': cannot store F \(4, 4\)"),
        ({"id": "a", "audio": np.zeros(8, np.float32)}, "'audio_sample_rate': required"),
        ({"id": "a", "points": np.zeros((4, 2))}, r"key 'points': expected \(N, 3 \+ C\)"),
        ({"id": "a", "custom": np.zeros((2, 2))}, "key 'custom': expected 1-D"),
    ],
)
def test_bad_sample_names_index_id_and_key(tmp_path, bad, message):
    writer = ShardWriter(str(tmp_path / "x"))
    writer.write({"id": "ok"})
    with pytest.raises(SampleError, match=message):
        writer.write(bad)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"text": "caf\udce9"}, r"key 'text': not encodable as UTF-8 .*position 3"),
        ({"split": "tr\udcffain"}, r"key 'split': not encodable as UTF-8"),
        ({"label": 2**70}, r"key 'label': expected an int or None \(int64\), received 1180591"),
        ({"audio": b"RIFF", "audio_sample_rate": "x"}, r"key 'audio_sample_rate': expected an int"),
        ({"audio": np.zeros(4), "audio_sample_rate": 2**40}, r"key 'audio_sample_rate': expected"),
    ],
)
def test_a_sample_arrow_cannot_store_fails_at_its_own_write_and_the_writer_goes_on(
    tmp_path, bad, message
):
    # Accepted by write() before, it failed its shard's flush, and every later write and close.
    url = str(tmp_path / "ds")
    with ShardWriter(url, rows_per_shard=2) as writer:
        writer.write({"id": "s0"})
        with pytest.raises(SampleError, match=rf"sample 1 \(id='s1'\) {message}"):
            writer.write({"id": "s1", **bad})
        writer.write({"id": "s2"})
        writer.write({"id": "s3"})
    assert _column(url, "id") == ["s0", "s2", "s3"]


def test_inconsistent_custom_width_is_refused(tmp_path):
    rows = [{"id": "a", "custom": np.zeros(3)}, {"id": "b", "custom": np.zeros(4)}]
    with pytest.raises(SampleError, match=r"sample 1 \(id='b'\) key 'custom': expected \(3,\)"):
        write_dataset(rows, str(tmp_path / "x"))


def _column(url: str, name: str) -> list:
    """One column of every shard under ``url``, in shard order."""
    shards = sorted(Path(url).glob("shard-*.parquet"))
    return [v for shard in shards for v in pq.read_table(shard, columns=[name])[name].to_pylist()]


@pytest.mark.parametrize(
    ("key", "good", "bad", "argument"),
    [
        ("custom", np.zeros(4), np.zeros(5), {"custom_dim": 4}),
        ("custom", np.zeros(4), np.zeros(5), {}),
        ("points", np.zeros((2, 3)), np.zeros((2, 4)), {"point_features": 0}),
        ("points", np.zeros((2, 5)), np.zeros((2, 3)), {}),
    ],
)
def test_a_wrong_width_fails_at_its_own_write_and_the_writer_goes_on(
    tmp_path, key, good, bad, argument
):
    url = str(tmp_path / "ds")
    with ShardWriter(url, rows_per_shard=2, **argument) as writer:
        writer.write({"id": "s0", key: good})
        with pytest.raises(SampleError, match=rf"sample 1 \(id='s1'\) key '{key}'"):
            writer.write({"id": "s1", key: bad})
        for i in (2, 3, 4):  # later good samples are written, shards flushed as usual
            writer.write({"id": f"s{i}", key: good})
    assert sorted(_column(url, "id")) == ["s0", "s2", "s3", "s4"]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("split", None, "key 'split': expected a non-empty str"),
        ("split", "", "key 'split': expected a non-empty str"),
        ("text", 123, "key 'text': expected a str or None, received int"),
        ("label", "cat", "key 'label': expected an int or None"),
        ("label", True, "key 'label': expected an int or None"),
        ("label", 2.5, "key 'label': expected an int or None"),
        ("image", [1, 2, 3], "key 'image': expected encoded bytes, a PIL image or a uint8 array"),
    ],
)
def test_a_field_of_the_wrong_type_names_the_sample_and_key(tmp_path, key, value, message):
    with ShardWriter(str(tmp_path / "ds")) as writer:
        writer.write({"id": "ok"})
        with pytest.raises(SampleError, match=rf"sample 1 \(id='bad'\) {message}"):
            writer.write({"id": "bad", key: value})


def test_image_bytes_like_objects_are_stored_as_bytes(tmp_path):
    png = io.BytesIO()
    Image.fromarray(np.full((4, 5), 7, np.uint8)).save(png, format="PNG")
    data = png.getvalue()
    samples = [
        {"id": "a", "image": bytearray(data), "label": np.int64(3)},
        {"id": "b", "image": memoryview(data)},
    ]
    write_dataset(samples, str(tmp_path / "ds"))
    assert _column(str(tmp_path / "ds"), "image") == [data, data]
    assert _column(str(tmp_path / "ds"), "label") == [3, None]


def test_audio_bytes_like_objects_are_encoded_audio_and_integer_samples_are_refused(tmp_path):
    wav = io.BytesIO()
    soundfile.write(wav, np.full(160, 0.25, np.float32), 16000, format="WAV", subtype="PCM_16")
    data = wav.getvalue()
    url = str(tmp_path / "ds")
    with ShardWriter(url) as writer:
        writer.write({"id": "a", "audio": bytearray(data), "audio_sample_rate": 16000})
        writer.write({"id": "b", "audio": wav.getbuffer()})
        pcm = np.full(160, 8192, np.int16)
        with pytest.raises(
            SampleError, match=r"sample 2 \(id='c'\) key 'audio': .* received int16"
        ):
            writer.write({"id": "c", "audio": pcm, "audio_sample_rate": 16000})
    assert [a["bytes"] for a in _column(url, "audio")] == [data, data]
    batch = next(iter(ShardDataset(url, batch_size=2)))
    assert batch["audio_lengths"].tolist() == [160, 160]
    assert torch.allclose(batch["audio"], torch.full((2, 160), 0.25))


def test_encoded_media_stored_without_a_second_codec(tmp_path, samples):
    write_dataset(samples, str(tmp_path / "ds"), rows_per_shard=100)
    meta = pq.ParquetFile(tmp_path / "ds" / "shard-00000.parquet").metadata.row_group(0)
    codecs = {meta.column(i).path_in_schema: meta.column(i).compression for i in range(10)}
    assert codecs.pop("image") == codecs.pop("audio.bytes") == "UNCOMPRESSED"
    assert set(codecs.values()) == {"ZSTD"}, codecs
    write_dataset(samples, str(tmp_path / "z"), media_compression="zstd")
    meta = pq.ParquetFile(tmp_path / "z" / "shard-00000.parquet").metadata.row_group(0)
    assert {meta.column(i).compression for i in range(10)} == {"ZSTD"}


@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_two_writers_on_one_url_never_mix_their_shards(tmp_path, scheme):
    """Every rank of a job writing the same set at once: the second writer is refused while the
    first writes; with overwrite=True it replaces it, and the first fails at its next shard."""
    url = str(tmp_path / "ds") if scheme == "local" else f"memory://two-{tmp_path.name}"
    first = ShardWriter(url, rows_per_shard=2)
    first.write({"id": "a0"})
    with pytest.raises(FileExistsError, match=r"another ShardWriter is writing into .*\.writing-"):
        ShardWriter(url, rows_per_shard=2)
    second = ShardWriter(url, rows_per_shard=2, overwrite=True)
    with pytest.raises(FileExistsError, match="another ShardWriter replaced the data set"):
        first.write({"id": "a1"})  # a full shard: never renamed into the second's data set
    for i in range(3):
        second.write({"id": f"b{i}"})
    second.close()
    ids = [i for batch in ShardDataset(url, batch_size=100, shuffle=False) for i in batch["id"]]
    assert ids == ["b0", "b1", "b2"]
    fs, root = fsspec.core.url_to_fs(url)
    assert sorted(posixpath.basename(p) for p in fs.ls(root, detail=False)) == [
        "manifest.json",
        "shard-00000.parquet",
        "shard-00001.parquet",
    ]  # no claim and no temporary file left
    assert ShardWriter(url, overwrite=True).close().num_rows == 0  # the folder is free again
