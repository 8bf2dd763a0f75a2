"""The main job as run on a cluster: ``ray job submit -- python -m jin_orchestrate.pretrain``.

A real Ray head is started on 127.0.0.1 with token authentication on (a token file private to the
test), the job is submitted with a tiny config, and the MLflow store is checked for the parent run
and its nested stage runs. The head is stopped through its own PID: ``ray start --block`` tears its
processes down on SIGTERM, so nothing else on the machine is touched.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))

TINY = [
    "--preset",
    "jin-test",
    "--set",
    "stages.0.steps=4",
    "--set",
    "stages.1.steps=4",
    "--set",
    "stages.2.steps=4",
]


def test_ray_job_submit_trains_all_stages_and_tracks_them_in_mlflow(
    ray_head, tmp_path, numberworld_url
):
    from mlflow.tracking import MlflowClient

    address, env = ray_head
    workdir = tmp_path / "job"
    workdir.mkdir()
    output = tmp_path / "out"
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri}}
    submit = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(workdir),
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            sys.executable,
            "-m",
            "jin_orchestrate.pretrain",
            *TINY,
            "--data",
            numberworld_url,
            "--output",
            str(output),
            "--experiment",
            "ray-job-test",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
    assert "succeeded" in submit.stdout + submit.stderr

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("ray-job-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["jin.stage"] for r in stages) == [
        "cross_modal",
        "multimodal",
        "within_modality",
    ]
    for run in stages:
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "loss")
        assert history, f"stage {run.info.run_name} logged no loss"
    assert "zero_shot_top1" in parent.data.metrics
    assert (output / "job.json").is_file()
