"""``python -m jin_orchestrate.extend`` end to end: a Ray Train job adds a modality to a trained
checkpoint, and the extended checkpoint works where any checkpoint does (evaluate, embed, serve)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

pytestmark = pytest.mark.slow


def test_extend_adds_a_modality_that_evaluate_embed_and_serve_use(
    checkpoint, numberworld_url, tmp_path
):
    from jin_data import ShardDataset, list_shards
    from jin_orchestrate.checkpoint import read_config
    from jin_orchestrate.data import rename_columns
    from jin_orchestrate.embed import EmbedConfig, embed_shard
    from jin_orchestrate.evaluate import load_model
    from jin_orchestrate.inference import EmbeddingModel

    output = tmp_path / "job"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "jin_orchestrate.extend",
            "--checkpoint",
            str(checkpoint),
            "--modality",
            "seven_segment",
            "--encoder",
            "custom",
            "--input-dim",
            "14",
            "--column",
            "custom",
            "--data",
            numberworld_url,
            "--steps",
            "4",
            "--num-workers",
            "1",
            "--output",
            str(output),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "R@10 seven_segment→text" in run.stdout
    assert "trainable      " in run.stdout

    job = json.loads((output / "job.json").read_text())
    extended = job["final_checkpoint"]
    config = read_config(extended)
    assert list(config["model"]["extra_modalities"]) == ["seven_segment"]
    assert config["data"]["columns"] == {"seven_segment": "custom"}

    # Pre-existing modalities embed bit for bit as before; the new one embeds the custom column.
    before, after = load_model(checkpoint), load_model(extended)
    batch = next(
        iter(
            ShardDataset(
                numberworld_url,
                batch_size=16,
                shuffle=False,
                split="test",
                modalities=["text", "image", "audio", "points", "custom"],
            )
        )
    )
    with torch.no_grad():
        old = before.embed(batch)
        new = after.embed(rename_columns(batch, {"seven_segment": "custom"}))
    for name in ("text", "image", "audio", "points"):
        assert torch.equal(old[name], new[name]), name
    assert new["seven_segment"].shape == old["text"].shape

    # Serving and batch embedding read the recorded column with no flag.
    model = EmbeddingModel.from_checkpoint(extended, device="cpu")
    spec = model.card.spec("seven_segment")
    assert spec is not None and spec.kind == "vector" and spec.shape == [14]
    assert spec.column == "custom"
    _, shards = list_shards(numberworld_url)
    result = embed_shard(
        model,
        shards[0].url,
        EmbedConfig(checkpoint=extended, input=numberworld_url, output=str(tmp_path / "emb")),
    )
    table = pq.read_table(result.output)
    vectors = table["seven_segment_embedding"].drop_null().to_pylist()
    assert len(vectors) == result.rows
    assert np.allclose(np.linalg.norm(np.asarray(vectors), axis=1), 1.0, atol=1e-5)
