"""Serving and batch embedding as users start them: the CLIs, and ``serve deploy`` of the config.

Each test runs real processes: ``python -m jin_orchestrate.serve`` (its own Ray on loopback),
``serve deploy packages/jin-orchestrate/serve_config.yaml`` onto a Ray head, and ``python -m
jin_orchestrate.embed``. Every process is stopped through its own PID.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
SERVE = str(Path(sys.executable).with_name("serve"))


def _wait_healthy(url: str, process: subprocess.Popen | None = None, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}: {process.stdout.read()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{url}/healthz did not answer within {timeout} s")


def _embed_one(url: str) -> dict:
    response = httpx.post(
        f"{url}/v1/embed",
        json={"items": [{"modality": "text", "data": "the number 42"}]},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_python_m_serve_starts_on_loopback_and_stops_on_sigterm(checkpoint, http_port, tmp_path):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jin_orchestrate.serve",
            "--checkpoint",
            str(checkpoint),
            "--port",
            str(http_port),
            "--set",
            "max_batch_size=4",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{http_port}"
    try:
        _wait_healthy(url, process)
        assert len(_embed_one(url)["data"][0]["embedding"]) == 32
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert process.returncode == 0, output[-4000:]
    assert f"serving at {url}" in output and "shutting down" in output


def test_serve_deploy_of_the_config_file_on_a_ray_head(ray_head, checkpoint, http_port, tmp_path):
    address, env = ray_head
    config = yaml.safe_load((ROOT / "packages/jin-orchestrate/serve_config.yaml").read_text())
    config["http_options"]["port"] = http_port
    config["applications"][0]["args"]["checkpoint"] = str(checkpoint)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    deploy = subprocess.run(
        [SERVE, "deploy", str(path), "--address", address],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    url = f"http://127.0.0.1:{http_port}"
    try:
        _wait_healthy(url)
        assert (
            _embed_one(url)["model_version"] == httpx.get(f"{url}/healthz").json()["model_version"]
        )
    finally:
        subprocess.run(
            [SERVE, "shutdown", "-y", "--address", address],
            env=env,
            capture_output=True,
            timeout=120,
        )


def test_python_m_embed_writes_one_output_per_shard(checkpoint, numberworld_url, tmp_path):
    out = tmp_path / "embeddings"
    command = [
        sys.executable,
        "-m",
        "jin_orchestrate.embed",
        "--checkpoint",
        str(checkpoint),
        "--input",
        numberworld_url,
        "--output",
        str(out),
        "--modalities",
        "text,points",
    ]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    inputs = sorted(p.name for p in Path(numberworld_url).glob("*.parquet"))
    assert sorted(p.name for p in out.iterdir()) == inputs
    table = pq.read_table(out / inputs[0])
    assert table.column_names == ["id", "split", "label", "text_embedding", "points_embedding"]
    assert "[jin] done:" in run.stdout
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert f"{len(inputs)} of {len(inputs)} shards already embedded" in again.stdout
