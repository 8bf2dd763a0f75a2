"""The private Ray that entry points start when no cluster is given, in a fresh interpreter."""

import json
import os
import subprocess
import sys

import pytest

_PROBE = """
import json, os
from jin_orchestrate.cluster import init_ray
init_ray(None)
import ray
from ray.util.state import get_actor

@ray.remote(num_cpus=0)
class Probe:
    def api_server(self):
        return os.environ.get("RAY_API_SERVER_ADDRESS")

    def actor_id(self):
        return ray.get_runtime_context().get_actor_id()

probe = Probe.remote()
api_in_worker = ray.get(probe.api_server.remote())
state = get_actor(ray.get(probe.actor_id.remote()), address=api_in_worker, timeout=30)
print(json.dumps({
    "gcs": ray.get_runtime_context().gcs_address,
    "nodes": sorted({n["NodeManagerAddress"] for n in ray.nodes()}),
    "api_in_worker": api_in_worker,
    "driver_env": {k: os.environ.get(k) for k in (
        "RAY_API_SERVER_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    )},
    "actor_state": state.state if state else None,
}))
ray.shutdown()
"""


@pytest.mark.slow
def test_private_ray_is_on_loopback_and_workers_reach_the_state_api(tmp_path):
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    }
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    run = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    banner = "[jin] local Ray started; dashboard at "
    (dashboard,) = [line[len(banner) :] for line in run.stdout.splitlines() if banner in line]
    assert dashboard.startswith("http://127.0.0.1:"), dashboard
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["gcs"].startswith("127.0.0.1:"), found
    assert found["nodes"] == ["127.0.0.1"], found
    # Workers (where Ray Train's placement-group cleaner runs) find the State API without
    # looking for a cluster file: what made each training stage print a traceback.
    assert found["api_in_worker"] == dashboard, found
    assert found["actor_state"] == "ALIVE", found
    # Nothing leaks into the driver's environment, where RAY_API_SERVER_ADDRESS would override
    # the address of a job client started from it later (`ray job submit --address ...`).
    assert found["driver_env"] == {
        "RAY_API_SERVER_ADDRESS": None,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": None,
    }, found


def test_prefer_loopback_only_when_no_cluster_is_named_and_ray_is_not_imported(monkeypatch):
    from jin_orchestrate import cluster
    from jin_orchestrate.cluster import prefer_loopback

    monkeypatch.setattr(cluster, "_flag_set_here", False)
    flag = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    monkeypatch.delenv(flag, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    prefer_loopback("10.0.0.5:6379")  # a driver joining a cluster keeps a reachable address
    assert flag not in os.environ
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    prefer_loopback(None)
    assert flag not in os.environ
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setitem(sys.modules, "ray", object())  # too late: Ray has read it already
    prefer_loopback(None)
    assert flag not in os.environ
    monkeypatch.delitem(sys.modules, "ray")
    prefer_loopback(None)
    assert os.environ[flag] == "0"
    cluster._forget_loopback_flag()  # what init_ray does once Ray has read it
    assert flag not in os.environ


def test_the_dashboard_port_is_never_one_ray_takes_by_default(monkeypatch):
    from jin_orchestrate import cluster

    handed_out = iter([52365, 6379, 40123])  # what the OS assigns to each bind to port 0

    class FakeSocket:
        def __init__(self, *args):
            self.port = next(handed_out)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            assert address == ("127.0.0.1", 0)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(cluster.socket, "socket", FakeSocket)
    assert cluster._free_loopback_port() == 40123
