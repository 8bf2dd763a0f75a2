"""``python -m jin_orchestrate.serve``: the embedding service, started locally on 127.0.0.1.

Starts a private Ray on loopback (or joins ``--ray-address`` / ``$RAY_ADDRESS``), runs the Serve
application of `jin_orchestrate.serving.app` and keeps it up until Ctrl-C. ``--config`` takes the
same Serve config file as ``serve run`` / ``serve deploy`` (its application's ``args`` and its
``http_options``) or a plain mapping of `ServeConfig` keys; ``--checkpoint`` and ``--set`` go on
top, so ``python -m jin_orchestrate.serve --checkpoint runs:/RUN_ID/final_checkpoint`` is enough.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from jin_orchestrate.overrides import add_override_argument

__all__ = ["load_serve_config", "main", "start"]

APP_NAME = "jin"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jin_orchestrate.serve",
        description="Serve Jin embeddings over HTTP with Ray Serve (FastAPI, @serve.batch).",
    )
    p.add_argument(
        "--checkpoint",
        help="checkpoint directory or MLflow URI, e.g. runs:/RUN_ID/final_checkpoint "
        "(required unless the config names one)",
    )
    p.add_argument(
        "--config",
        type=Path,
        help="Serve config file (as for `serve run`) or a YAML/JSON mapping of ServeConfig keys",
    )
    add_override_argument(
        p, "override one ServeConfig key, e.g. --set max_batch_size=8 (repeatable)"
    )
    p.add_argument("--host", help="HTTP address (default: the config's, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default: the config's, else 8000)")
    p.add_argument(
        "--ray-address",
        help="Ray cluster to join (default: $RAY_ADDRESS, else a new local Ray)",
    )
    return p


def load_serve_config(
    path: Path | None, checkpoint: str | None, overrides: list[str]
) -> tuple[Any, dict[str, Any]]:
    """``(ServeConfig, http_options)`` from a config file, ``--checkpoint`` and ``--set``."""
    from jin_orchestrate.overrides import apply_overrides, load_mapping
    from jin_orchestrate.serving import ServeConfig

    data: dict[str, Any] = load_mapping(path) if path is not None else {}
    http: dict[str, Any] = {}
    if "applications" in data:  # a Serve config file: take its Jin application's args
        apps = data["applications"] or []
        app = next((a for a in apps if a.get("name") == APP_NAME), apps[0] if apps else None)
        if app is None:
            raise ValueError(f"config file {path}: 'applications' is empty")
        http = dict(data.get("http_options") or {})
        data = dict(app.get("args") or {})
    if checkpoint is not None:
        data["checkpoint"] = checkpoint
    data = apply_overrides(data, overrides)
    if "checkpoint" not in data:
        raise ValueError("no checkpoint: pass --checkpoint PATH_OR_URI (or set it in --config)")
    return ServeConfig.model_validate(data), http


def _listen_problem(host: str, port: int) -> str | None:
    """Why the service could not listen on ``host:port`` on this machine, or None.

    Checked before Ray starts: Serve's proxy otherwise fails there after its retries (about 20
    s), and the CLI ended in Ray's traceback.
    """
    if not 0 < port < 2**16:
        return f"port {port} is not a TCP port (1-65535)"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
            probe.bind(address)
    except OSError as exc:
        return f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port"
    return None


def start(cfg: Any, *, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Run the application on the connected Ray; returns its base URL once it answers."""
    from ray import serve

    from jin_orchestrate.serving.app import build_app

    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def main(argv: list[str] | None = None) -> int:
    """Parse flags, start Ray and the application, serve until interrupted."""
    from jin_orchestrate.inference import ModelCard
    from jin_orchestrate.tracking import MLFLOW_SCHEMES, default_tracking_uri, local_checkpoint

    args = _parser().parse_args(argv)
    try:
        cfg, http = load_serve_config(args.config, args.checkpoint, args.overrides)
        if cfg.checkpoint.startswith(MLFLOW_SCHEMES) and cfg.mlflow_tracking_uri is None:
            # Replicas run in other directories: resolve the local store here, where the user is.
            cfg.mlflow_tracking_uri = default_tracking_uri()
        # Fail here, with the reason, rather than in a replica: fetched and verified once.
        path = local_checkpoint(cfg.checkpoint, tracking_uri=cfg.mlflow_tracking_uri)
        card = ModelCard.from_checkpoint(path, cfg.checkpoint)
        host = args.host or http.get("host") or "127.0.0.1"
        port = args.port or int(http.get("port") or 8000)
        # Only where the Ray started here serves it: a cluster's proxies listen on its nodes.
        problem = (
            None if args.ray_address or "RAY_ADDRESS" in os.environ else _listen_problem(host, port)
        )
        if problem is not None:
            raise ValueError(problem)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from jin_orchestrate.cluster import init_ray, prefer_loopback

    prefer_loopback(args.ray_address)
    from ray import serve

    init_ray(args.ray_address)
    # After ray.init, whose own SIGTERM handler aborts the process: stop cleanly instead, also
    # when the signal comes while the application is still starting.
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(
        f"[jin] starting the service for {cfg.checkpoint} (version {card.version}, "
        f"{', '.join(m.name for m in card.modalities)})...",
        flush=True,
    )
    url = start(cfg, host=host, port=port)
    print(
        f"[jin] serving at {url} (API docs {url}/docs); max_batch_size={cfg.max_batch_size}, "
        f"batch_wait_timeout_s={cfg.batch_wait_timeout_s}. Ctrl-C stops.",
        flush=True,
    )
    while not stop.wait(timeout=1.0):
        pass
    print("[jin] shutting down", flush=True)
    serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
