"""jin-data from simulated remote storage: what ``read_threads`` gives when requests have latency.

    python benchmarks/data_remote.py --json benchmarks/results/data_remote.json \\
        [--samples 3000 --latency-ms 30 --mb-per-s 100]

The NumberWorld shards are generated locally and read through ``slow://``, an fsspec filesystem
that serves the local files as an object store client does: buffered files that fetch 5 MiB
blocks (s3fs's default block size and read-ahead cache), each fetch waiting ``--latency-ms`` plus
its size at ``--mb-per-s``. It is a model of remote storage, not a measurement of one; the ratios
between ``read_threads`` values are the point. Each case runs in a fresh subprocess (the
filesystem is registered in the case's process; DataLoader workers fork from it).

JSON: ``{"cases": [{"read_threads", "workers", "samples_per_s", "cpu_us_per_sample"}], ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 64
BLOCK = 5 * 2**20


def register_slow_filesystem(latency_s: float, bytes_per_s: float) -> None:
    """Register ``slow://`` (local files behind a latency and a bandwidth) with fsspec."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem
    from fsspec.spec import AbstractBufferedFile

    class SlowFile(AbstractBufferedFile):
        def _fetch_range(self, start: int, end: int) -> bytes:
            time.sleep(latency_s + (end - start) / bytes_per_s)
            with open(self.path, "rb") as f:
                f.seek(start)
                return f.read(end - start)

    class SlowFileSystem(LocalFileSystem):
        protocol = "slow"
        root_marker = "/"

        @classmethod
        def _strip_protocol(cls, path: str) -> str:
            path = path[len("slow://") :] if path.startswith("slow://") else path
            return "/" + path.lstrip("/")

        def _open(self, path: str, mode: str = "rb", block_size=None, **kwargs):
            if mode != "rb":
                raise ValueError("slow:// is read-only")
            size = os.path.getsize(path)
            return SlowFile(
                self, path, mode, block_size=block_size or BLOCK, cache_type="readahead", size=size
            )

    fsspec.register_implementation("slow", SlowFileSystem, clobber=True)


def run_one(url: str, read_threads: int, workers: int, latency_s: float, bytes_per_s: float):
    from data import Clock  # benchmarks/data.py: wall and CPU seconds, DataLoader workers included

    from jin_data import ShardDataset

    register_slow_filesystem(latency_s, bytes_per_s)
    clock = Clock()
    data = ShardDataset(url, batch_size=BATCH, seed=0, read_threads=read_threads)
    rows = sum(len(b["id"]) for b in data.dataloader(num_workers=workers))
    seconds, cpu = clock.read()
    return {
        "read_threads": read_threads,
        "workers": workers,
        "samples": rows,
        "seconds": seconds,
        "samples_per_s": rows / seconds,
        "cpu_us_per_sample": cpu / rows * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--latency-ms", type=float, default=30.0)
    parser.add_argument("--mb-per-s", type=float, default=100.0)
    parser.add_argument("--threads", default="1,2,4,8", help="read_threads values")
    parser.add_argument("--case", nargs=3, help=argparse.SUPPRESS)  # url read_threads workers
    args = parser.parse_args()
    latency, bandwidth = args.latency_ms / 1000, args.mb_per_s * 1e6
    if args.case:  # child process: one case, one JSON line
        url, threads, workers = args.case[0], int(args.case[1]), int(args.case[2])
        print(json.dumps(run_one(url, threads, workers, latency, bandwidth)))
        return

    from jin_data.numberworld import generate_numberworld

    cases = []
    with tempfile.TemporaryDirectory(prefix="jin-bench-remote-") as tmp:
        local = Path(tmp) / "numberworld"
        generate_numberworld(str(local), args.samples, seed=0, progress=False)
        url = f"slow://{local}"
        for workers in (0, 2):
            for threads in [int(t) for t in args.threads.split(",")]:
                command = [sys.executable, __file__, "--case", url, str(threads), str(workers)]
                command += ["--latency-ms", str(args.latency_ms), "--mb-per-s", str(args.mb_per_s)]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                cases.append(json.loads(done.stdout.strip().splitlines()[-1]))
    lines = [
        f"slow:// at {args.latency_ms:g} ms per 5 MiB block request and {args.mb_per_s:g} MB/s, "
        f"{args.samples} samples, batch {BATCH}:",
        "| workers | read_threads | samples/s | vs read_threads=1 | CPU us/sample |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for case in cases:
        base = next(c for c in cases if c["workers"] == case["workers"] and c["read_threads"] == 1)
        lines.append(
            f"| {case['workers']} | {case['read_threads']} | {case['samples_per_s']:.0f} | "
            f"{case['samples_per_s'] / base['samples_per_s']:.2f}x | "
            f"{case['cpu_us_per_sample']:.0f} |"
        )
    print("\n".join(lines))
    if args.json:
        result = {
            "samples": args.samples,
            "batch_size": BATCH,
            "latency_ms": args.latency_ms,
            "mb_per_s": args.mb_per_s,
            "cases": cases,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
