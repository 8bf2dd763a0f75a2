"""Serving under faults: a seeded mix of good and bad requests, one model replica killed midway.

    python benchmarks/serve_faults.py --json benchmarks/results/serve_faults.json

This process starts a private Ray on loopback and the application (``jin_orchestrate.serve``)
with two model replicas, then a separate client process on loopback sends ``--requests``
(10,000) requests at concurrency ``--clients`` (64) through the retrying
`jin_orchestrate.serving.client.AsyncEmbeddingClient`. About a third are bad, of the kinds in
``BAD`` (malformed JSON, unknown modality, undecodable or non-base64 media, a path where bytes
belong, an unknown field naming a file, too many items, and a body over ``max_request_bytes`` on
every POST route of the app); the rest are good embedding and similarity requests of every
modality. When half the requests are answered, one model replica (a descendant process of this
one, found by its process title) is killed with SIGKILL; after the run, once Serve has replaced
it, 32 good requests are sent again (``answered_after_restart``).

Reported: for each kind, requests and the statuses they ended with; 5xx answers to bad requests
(the goal: 0); good requests answered, failed cleanly (an HTTP status after the client's retries)
or unanswered; requests retried; anything still open when the client's deadline passed (hung).
The checkpoint is ``--preset`` at random initialisation (seed 0).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

GOOD = ("text", "image", "audio", "points", "similarity")
BAD = (
    "malformed_json",
    "unknown_modality",
    "not_base64",
    "undecodable_image",
    "undecodable_audio",
    "path_as_image",
    "unknown_field_path",
    "too_many_items",
    "oversize_body",
)
MAX_REQUEST_BYTES = 64 * 1024
MAX_ITEMS = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(rng) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype="uint8")).save(out, "PNG")
    return out.getvalue()


def _wav(rng) -> bytes:
    import soundfile

    out = io.BytesIO()
    wave = rng.normal(0, 0.1, 4000).astype("float32")
    soundfile.write(out, wave, 16000, format="WAV", subtype="PCM_16")
    return out.getvalue()


def make_requests(n: int, seed: int, post_routes: list[str]) -> list[dict]:
    """``n`` requests (route, kind, body as text), a third of them bad, drawn with ``seed``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    media = {
        "image": [b64(_png(rng)) for _ in range(4)],
        "audio": [b64(_wav(rng)) for _ in range(4)],
    }

    def item(modality: str) -> dict:
        if modality == "text":
            return {"modality": "text", "data": f"the number {int(rng.integers(0, 100))}"}
        if modality == "points":
            return {"modality": "points", "data": rng.normal(size=(64, 3)).round(4).tolist()}
        return {"modality": modality, "data": media[modality][int(rng.integers(0, 4))]}

    requests = []
    for i in range(n):
        route, kind = "/v1/embed", None
        if rng.random() < 1 / 3:
            kind = BAD[int(rng.integers(0, len(BAD)))]
            body = {
                "unknown_modality": {"items": [{"modality": "smell", "data": "roses"}]},
                "not_base64": {"items": [{"modality": "image", "data": "%%% not base64 %%%"}]},
                "undecodable_image": {"items": [{"modality": "image", "data": b64(b"\x89PNG..")}]},
                "undecodable_audio": {"items": [{"modality": "audio", "data": b64(b"RIFFjunk")}]},
                "path_as_image": {"items": [{"modality": "image", "data": "/etc/passwd"}]},
                "unknown_field_path": {"items": [item("text")], "checkpoint": "/etc/passwd"},
                "too_many_items": {"items": [item("text") for _ in range(MAX_ITEMS + 1)]},
                "oversize_body": {"items": [{"modality": "text", "data": "x" * MAX_REQUEST_BYTES}]},
            }.get(kind)
            if kind == "oversize_body":  # on every POST route in turn, named in the kind
                route = post_routes[i % len(post_routes)]
                kind = f"{kind}:{route}"
            text = "{not json" if kind == "malformed_json" else json.dumps(body)
        else:
            kind = GOOD[int(rng.integers(0, len(GOOD)))]
            if kind == "similarity":
                route = "/v1/similarity"
                body = {"queries": [item("text")], "candidates": [item("image"), item("audio")]}
            else:
                body = {"items": [item(kind)]}
            text = json.dumps(body)
        requests.append({"index": i, "route": route, "kind": kind, "body": text})
    return requests


async def _client(url: str, requests: list[dict], clients: int, deadline_s: float, out: Path):
    """The client process: every request through the retrying client; one JSON line each."""
    from jin_orchestrate.serving.client import AsyncEmbeddingClient, RequestFailed, RetryPolicy

    policy = RetryPolicy(attempts=8, backoff_s=0.25, max_backoff_s=4.0, timeout_s=60.0, seed=0)
    queue = iter(requests)
    done = 0
    results = []
    limits = {"max_connections": clients, "max_keepalive_connections": clients}
    import httpx

    async with AsyncEmbeddingClient(url, policy, limits=httpx.Limits(**limits)) as client:

        async def worker() -> None:
            nonlocal done
            for request in queue:
                start = time.perf_counter()
                record = {"index": request["index"], "kind": request["kind"]}
                try:
                    answer = await client.post(request["route"], request["body"].encode())
                    record.update(status=answer.response.status_code, attempts=answer.attempts)
                except RequestFailed as exc:
                    record.update(status=None, attempts=exc.attempts, error=str(exc)[:200])
                record["latency_s"] = round(time.perf_counter() - start, 4)
                record["finished_at"] = time.time()
                results.append(record)
                done += 1
                if done % 50 == 0:
                    print(f"progress {done}", flush=True)

        tasks = [asyncio.create_task(worker()) for _ in range(clients)]
        _, pending = await asyncio.wait(tasks, timeout=deadline_s)
        for task in pending:
            task.cancel()
    out.write_text("\n".join(json.dumps(r) for r in results) + "\n")
    print(f"finished {len(results)}", flush=True)


def _descendants(root: int) -> list[int]:
    """PIDs of every process below ``root`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def model_replica_pids() -> list[int]:
    """PIDs of this process's own Embedder replicas (Ray titles them ``ray::ServeReplica:...``)."""
    pids = []
    for pid in _descendants(os.getpid()):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "ServeReplica" in title and "Embedder" in title:
            pids.append(pid)
    return sorted(pids)


def summarise(results: list[dict], requests: list[dict], killed: list[int]) -> dict:
    """Outcome counts by kind, and the totals the fault test asserts."""
    by_kind: dict[str, Counter] = {}
    for r in results:
        by_kind.setdefault(r["kind"], Counter())[str(r["status"])] += 1
    bad = [r for r in results if r["kind"].split(":")[0] in BAD]
    good = [r for r in results if r["kind"] in GOOD]
    return {
        "requests": len(requests),
        "finished": len(results),
        "hung": len(requests) - len(results),
        "replicas_killed": len(killed),
        "bad": len(bad),
        "bad_4xx": sum(1 for r in bad if r["status"] and 400 <= r["status"] < 500),
        "bad_5xx": sum(1 for r in bad if r["status"] and r["status"] >= 500),
        "good": len(good),
        "good_answered": sum(1 for r in good if r["status"] == 200),
        "good_failed_cleanly": sum(1 for r in good if r["status"] in (502, 503, 504)),
        "good_other": sum(1 for r in good if r["status"] not in (200, 502, 503, 504)),
        "retried": sum(1 for r in results if r["attempts"] > 1),
        "max_attempts": max((r["attempts"] for r in results), default=0),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
    }


def run(args: argparse.Namespace) -> dict:
    """Start the service, drive it from a client process, kill a replica midway; the summary."""
    import httpx
    import ray
    from ray import serve

    from jin_orchestrate.cluster import init_ray
    from jin_orchestrate.serve import start
    from jin_orchestrate.serving import ServeConfig
    from jin_orchestrate.serving.app import app
    from jin_orchestrate.serving.client import EmbeddingClient, RetryPolicy

    # Every POST route the app documents (Serve moves the class's routes into a sub-router).
    post_routes = sorted(p for p, ops in app.openapi()["paths"].items() if "post" in ops)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sys.path.insert(0, str(Path(__file__).parent))
        from serve import make_checkpoint

        checkpoint = make_checkpoint(args.preset, tmp)
        requests = make_requests(args.requests, args.seed, post_routes)
        (tmp / "requests.json").write_text(json.dumps(requests))
        init_ray(None, extra_cpus=2)
        cfg = ServeConfig(
            checkpoint=str(checkpoint),
            max_items=MAX_ITEMS,
            max_request_bytes=MAX_REQUEST_BYTES,
            model={"num_replicas": 2, "ray_actor_options": {"num_cpus": 1}},
        )
        url = start(cfg, port=_free_port())
        killed: list[int] = []
        killed_at = float("inf")
        try:
            assert httpx.get(f"{url}/healthz", timeout=60).status_code == 200
            replicas = model_replica_pids()
            if len(replicas) != 2:
                raise RuntimeError(f"expected 2 model replica processes, found {replicas}")
            client = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--client",
                    url,
                    str(tmp / "requests.json"),
                    str(tmp / "results.jsonl"),
                    "--clients",
                    str(args.clients),
                    "--deadline-s",
                    str(args.deadline_s),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            kill_at = args.requests // 2
            started = time.perf_counter()
            for line in client.stdout:
                if line.startswith("progress") and not killed and int(line.split()[1]) >= kill_at:
                    os.kill(replicas[0], signal.SIGKILL)
                    killed.append(replicas[0])
                    killed_at = time.time()
                    print(f"killed model replica pid {replicas[0]} after {kill_at} requests")
            client.wait(timeout=args.deadline_s + 120)
            wall = time.perf_counter() - started
            results = [json.loads(x) for x in (tmp / "results.jsonl").read_text().splitlines()]
            after = [r for r in results if r["finished_at"] > killed_at + 30]
            # Serve replaces the killed replica; then good requests must be answered again.
            restart_deadline = time.monotonic() + 180
            while len(model_replica_pids()) < 2 and time.monotonic() < restart_deadline:
                time.sleep(1)
            restarted = [p for p in model_replica_pids() if p not in replicas]
            healthy = httpx.get(f"{url}/healthz", timeout=60).status_code
            with EmbeddingClient(url, RetryPolicy(seed=0)) as check:
                good_after = [r for r in requests if r["kind"] in GOOD][:32]
                answered_after_restart = sum(
                    check.post(r["route"], r["body"].encode()).response.status_code == 200
                    for r in good_after
                )
        finally:
            serve.shutdown()
            ray.shutdown()
    summary = summarise(results, requests, killed)
    summary.update(
        replicas_before=len(replicas),
        replica_restarted=len(restarted),
        healthz_after=healthy,
        answered_after_restart=answered_after_restart,
        good_answered_30s_after_kill=sum(
            1 for r in after if r["kind"] in GOOD and r["status"] == 200
        ),
        wall_s=round(wall, 1),
        rps=round(len(results) / wall, 1),
        clients=args.clients,
        preset=args.preset,
        seed=args.seed,
        cpus=os.cpu_count(),
        load_1min=round(os.getloadavg()[0], 2),
    )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="jin-test")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline-s", type=float, default=1800.0, help="the client's, in all")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--client", nargs=3, metavar=("URL", "REQUESTS", "RESULTS"))
    args = parser.parse_args()
    if args.client is not None:
        url, requests, results = args.client
        asyncio.run(
            _client(
                url,
                json.loads(Path(requests).read_text()),
                args.clients,
                args.deadline_s,
                Path(results),
            )
        )
        return
    summary = run(args)
    print(json.dumps({k: v for k, v in summary.items() if k != "by_kind"}, indent=2))
    print("| kind | requests | final statuses |")
    print("| --- | ---: | --- |")
    for kind, statuses in summary["by_kind"].items():
        shown = ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items()))
        print(f"| {kind} | {sum(statuses.values())} | {shown} |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
