"""MLflow tracking: where runs go, one parent run per job, a nested run per stage, rank 0 only.

With no ``MLFLOW_TRACKING_URI`` the store is ``sqlite:///<cwd>/mlflow.db`` — the database backend
MLflow 3 recommends — with artifacts under ``<cwd>/mlartifacts``. Both, and a local store that
``MLFLOW_TRACKING_URI`` names by a relative path, are resolved to absolute paths on the driver and
handed to the Ray Train workers, whose working directory is elsewhere.

Checkpoints logged to MLflow (pretraining logs the final one as ``runs:/<run id>/final_checkpoint``)
are fetched by :func:`local_checkpoint` into a cache, once, under a temporary name renamed when
complete, so serving replicas and embedding actors on one machine share one verified download.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.parse
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

__all__ = [
    "MLFLOW_SCHEMES",
    "TrackingTarget",
    "default_tracking_uri",
    "flatten_params",
    "local_checkpoint",
    "resolve_tracking",
]

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


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
    uri = default_tracking_uri(base)
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


def default_tracking_uri(workdir: str | os.PathLike[str] | None = None) -> str:
    """``$MLFLOW_TRACKING_URI``, else the local store ``sqlite:///<workdir or cwd>/mlflow.db``.

    A local store the variable names by a relative path (``sqlite:///mlflow.db``, ``file:mlruns``,
    ``./mlruns``) is made absolute against the working directory: Ray workers, which run
    elsewhere, would otherwise each open a store of their own.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path(workdir or os.getcwd()).resolve() / 'mlflow.db'}"
    return _absolute_store(uri)


def _absolute_store(uri: str) -> str:
    """``uri`` with a relative local path (of a sqlite file, a ``file:`` URI or a bare path) made
    absolute; any other URI as it is."""
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        relative = path and not path.startswith(("/", ":"))  # not absolute, not ":memory:"
        return f"sqlite:///{os.path.abspath(path)}" if relative else uri
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file" and not parsed.netloc and not parsed.path.startswith("/"):
        return Path(os.path.abspath(parsed.path)).as_uri()
    if not parsed.scheme and uri != "databricks":  # a path, as MLflow reads one
        return os.path.abspath(os.path.expanduser(uri))
    return uri


def local_checkpoint(
    source: str | os.PathLike[str],
    *,
    tracking_uri: str | None = None,
    cache_dir: str | os.PathLike[str] = "~/.cache/jin/checkpoints",
) -> Path:
    """A checkpoint directory on local disk, from a path or an MLflow artifact URI.

    ``source`` is a directory, or ``runs:/RUN_ID/final_checkpoint`` (what pretraining logs),
    ``models:/NAME/VERSION`` or ``mlflow-artifacts:/...``; those are downloaded with
    ``tracking_uri`` (default: :func:`default_tracking_uri`) into ``cache_dir``, keyed by store
    and URI, and reused by later calls (so name a fixed model version, not ``latest``).
    """
    text = str(source)
    if not text.startswith(MLFLOW_SCHEMES):
        path = Path(text).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"checkpoint {text!r} is neither a directory nor an MLflow URI "
                f"({', '.join(s + '...' for s in MLFLOW_SCHEMES)})"
            )
        return path
    uri = tracking_uri or default_tracking_uri()
    key = hashlib.sha256(f"{uri}\n{text}".encode()).hexdigest()[:16]
    final = Path(cache_dir).expanduser() / key
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{key}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        try:
            fetched = mlflow.artifacts.download_artifacts(
                artifact_uri=text, dst_path=str(tmp), tracking_uri=uri
            )
        except Exception as exc:  # MLflow raises several types; all mean "not fetched"
            raise FileNotFoundError(
                f"cannot download checkpoint {text!r} from {uri}: {exc}"
            ) from exc
        try:
            os.replace(fetched, final)
        except OSError:
            if not final.is_dir():  # another process renamed its own copy first: use that
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


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
