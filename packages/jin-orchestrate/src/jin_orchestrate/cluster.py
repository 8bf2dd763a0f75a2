"""Joining a Ray cluster, or starting a private one on loopback; whether it has GPUs.

Every entry point (pretraining, serving, batch embedding) connects the same way: to
``--ray-address`` or ``$RAY_ADDRESS`` (which ``ray job submit`` sets) when given, else to a new
Ray started here.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["init_ray", "use_gpu"]


def init_ray(
    address: str | None = None, *, extra_cpus: int = 0, runtime_env: dict[str, Any] | None = None
) -> None:
    """Connect to ``address`` (or ``$RAY_ADDRESS``), else start Ray here with ``extra_cpus``.

    A Ray started here serves this machine alone, so it is kept on loopback; and ``"local"`` is
    passed explicitly so a stale or unrelated cluster on the machine is never joined by accident.
    ``extra_cpus`` adds logical CPUs beyond the cores, for jobs whose actors each hold one CPU
    while Ray Data's tasks still need some. ``runtime_env`` is this job's (Ray merges it into
    the one a submitted job already has).
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address is not None:
        ray.init(
            address=address,
            include_dashboard=False,
            configure_logging=False,
            runtime_env=runtime_env,
        )
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(
        address="local",
        num_cpus=(os.cpu_count() or 1) + extra_cpus,
        include_dashboard=False,
        configure_logging=False,
        runtime_env=runtime_env,
    )


def use_gpu(requested: bool | None) -> bool:
    """``requested``, or (when None) whether the connected cluster has a GPU."""
    import ray

    if requested is not None:
        return requested
    return ray.cluster_resources().get("GPU", 0) > 0
