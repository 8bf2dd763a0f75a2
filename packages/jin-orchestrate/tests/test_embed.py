"""The offline embedding job: per-shard outputs, complete or absent, rerun skips, bad rows named."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jin_data import DataError, list_shards
from jin_orchestrate.embed import EmbedConfig, embed_shard, main, run_embedding_job
from jin_orchestrate.inference import EmbeddingModel, card_decoder

MODALITIES = ["text", "image", "audio", "points"]


@pytest.fixture(scope="module")
def shards(corpus_url, tmp_path_factory):
    """The test corpus re-cut into three shards of 32 rows (no manifest: found by name)."""
    fs, [shard] = list_shards(corpus_url)
    with fs.open(shard.path, "rb") as f:
        table = pq.read_table(f)
    root = tmp_path_factory.mktemp("three_shards")
    for i in range(3):
        pq.write_table(table.slice(32 * i, 32), root / f"shard-{i:05d}.parquet")
    return str(root), table


@pytest.fixture(scope="module")
def embedder(checkpoint):
    return EmbeddingModel.from_checkpoint(checkpoint, device="cpu")


def _expected(embedder, table: pa.Table) -> dict[str, np.ndarray]:
    decoded, _ = card_decoder(embedder.card).decode(table)
    decoded = decoded.rename_columns(
        ["seven_segment" if c == "custom" else c for c in decoded.column_names]
    )
    result = embedder.embed_table(decoded, [*MODALITIES, "seven_segment"])
    return result.vectors


def _column(table: pa.Table, name: str) -> np.ndarray:
    return np.array(table[name].to_pylist(), np.float32)


def test_embed_shard_writes_ids_and_one_embedding_column_per_modality(shards, embedder, tmp_path):
    root, table = shards
    cfg = EmbedConfig(
        checkpoint="unused", input=root, output=str(tmp_path / "out"), custom_as="seven_segment"
    )
    result = embed_shard(embedder, f"{root}/shard-00001.parquet", cfg)
    assert result.rows == 32 and result.skipped == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["shard-00001.parquet"]
    out = pq.read_table(result.output)
    assert out.column_names == [
        "id",
        "split",
        "label",
        *(f"{m}_embedding" for m in MODALITIES),
        "seven_segment_embedding",
    ]
    assert out["id"].to_pylist() == table["id"].to_pylist()[32:64]
    meta = out.schema.metadata
    assert meta[b"jin.embed.model_version"].decode() == embedder.card.version
    assert meta[b"jin.embed.source"].decode().endswith("shard-00001.parquet")
    expected = _expected(embedder, table.slice(32, 32))
    for m in [*MODALITIES, "seven_segment"]:
        np.testing.assert_allclose(_column(out, f"{m}_embedding"), expected[m], atol=1e-5)


def test_a_split_keeps_only_its_rows(shards, embedder, tmp_path):
    root, table = shards
    cfg = EmbedConfig(
        checkpoint="unused", input=root, output=str(tmp_path), split=["test"], modalities=["text"]
    )
    out = pq.read_table(embed_shard(embedder, f"{root}/shard-00000.parquet", cfg).output)
    splits = table.slice(0, 32)["split"].to_pylist()
    assert out["split"].to_pylist() == ["test"] * splits.count("test")
    assert out.column_names == ["id", "split", "label", "text_embedding"]


def test_a_modality_named_twice_is_embedded_once(shards, embedder, tmp_path):
    """One column each: a file with two columns of one name does not even read back."""
    root, _ = shards
    cfg = EmbedConfig(
        checkpoint="unused", input=root, output=str(tmp_path), modalities=["text", "text"]
    )
    result = embed_shard(embedder, f"{root}/shard-00000.parquet", cfg)
    out = pq.read_table(result.output)
    assert out.column_names == ["id", "split", "label", "text_embedding"]
    assert out.schema.metadata[b"jin.embed.modalities"] == b'["text"]'


def _bad_image_shard(table: pa.Table, path) -> None:
    """The first 4 rows of ``table`` at ``path``, the third one's image not an image."""
    images = table["image"].to_pylist()[:4]
    images[2] = b"not an image"
    bad = table.slice(0, 4).set_column(
        table.schema.get_field_index("image"), "image", pa.array(images, pa.binary())
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(bad, path)


def test_a_row_that_does_not_decode_fails_the_shard_or_is_skipped(shards, embedder, tmp_path):
    _, table = shards
    path = tmp_path / "in" / "bad.parquet"
    _bad_image_shard(table, path)
    out = tmp_path / "out"
    cfg = EmbedConfig(checkpoint="unused", input=str(path), output=str(out), modalities=["image"])
    with pytest.raises(DataError, match=r"bad\.parquet.*column='image'.*id=") as info:
        embed_shard(embedder, str(path), cfg)
    assert info.value.id == table["id"][2].as_py()
    assert not out.exists() or not list(out.iterdir()), "a failed shard left a file"
    skipping = cfg.model_copy(update={"on_error": "skip"})
    result = embed_shard(embedder, str(path), skipping)
    assert (result.rows, result.skipped) == (3, 1)
    assert table["id"][2].as_py() not in pq.read_table(result.output)["id"].to_pylist()


def test_a_row_with_several_bad_columns_is_one_skipped_row(shards, embedder, tmp_path):
    _, table = shards
    rows = table.slice(0, 4)
    images, audio = rows["image"].to_pylist(), rows["audio"].to_pylist()
    images[2] = b"not an image"
    audio[2] = {**audio[2], "bytes": b"RIFF....WAVEjunk"}
    for name, values in (("image", pa.array(images, pa.binary())), ("audio", audio)):
        column = pa.array(values, rows.schema.field(name).type)
        rows = rows.set_column(rows.schema.get_field_index(name), name, column)
    path = tmp_path / "in" / "bad.parquet"
    path.parent.mkdir()
    pq.write_table(rows, path)
    cfg = EmbedConfig(
        checkpoint="unused",
        input=str(path),
        output=str(tmp_path / "out"),
        modalities=["image", "audio"],
        on_error="skip",
    )
    result = embed_shard(embedder, str(path), cfg)
    assert (result.rows, result.skipped) == (3, 1)


@pytest.mark.slow
def test_the_job_embeds_every_shard_once_and_a_rerun_skips_complete_ones(
    ray_local, shards, checkpoint, embedder, tmp_path, capsys
):
    root, table = shards
    out = tmp_path / "embeddings"
    cfg = EmbedConfig(
        checkpoint=str(checkpoint), input=root, output=str(out), custom_as="seven_segment"
    )
    summary = run_embedding_job(cfg)
    assert (len(summary.embedded), summary.already_done, summary.rows) == (3, [], 96)
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"shard-{i:05d}.parquet" for i in range(3)]
    written = pa.concat_tables(pq.read_table(out / n) for n in names)
    assert written["id"].to_pylist() == table["id"].to_pylist()
    expected = _expected(embedder, table)
    np.testing.assert_allclose(_column(written, "image_embedding"), expected["image"], atol=1e-5)

    (out / "shard-00001.parquet").unlink()
    assert main(["--checkpoint", str(checkpoint), "--input", root, "--output", str(out),
                 "--custom-as", "seven_segment"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "2 of 3 shards already embedded" in printed
    assert "1 shards embedded (32 rows, 0 skipped), 2 already complete" in printed
    assert sorted(p.name for p in out.iterdir()) == names

    # A row that does not decode, on an actor: the CLI's answer to bad input (the message, exit
    # status 2), as when it runs in the driver, not Ray's wrapped task error.
    _bad_image_shard(table, tmp_path / "bad" / "bad.parquet")
    bad = ["--checkpoint", str(checkpoint), "--input", str(tmp_path / "bad")]
    assert main([*bad, "--output", str(tmp_path / "bad_out"), "--modalities", "image"]) == 2
    error = capsys.readouterr().err
    assert "error: url=" in error and "bad.parquet" in error and "column='image'" in error
    assert not list((tmp_path / "bad_out").iterdir()), "a failed shard left a file"


def test_outputs_of_another_model_are_refused(shards, checkpoint, tmp_path):
    from jin_orchestrate.checkpoint import save_checkpoint
    from jin_orchestrate.config import load_config
    from jin_orchestrate.model import JinModel

    root, _ = shards
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(
        pa.table({"id": ["x"]}).replace_schema_metadata({"jin.embed.model_version": "0123abcd"}),
        out / "shard-00000.parquet",
    )
    torch.manual_seed(1)
    cfg = load_config("jin-test")
    other = save_checkpoint(
        tmp_path / "other", JinModel(cfg.model), config=cfg.model_dump(mode="json"), state={}
    )
    job = EmbedConfig(checkpoint=str(other), input=root, output=str(out))
    with pytest.raises(ValueError, match=r"shard-00000\.parquet holds embeddings of model version"):
        run_embedding_job(job)
    with pytest.raises(ValueError, match="custom_as: the model has no modality 'nope'"):
        run_embedding_job(job.model_copy(update={"custom_as": "nope"}))
