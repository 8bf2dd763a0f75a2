"""Running a tiny pretraining job as users do (``python -m jin_orchestrate.pretrain``) for the
fault tests, and reading back what it left: job.json, checkpoints, MLflow runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# One stage, checkpoints every 2 steps: the smallest job that has a checkpoint to come back to.
ONE_STAGE = {
    "train": {"checkpoint_every": 2, "log_every": 1, "max_failures": 2, "max_nonfinite_steps": 3},
    "stages": [{"name": "within_modality", "steps": 6, "alpha": 1.0}],
}


@dataclass
class Job:
    """A job's process and its directories."""

    process: subprocess.Popen
    output: Path
    tracking_uri: str
    log: Path

    def wait(self, timeout: float = 600) -> tuple[int, str]:
        """The exit code and everything the job printed (kept in a file: jobs run side by side,
        and an unread pipe would stall one)."""
        self.process.wait(timeout=timeout)
        return self.process.returncode, self.log.read_text()

    def record(self) -> dict[str, Any]:
        return json.loads((self.output / "job.json").read_text())

    def stage_run(self) -> Any:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        return client, client.get_run(self.record()["stages"]["within_modality"]["run_id"])


def start_job(
    tmp: Path,
    data_url: str,
    *,
    config: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    name: str = "job",
) -> Job:
    """Start ``python -m jin_orchestrate.pretrain`` on jin-test with ``config`` merged in."""
    tmp.mkdir(parents=True, exist_ok=True)
    config_path = tmp / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config or ONE_STAGE))
    output = tmp / name
    tracking_uri = f"sqlite:///{tmp / f'{name}-mlflow.db'}"
    log = tmp / f"{name}.log"
    with log.open("w") as sink:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jin_orchestrate.pretrain",
                "--preset",
                "jin-test",
                "--config",
                str(config_path),
                "--data",
                data_url,
                "--output",
                str(output),
                "--experiment",
                "faults",
            ],
            cwd=tmp,
            env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, **(env or {})},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    return Job(process, output, tracking_uri, log)
