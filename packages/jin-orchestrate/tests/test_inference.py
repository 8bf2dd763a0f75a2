"""EmbeddingModel: training's preprocessing, batch-independent vectors, isolated failures."""

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from encoded import png, wav

from jin_data import ShardDataset, list_shards, sample_schema
from jin_orchestrate.inference import EmbeddingModel, ModelCard, card_decoder
from jin_orchestrate.tracking import local_checkpoint


def sample_table(rows: dict[str, list], n: int) -> pa.Table:
    """A table of jin-data's sample schema with the given columns (null elsewhere)."""
    schema = sample_schema()
    columns = {"id": [str(i) for i in range(n)], "split": ["x"] * n, "label": [None] * n}
    for field in schema:
        if field.name not in columns:
            columns[field.name] = rows.get(field.name, [None] * n)
    table = pa.table({f.name: pa.array(columns[f.name], f.type) for f in schema})
    for name, values in rows.items():
        if name not in schema.names:  # a runtime modality
            table = table.append_column(name, pa.array(values, pa.list_(pa.float32())))
    return table


@pytest.fixture(scope="module")
def embedder(checkpoint):
    return EmbeddingModel.from_checkpoint(checkpoint, device="cpu")


def test_card_names_the_weights_and_every_modality(checkpoint):
    card = ModelCard.from_checkpoint(checkpoint)
    weights = hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()
    assert card.version == weights[:12]
    assert card.preset == "jin-test" and card.dim == 32
    assert [m.name for m in card.modalities] == [
        "text",
        "image",
        "audio",
        "points",
        "seven_segment",
    ]
    assert card.spec("seven_segment").kind == "vector" and card.spec("seven_segment").shape == [14]
    assert card.spec("image").shape == [1, None, None]
    assert card.spec("audio").min_length == 160 and card.spec("audio").sample_rate == 16000
    assert card.spec("points").shape == [None, 3]


def test_embed_table_equals_the_training_batch(embedder, corpus_url):
    modalities = ["text", "image", "audio", "points"]
    batch = next(
        iter(
            ShardDataset(
                corpus_url, batch_size=8, shuffle=False, modalities=modalities, world_size=1, rank=0
            )
        )
    )
    with torch.no_grad():
        expected = embedder.model.embed(batch)
    fs, shards = list_shards(corpus_url)
    with fs.open(shards[0].path, "rb") as f:
        stored = pq.read_table(f, columns=["id", "split", "label", *modalities])
    rows = [stored["id"].to_pylist().index(i) for i in batch["id"]]
    decoded, errors = card_decoder(embedder.card).decode(stored.take(rows))
    assert not errors
    result = embedder.embed_table(decoded)
    for m in modalities:
        assert result.present[m].all()
        np.testing.assert_allclose(result.vectors[m], expected[m].numpy(), atol=1e-5)


def test_each_row_alone_equals_the_batch(embedder):
    n = 4
    table = sample_table(
        {
            "text": ["7", "the number seventy-seven", "", "forty-two, written by hand"],
            "image": [png(20, 30, 0), png(64, 64, 1), png(7, 50, 2), png(33, 9, 3)],
            "audio": [
                {"bytes": wav(s, i), "samples": None, "sample_rate": None}
                for i, s in enumerate((160, 16000, 5000, 999))
            ],
            "points": [
                np.random.default_rng(i).normal(size=(k, 3)).tolist()
                for i, k in enumerate((1, 5, 256, 40))
            ],
            "seven_segment": np.random.default_rng(0).random((n, 14)).tolist(),
        },
        n,
    )
    decoded, _ = card_decoder(embedder.card).decode(table)
    together = embedder.embed_table(decoded)
    assert not together.errors
    for i in range(n):
        alone = embedder.embed_table(decoded.slice(i, 1))
        for m, vectors in together.vectors.items():
            np.testing.assert_allclose(vectors[i], alone.vectors[m][0], atol=1e-5, err_msg=m)
            np.testing.assert_allclose(np.linalg.norm(vectors[i]), 1.0, atol=1e-5)


def test_a_rejected_row_does_not_fail_its_neighbours(embedder):
    good = np.random.default_rng(0).random((3, 14)).tolist()
    table = sample_table(
        {
            "points": [[[0.0, 0.0, 0.0]] * 4, [[1e30, 0.0, 0.0]] * 20, [[1.0, 2.0, 3.0]]],
            "seven_segment": [good[0], good[1][:13], good[2]],
        },
        3,
    )
    decoded, _ = card_decoder(embedder.card).decode(table)
    result = embedder.embed_table(decoded)
    assert set(result.errors) == {1}
    assert result.errors[1].startswith("points: the embedding is not finite")
    assert "; seven_segment: features: expected (B,14)" in result.errors[1]
    for m in ("points", "seven_segment"):
        assert not result.present[m][1] and result.present[m][[0, 2]].all()
        alone = embedder.embed_table(decoded.slice(2, 1), [m])
        np.testing.assert_allclose(result.vectors[m][2], alone.vectors[m][0], atol=1e-5)


def test_a_row_rejected_for_one_modality_is_absent_from_every_modality(embedder):
    """`TableEmbeddings`: a row in ``errors`` is absent from every modality. Its points embedded,
    its seven_segment vector was refused: it stayed present, with a vector, for points."""
    good = np.random.default_rng(0).random((2, 14)).tolist()
    table = sample_table(
        {
            "points": [[[0.0, 0.0, 0.0]] * 4, [[1.0, 2.0, 3.0]] * 5],
            "seven_segment": [good[0], good[1][:13]],
        },
        2,
    )
    decoded, _ = card_decoder(embedder.card).decode(table)
    result = embedder.embed_table(decoded)
    assert set(result.errors) == {1} and result.errors[1].startswith("seven_segment: ")
    for m in ("points", "seven_segment"):
        assert result.present[m].tolist() == [True, False], m
        assert not result.vectors[m][1].any(), m
    alone = embedder.embed_table(decoded.slice(0, 1))
    np.testing.assert_allclose(result.vectors["points"][0], alone.vectors["points"][0], atol=1e-5)


def test_local_checkpoint_fetches_an_mlflow_run_once(checkpoint, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(checkpoint), "final_checkpoint")
    source = f"runs:/{run.info.run_id}/final_checkpoint"

    path = local_checkpoint(source, tracking_uri=uri, cache_dir=tmp_path / "cache")
    assert ModelCard.from_checkpoint(path).version == ModelCard.from_checkpoint(checkpoint).version

    with pytest.raises(FileNotFoundError, match="cannot download checkpoint 'runs:/nope/x'"):
        local_checkpoint("runs:/nope/x", tracking_uri=uri, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [path.name]

    def no_download(**_):
        raise AssertionError("downloaded twice")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", no_download)
    assert local_checkpoint(source, tracking_uri=uri, cache_dir=tmp_path / "cache") == path
    with pytest.raises(FileNotFoundError, match="neither a directory nor an MLflow URI"):
        local_checkpoint(tmp_path / "missing")
