"""Serving throughput and latency, with @serve.batch batching on and off, over HTTP on loopback.

    python benchmarks/serve.py --json benchmarks/results/serve.json [--preset jin-tiny]

For each case the service runs as its own process (``python -m jin_orchestrate.serve``, a private
Ray on this machine) and this process drives it as the client: ``--clients`` concurrent
connections (32) send ``--requests`` requests (2,000) of one item each, drawn with a fixed seed
from NumberWorld samples in an equal mix of text, image (64x64 PNG), audio (WAV, about 1 s) and
points (256); requests are serialised before the clock starts. Cases: batching on
(``max_batch_size`` 32) and off (``max_batch_size`` 1), same everything else. Reported per case:
requests/s over the whole run, p50 and p99 latency, errors (non-200 answers and failed
connections), and the mean number of requests per forward pass (``X-Jin-Batch-Requests``).
The checkpoint is the preset at random initialisation (seed 0): speed does not depend on training.

Also measured, in this process with one torch thread as in the model replica: the model's own
time per item, embedding each alone against ``--max-batch-size`` of them in one pass, for each
modality. Its ratio bounds what batching can gain end to end, whatever the serving overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODALITIES = ("text", "image", "audio", "points")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_checkpoint(preset: str, directory: Path) -> Path:
    """The preset at random initialisation (seed 0), saved as a checkpoint."""
    import torch

    from jin_orchestrate.checkpoint import save_checkpoint
    from jin_orchestrate.config import load_config
    from jin_orchestrate.model import JinModel

    torch.manual_seed(0)
    cfg = load_config(preset)
    return save_checkpoint(
        directory / "ckpt", JinModel(cfg.model), config=cfg.model_dump(mode="json"), state={}
    )


def make_bodies(requests: int, seed: int, directory: Path) -> list[tuple[str, bytes]]:
    """``requests`` JSON bodies of one NumberWorld item each, modality drawn with ``seed``."""
    import numpy as np
    import pyarrow.parquet as pq

    from jin_data import list_shards
    from jin_data.numberworld import generate_numberworld

    url = str(directory / "nw")
    # jin-data's speech cache: speech/ under $JIN_DATA_CACHE or ~/.cache/jin_data
    generate_numberworld(url, 64, seed, progress=False)
    fs, shards = list_shards(url)
    with fs.open(shards[0].path, "rb") as f:
        rows = pq.read_table(f).to_pylist()
    rng = np.random.default_rng(seed)
    bodies = []
    for modality, row in zip(
        rng.choice(MODALITIES, requests), rng.integers(0, len(rows), requests), strict=True
    ):
        sample = rows[int(row)]
        data = {
            "text": lambda s: s["text"],
            "image": lambda s: base64.b64encode(s["image"]).decode(),
            "audio": lambda s: base64.b64encode(s["audio"]["bytes"]).decode(),
            "points": lambda s: s["points"],
        }[str(modality)](sample)
        body = {"items": [{"modality": str(modality), "data": data}]}
        bodies.append((str(modality), json.dumps(body).encode()))
    return bodies


async def drive(url: str, bodies: list[tuple[str, bytes]], clients: int) -> dict[str, float]:
    """Send every body with ``clients`` concurrent connections; latency and outcome of each."""
    import httpx

    latencies: list[float] = []
    batches: list[int] = []
    errors = 0
    queue = iter(bodies)
    headers = {"content-type": "application/json"}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            nonlocal errors
            for _, body in queue:
                start = time.perf_counter()
                try:
                    response = await client.post("/v1/embed", content=body, headers=headers)
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)
                if response.status_code != 200:
                    errors += 1
                else:
                    batches.append(int(response.headers["X-Jin-Batch-Requests"]))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - started
    latencies.sort()
    return {
        "rps": len(bodies) / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "errors": errors,
        "mean_batch_requests": statistics.fmean(batches) if batches else 0.0,
        "wall_s": wall,
    }


def model_only(
    checkpoint: Path, bodies: list[tuple[str, bytes]], batch: int
) -> list[dict[str, object]]:
    """Milliseconds per item of the model alone, one item per pass against ``batch`` per pass."""
    import pyarrow as pa
    import torch

    from jin_orchestrate.inference import EmbeddingModel, card_decoder
    from jin_orchestrate.serving.api import Item, Limits
    from jin_orchestrate.serving.items import items_table

    torch.set_num_threads(1)
    model = EmbeddingModel.from_checkpoint(checkpoint, device="cpu")
    decoder = card_decoder(model.card, on_error="skip")
    limits = Limits(
        max_items=1, max_request_bytes=2**30, max_image_pixels=2**30, max_audio_seconds=1e9
    )

    def seconds(tables: list[pa.Table], repeats: int = 3) -> float:
        """Best of ``repeats`` times for embedding each table in one pass."""
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for table in tables:
                model.embed_table(table)
            best = min(best, time.perf_counter() - start)
        return best

    rows = []
    for modality in MODALITIES:
        items = [json.loads(b)["items"][0] for m, b in bodies if m == modality][:batch]
        tables = [items_table([Item(**i)], model.card, limits, decoder) for i in items]
        merged = pa.concat_tables(tables)
        model.embed_table(merged)  # warm-up
        alone = seconds(tables) / len(tables)
        together = seconds([merged]) / len(tables)
        rows.append(
            {
                "modality": modality,
                "items": len(tables),
                "alone_ms": round(1000 * alone, 3),
                "batched_ms": round(1000 * together, 3),
                "ratio": round(alone / together, 2),
            }
        )
    return rows


def run_case(
    checkpoint: Path,
    bodies: list[tuple[str, bytes]],
    *,
    max_batch_size: int,
    args: argparse.Namespace,
) -> dict[str, object]:
    """Start the service with ``max_batch_size``, warm it up, drive it, stop it."""
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jin_orchestrate.serve",
            "--checkpoint",
            str(checkpoint),
            "--port",
            str(port),
            "--set",
            f"max_batch_size={max_batch_size}",
            "--set",
            f"batch_wait_timeout_s={args.batch_wait_timeout_s}",
            "--set",
            f"model.max_ongoing_requests={args.max_ongoing_requests}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the service exited with {server.returncode}")
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the service did not start within 300 s")
            time.sleep(1)
        asyncio.run(drive(url, bodies[: args.clients * 4], args.clients))  # warm-up
        load_before = os.getloadavg()[0]
        result = asyncio.run(drive(url, bodies, args.clients))
        load_after = os.getloadavg()[0]
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
    return {
        "batching": max_batch_size > 1,
        "max_batch_size": max_batch_size,
        **{k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()},
        "load_1min": [round(load_before, 2), round(load_after, 2)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="jin-tiny")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=32, help="the batching case's")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.005)
    parser.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=64,
        help="the model replica's, equal in both cases so that only batching differs",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(args.preset, Path(tmp))
        bodies = make_bodies(args.requests, args.seed, Path(tmp))
        cases = [
            run_case(checkpoint, bodies, max_batch_size=size, args=args)
            for size in (args.max_batch_size, 1)
        ]
        model = model_only(checkpoint, bodies, args.max_batch_size)
    on, off = cases
    ratio = on["rps"] / off["rps"]
    # The requests are an equal mix, so the model's ceiling is the ratio of summed times.
    ceiling = sum(r["alone_ms"] for r in model) / sum(r["batched_ms"] for r in model)
    print("| batching | max_batch_size | req/s | p50 ms | p99 ms | errors | requests/batch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in cases:
        print(
            f"| {'on' if c['batching'] else 'off'} | {c['max_batch_size']} | {c['rps']:.1f} | "
            f"{c['p50_ms']:.1f} | {c['p99_ms']:.1f} | {c['errors']} | "
            f"{c['mean_batch_requests']:.1f} |"
        )
    print(f"throughput ratio batching on / off: {ratio:.2f}x (target >= 3x)")
    print()
    print(f"| modality | model ms/item alone | in a pass of {args.max_batch_size} | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for r in model:
        print(
            f"| {r['modality']} | {r['alone_ms']:.2f} | {r['batched_ms']:.2f} | {r['ratio']:.1f}x |"
        )
    print(f"model-only ceiling of the batching gain for this mix: {ceiling:.2f}x")
    if args.json is not None:
        report = {
            "preset": args.preset,
            "requests": args.requests,
            "clients": args.clients,
            "cpus": os.cpu_count(),
            "ratio": round(ratio, 2),
            "model_only_ceiling": round(ceiling, 2),
            "cases": cases,
            "model_only": model,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
