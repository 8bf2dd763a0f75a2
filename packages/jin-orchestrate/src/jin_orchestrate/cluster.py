"""Joining a Ray cluster, or starting a private one on loopback; whether it has GPUs.

Every entry point (pretraining, serving, batch embedding) connects the same way: to
``--ray-address`` or ``$RAY_ADDRESS`` (which ``ray job submit`` sets) when given, else to a new
Ray started here.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

__all__ = ["init_ray", "prefer_loopback", "use_gpu"]

_LOOPBACK_FLAG = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_flag_set_here = False  # whether prefer_loopback set the flag (init_ray removes it once read)
# Ports a local Ray takes by default whatever else it is told (GCS, dashboard, client server,
# dashboard agent); the last lies in Linux's ephemeral range, so a port the OS hands out can be it,
# and Ray then refuses to start ("port ... used by other components").
_RAY_DEFAULT_PORTS = frozenset({6379, 8265, 10001, 52365})


def init_ray(
    address: str | None = None, *, extra_cpus: int = 0, runtime_env: dict[str, Any] | None = None
) -> None:
    """Connect to ``address`` (or ``$RAY_ADDRESS``), else start Ray here with ``extra_cpus``.

    A Ray started here serves this machine alone, so its node address is 127.0.0.1 and its
    servers (GCS, raylet, workers, dashboard) listen on loopback only, provided Ray was first
    imported after `prefer_loopback` (every ``python -m jin_orchestrate...`` entry point calls it
    first); otherwise the node takes the machine's address, behind Ray's token authentication.
    ``"local"`` is passed explicitly so a stale or unrelated cluster on the machine is never
    joined by accident. The dashboard runs (its URL is printed) and ``RAY_API_SERVER_ADDRESS``,
    in the job's ``runtime_env`` (not this process's environment, where it would override the
    address of any job client started from here later), points every worker at its State API,
    which Ray Train's placement-group cleaner polls; without them the cleaner's thread printed
    a traceback in every training stage.
    ``extra_cpus`` adds logical CPUs beyond the cores, for jobs whose actors each hold one CPU
    while Ray Data's tasks still need some. ``runtime_env`` is this job's (Ray merges it into
    the one a submitted job already has).
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if address is not None:
        import ray

        ray.init(
            address=address,
            include_dashboard=False,
            configure_logging=False,
            runtime_env=runtime_env,
        )
        return
    prefer_loopback(None)
    import ray

    # Ray has read the flag; subprocesses started from here later (another `ray start`) should not.
    _forget_loopback_flag()
    port = _free_loopback_port()
    api_server = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    env_vars = {**(runtime_env or {}).get("env_vars", {}), **api_server}
    context = ray.init(
        address="local",
        num_cpus=(os.cpu_count() or 1) + extra_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        configure_logging=False,
        runtime_env={**(runtime_env or {}), "env_vars": env_vars},
    )
    print(f"[jin] local Ray started; dashboard at http://{context.dashboard_url}", flush=True)


def prefer_loopback(address: str | None) -> None:
    """Call before Ray is first imported: a Ray that `init_ray` starts later binds to 127.0.0.1.

    Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, at import; at "0" a node started in this
    process takes the loopback address. Nothing changes when a cluster is named (``address`` or
    ``$RAY_ADDRESS``: a driver joining one must advertise a reachable address), when Ray is
    already imported, or when the variable is already set.
    """
    global _flag_set_here
    no_cluster = (address or os.environ.get("RAY_ADDRESS")) is None
    if no_cluster and "ray" not in sys.modules and _LOOPBACK_FLAG not in os.environ:
        os.environ[_LOOPBACK_FLAG] = "0"
        _flag_set_here = True


def _forget_loopback_flag() -> None:
    global _flag_set_here
    if _flag_set_here:
        os.environ.pop(_LOOPBACK_FLAG, None)
        _flag_set_here = False


def _free_loopback_port(avoid: frozenset[int] = _RAY_DEFAULT_PORTS) -> int:
    """A loopback port free now and not one of ``avoid``."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in avoid:
            return port


def use_gpu(requested: bool | None) -> bool:
    """``requested``, or (when None) whether the connected cluster has a GPU."""
    import ray

    if requested is not None:
        return requested
    return ray.cluster_resources().get("GPU", 0) > 0
