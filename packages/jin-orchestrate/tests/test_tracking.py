"""Where MLflow runs go: the store the driver resolves is the one every worker opens, from
whatever working directory it runs in."""

import pytest

from jin_orchestrate.tracking import default_tracking_uri


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite:///mlflow.db", "sqlite:///{cwd}/mlflow.db"),
        ("sqlite:///./runs/mlflow.db", "sqlite:///{cwd}/runs/mlflow.db"),
        ("file:mlruns", "file://{cwd}/mlruns"),
        ("./mlruns", "{cwd}/mlruns"),
        ("sqlite:////srv/mlflow.db", "sqlite:////srv/mlflow.db"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("file:///srv/mlruns", "file:///srv/mlruns"),
        ("/srv/mlruns", "/srv/mlruns"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("databricks", "databricks"),
    ],
)
def test_a_relative_local_store_in_the_environment_is_made_absolute(
    given, expected, monkeypatch, tmp_path
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", given)
    assert default_tracking_uri() == expected.format(cwd=tmp_path.resolve())
