"""Shared fixtures of the integration tests: a NumberWorld corpus, a checkpoint, a Ray head.

The head is started on 127.0.0.1 with token authentication on (a token file private to the test)
and stopped through its own PID: ``ray start --block`` tears its processes down on SIGTERM, so
nothing else on the machine is touched.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="session")
def numberworld_url(tmp_path_factory) -> str:
    """200 NumberWorld samples (seed 0), generated once per test session."""
    from jin_data.numberworld import generate_numberworld

    root = tmp_path_factory.mktemp("numberworld")
    url = str(root / "nw")
    generate_numberworld(url, 200, 0, progress=False, cache_dir=str(root))
    return url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_port() -> int:
    """A TCP port free on loopback right now."""
    return _free_port()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained jin-test checkpoint (seed 0)."""
    import torch

    from jin_orchestrate.checkpoint import save_checkpoint
    from jin_orchestrate.config import load_config
    from jin_orchestrate.model import JinModel

    torch.manual_seed(0)
    cfg = load_config("jin-test")
    path = tmp_path_factory.mktemp("checkpoint") / "ckpt"
    return save_checkpoint(path, JinModel(cfg.model), config=cfg.model_dump(mode="json"), state={})


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on loopback; yields its dashboard address and the environment with its token."""
    token = tmp_path / "ray_token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        # Keep every Ray endpoint on loopback (Ray otherwise advertises the host's own address).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    gcs_port, dash_port, agent_port = _free_port(), _free_port(), _free_port()
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(gcs_port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash_port),
            # Not the fixed default (52365): any other Ray on the machine holds that one, and
            # this head's job agent then cannot start ("No available agent to submit job").
            "--dashboard-agent-listen-port",
            str(agent_port),
            "--num-cpus",
            "2",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    address = f"http://127.0.0.1:{dash_port}"
    # Ready when a job can be submitted: `ray job list` answers before the node's job agent.
    probe_job = [RAY, "job", "submit", "--no-wait", "--address", address, "--", "true"]
    try:
        deadline = time.monotonic() + 120
        while True:
            probe = subprocess.run(probe_job, env=env, capture_output=True, text=True)
            if probe.returncode == 0:
                break
            if head.poll() is not None or time.monotonic() > deadline:
                head.kill()  # else reading its output would wait for a head that never exits
                raise RuntimeError(
                    f"Ray head did not come up: {probe.stderr[-2000:]}\n{head.communicate()[0]}"
                )
            time.sleep(2)
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
