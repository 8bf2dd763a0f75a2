"""MLflow tracking: where runs go, one parent run per job, a nested run per stage, rank 0 only.

With no ``MLFLOW_TRACKING_URI`` the store is ``sqlite:///<cwd>/mlflow.db`` — the database backend
MLflow 3 recommends — with artifacts under ``<cwd>/mlartifacts``. Both are resolved to absolute
paths on the driver and handed to the Ray Train workers, whose working directory is elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

__all__ = ["TrackingTarget", "flatten_params", "resolve_tracking"]


class TrackingTarget(dict):
    """``{"tracking_uri", "experiment_id"}``: picklable, so it travels to Ray workers."""

    @property
    def tracking_uri(self) -> str:
        return self["tracking_uri"]

    @property
    def experiment_id(self) -> str:
        return self["experiment_id"]

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)


def resolve_tracking(
    experiment: str, workdir: str | os.PathLike[str] | None = None
) -> TrackingTarget:
    """Pick the tracking URI (env or local sqlite store) and get or create ``experiment``."""
    base = Path(workdir or os.getcwd()).resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{base / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        artifacts = None
        if uri.startswith("sqlite:///") and "MLFLOW_TRACKING_URI" not in os.environ:
            artifacts = (base / "mlartifacts").as_uri()
        experiment_id = client.create_experiment(experiment, artifact_location=artifacts)
    mlflow.set_tracking_uri(uri)
    return TrackingTarget(tracking_uri=uri, experiment_id=experiment_id)


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"a.b.c": "value"}`` as MLflow params (values cut to MLflow's limit)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = str(value)[:6000]
    return flat
