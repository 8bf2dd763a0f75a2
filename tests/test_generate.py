"""``python -m jin_orchestrate.generate train`` end to end: a Ray Train job adds generation heads
to a checkpoint and trains them, tracked in MLflow; the result samples through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_generate_train_job_tracks_the_stage_and_the_result_samples(
    checkpoint, numberworld_url, tmp_path
):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from jin_orchestrate.checkpoint import read_config

    output = tmp_path / "job"
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "jin_orchestrate.generate",
            "train",
            "--checkpoint",
            str(checkpoint),
            "--data",
            numberworld_url,
            "--steps",
            "3",
            "--num-workers",
            "1",
            "--output",
            str(output),
            "--set",
            "model.generation.diffusion.num_timesteps=100",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    trained = json.loads((output / "job.json").read_text())["final_checkpoint"]
    config = read_config(trained)
    assert config["model"]["generation"]["diffusion"]["num_timesteps"] == 100
    assert [s["name"] for s in config["stages"]] == ["generation"]

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("jin-generate")
    stage_runs = [
        r
        for r in client.search_runs([experiment.experiment_id])
        if r.data.tags.get("jin.stage") == "generation"
    ]
    assert len(stage_runs) == 1
    for key in ("generation/image", "generation/audio", "generation/text"):
        assert client.get_metric_history(stage_runs[0].info.run_id, key), key

    png = tmp_path / "four.png"
    sample = subprocess.run(
        [
            sys.executable,
            "-m",
            "jin_orchestrate.generate",
            "--checkpoint",
            trained,
            "--to",
            "image",
            "--from-text",
            "the number 4",
            "--steps",
            "3",
            "--out",
            str(png),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sample.returncode == 0, sample.stderr[-4000:]
    with Image.open(png) as image:
        assert image.size == (32, 32)
