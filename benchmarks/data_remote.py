"""jin-data from simulated remote storage: what ``read_threads`` gives when requests have latency.

    python benchmarks/data_remote.py --json benchmarks/results/data_remote.json \\
        [--samples 3000 --latency-ms 30 --mb-per-s 100 --per-file-samples 1024]

The NumberWorld shards are generated locally and read through ``slow://``, an fsspec filesystem
that serves the local files as an object store client does: buffered files that fetch 5 MiB
blocks (s3fs's default block size and read-ahead cache), each fetch waiting ``--latency-ms`` plus
its size at ``--mb-per-s``. It is a model of remote storage, not a measurement of one; the ratios
between ``read_threads`` values are the point. Each case runs in a fresh subprocess (the
filesystem is registered in the case's process; DataLoader workers fork from it).

The per-file baseline of ``benchmarks/data.py`` (one PNG, one WAV, one JSON per sample, a
DataLoader) reads the same samples through the same ``slow://``, one request per file, with 2
workers (the issue's baseline) and with 8 (what a user does when loading is I/O-bound). Its rate
does not depend on the data set's size, so it reads the first ``--per-file-samples`` samples only
(1,024 by default: 16 batches, two rounds for 8 workers, each of which fills a batch alone).

JSON: ``{"cases": [{"impl", "read_threads", "workers", "samples_per_s", "cpu_us_per_sample"}],
...}`` (``read_threads`` is null for the per-file cases).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# benchmarks/data.py: the batch size, the clock (DataLoader workers included), the per-file baseline
from data import BATCH, Clock, PerFileDataset, drain, export_per_file, per_file_loader

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


class RemotePerFile(PerFileDataset):
    """`data.PerFileDataset` over an fsspec URL, first ``limit`` samples: each file fetched whole,
    one request each."""

    def __init__(self, url: str, limit: int) -> None:
        import fsspec

        self.fs, root = fsspec.core.url_to_fs(url)
        self.stems = sorted(p[: -len(".json")] for p in self.fs.glob(f"{root}/*.json"))[:limit]

    def files(self, stem: str) -> tuple[str, io.BytesIO, io.BytesIO]:
        fetch = self.fs.cat_file
        wav, png = io.BytesIO(fetch(f"{stem}.wav")), io.BytesIO(fetch(f"{stem}.png"))
        return fetch(f"{stem}.json").decode(), wav, png


def run_one(
    url: str, read_threads: int, workers: int, latency_s: float, bytes_per_s: float, limit: int
):
    """One epoch of the jin reader (``read_threads`` > 0) or of the per-file baseline (0)."""
    import jin_data  # imported before the clock, torch with it

    register_slow_filesystem(latency_s, bytes_per_s)
    clock = Clock()
    if read_threads:
        data = jin_data.ShardDataset(url, batch_size=BATCH, seed=0, read_threads=read_threads)
        rows = drain(data.dataloader(num_workers=workers))
    else:
        rows = drain(per_file_loader(RemotePerFile(url, limit), workers))
    seconds, cpu = clock.read()
    return {
        "impl": "jin" if read_threads else "per-file",
        "read_threads": read_threads or None,
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
    parser.add_argument("--per-file-samples", type=int, default=1024)
    parser.add_argument("--case", nargs=3, help=argparse.SUPPRESS)  # url read_threads workers
    args = parser.parse_args()
    latency, bandwidth = args.latency_ms / 1000, args.mb_per_s * 1e6
    if args.case:  # child process: one case, one JSON line
        url, threads, workers = args.case[0], int(args.case[1]), int(args.case[2])
        result = run_one(url, threads, workers, latency, bandwidth, args.per_file_samples)
        print(json.dumps(result))
        return

    from jin_data.numberworld import generate_numberworld

    def case(url: str, threads: int, workers: int) -> dict:
        command = [sys.executable, __file__, "--case", url, str(threads), str(workers)]
        command += ["--latency-ms", str(args.latency_ms), "--mb-per-s", str(args.mb_per_s)]
        command += ["--per-file-samples", str(args.per_file_samples)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    cases = []
    with tempfile.TemporaryDirectory(prefix="jin-bench-remote-") as tmp:
        local = Path(tmp) / "numberworld"
        generate_numberworld(str(local), args.samples, seed=0, progress=False)
        export_per_file(str(local), Path(tmp) / "per-file")
        for workers in (2, 8):
            cases.append(case(f"slow://{Path(tmp) / 'per-file'}", 0, workers))
        for workers in (0, 2):
            for threads in [int(t) for t in args.threads.split(",")]:
                cases.append(case(f"slow://{local}", threads, workers))
    baseline = cases[0]["samples_per_s"]  # per-file, 2 workers
    lines = [
        f"slow:// at {args.latency_ms:g} ms per request (5 MiB blocks) and {args.mb_per_s:g} MB/s, "
        f"{args.samples} samples (per-file: the first {args.per_file_samples}), batch {BATCH}:",
        "| impl | workers | read_threads | samples/s | vs read_threads=1 | vs per-file (2 workers) "
        "| CPU us/sample |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in cases:
        one = c["read_threads"] and next(
            (o for o in cases if o["workers"] == c["workers"] and o["read_threads"] == 1), None
        )
        versus_one = f"{c['samples_per_s'] / one['samples_per_s']:.2f}x" if one else "-"
        lines.append(
            f"| {c['impl']} | {c['workers']} | {c['read_threads'] or '-'} | "
            f"{c['samples_per_s']:.0f} | {versus_one} | {c['samples_per_s'] / baseline:.1f}x | "
            f"{c['cpu_us_per_sample']:.0f} |"
        )
    print("\n".join(lines))
    if args.json:
        result = {
            "samples": args.samples,
            "per_file_samples": args.per_file_samples,
            "batch_size": BATCH,
            "latency_ms": args.latency_ms,
            "mb_per_s": args.mb_per_s,
            "cases": cases,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
