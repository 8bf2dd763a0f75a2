"""jin-data throughput and memory: NumberWorld shards -> collated torch batches.

    python benchmarks/data.py --json benchmarks/results/data.json [--samples 3000]

Measured side by side in one run, each case in a fresh subprocess (so peak RSS is its own):
- ``jin`` — `jin_data.ShardDataset` with a DataLoader, 0 and 2 workers;
- ``jin-10x`` — the same reader (2 workers) over a data set 10x larger (the shards repeated under
  new names), to show that peak RSS does not grow with the data set (streaming);
- ``jin-10epochs`` — the reader (2 persistent workers) over the first data set for 10 epochs: the
  same samples and batches as ``jin-10x`` reads once, so ``rss jin-10x/jin-10epochs`` compares
  two processes that did the same work over data sets 10x apart (``jin-10x/jin`` also compares
  a process that read 10x more batches, whose allocators warmed up further);
- ``jin-int16`` — the reader (2 workers) with ``audio_dtype="int16"`` (16-bit PCM audio batches for
  the consumer to convert), for reference: the other cases deliver float32 audio;
- ``jin-inline`` — the reader (0 and 2 workers) with ``read_ahead=0``: row groups read on the
  decoding thread, as before jin-data 0.5.0, to show what reading ahead on a thread gives;
- ``ray`` — `jin_data.ray_data.read_ray_dataset` + ``iter_torch_batches`` on a private local Ray
  (2 CPUs; `ray.init` excluded, the first tasks' worker start-up and imports included; RSS is the
  driver's only, Ray's worker processes are not counted);
- ``ray-warm`` — the same, an untimed first epoch and then ``WARM_EPOCHS`` epochs timed together
  in the same Ray session (its worker processes started and their imports done), as the other
  ``-warm`` cases: what a multi-epoch Ray Train job sees after its first epoch;
- ``per-file`` — the baseline a user writes by hand: one PNG, one WAV and one JSON file per sample,
  a map-style Dataset, a padding collate_fn and a DataLoader with 2 workers;
- ``per-file-warm`` and ``jin-warm`` — the baseline (2 workers) and the reader (0 and 2 workers) in
  later epochs: one process, persistent DataLoader workers, a first epoch untimed, then
  ``WARM_EPOCHS`` epochs timed together. The ``-warm`` cases are compared with ``per-file-warm``,
  the others with ``per-file``: a multi-epoch training job sees the warm figures after its first
  epoch, a fresh process the others (start-up, imports in workers and first memory use included).
Also the NumberWorld generation speed, with a cold and with a warm speech cache.

Peak RSS is the case process's own high-water mark since it started (VmHWM; ru_maxrss would include
the driver's RSS, which Linux carries across exec) plus that of its largest child (a DataLoader
worker).
CPU us/sample counts the case's process and its children (DataLoader workers, persistent ones
included), not Ray's worker processes: on a shared machine it is steadier than samples/s.
Targets (issue 6): jin >= 5x per-file; peak RSS of jin-10x within 10% of jin (2 workers); jin >= 10x
the demo model's CPU training step (pass its samples/s as --train-samples-per-s to get the ratio).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BATCH = 64
WARM_EPOCHS = 3
GROWTH = 10  # jin-10x's data set over the first; jin-10epochs' epochs


def _own_peak_rss_kb() -> int:
    # Linux keeps ru_maxrss across exec: a case process would report the benchmark driver's RSS
    # at the moment it was spawned (~300 MB after generating the data). VmHWM is this process's
    # own high-water mark since exec.
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_rss_mb() -> float:
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (_own_peak_rss_kb() + child) / 1024.0


def _live_children_cpu() -> float:
    """CPU seconds of this process's children that are still running (persistent workers)."""
    me, total = str(os.getpid()), 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # Fields after the command's closing parenthesis: state, ppid, ..., utime, stime.
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # exited meanwhile
            continue
        if fields[1] == me:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


class Clock:
    """Wall seconds and CPU seconds (this process and its children: DataLoader workers).

    A child counts while it runs (from /proc) and once reaped (``RUSAGE_CHILDREN``), so workers
    that outlive an epoch (``persistent_workers``) are counted too, and none twice.
    """

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), self._cpu()

    @staticmethod
    def _cpu() -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        child = resource.getrusage(resource.RUSAGE_CHILDREN)
        reaped = own.ru_utime + own.ru_stime + child.ru_utime + child.ru_stime
        return reaped + (_live_children_cpu() if sys.platform == "linux" else 0.0)

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, self._cpu() - self.cpu


def drain(batches) -> int:
    rows = 0
    for batch in batches:
        rows += len(batch["id"])
    return rows


def case_jin(url: str, workers: int, **options) -> tuple[int, tuple[float, float]]:
    from jin_data import ShardDataset

    clock = Clock()
    data = ShardDataset(url, batch_size=BATCH, shuffle=True, seed=0, **options)
    rows = drain(data.dataloader(num_workers=workers))
    return rows, clock.read()


def _warm(epoch: Callable[[int], int]) -> tuple[int, tuple[float, float]]:
    """Run ``epoch(0)`` untimed, then time epochs 1..WARM_EPOCHS together."""
    epoch(0)
    clock, rows = Clock(), 0
    for number in range(1, WARM_EPOCHS + 1):
        rows += epoch(number)
    return rows, clock.read()


def case_jin_warm(url: str, workers: int) -> tuple[int, tuple[float, float]]:
    from jin_data import ShardDataset

    data = ShardDataset(url, batch_size=BATCH, shuffle=True, seed=0)
    loader = data.dataloader(num_workers=workers, persistent_workers=workers > 0)

    def epoch(number: int) -> int:
        data.set_epoch(number)
        return drain(loader)

    return _warm(epoch)


def case_jin_epochs(url: str, workers: int) -> tuple[int, tuple[float, float]]:
    from jin_data import ShardDataset

    clock = Clock()
    data = ShardDataset(url, batch_size=BATCH, shuffle=True, seed=0)
    loader = data.dataloader(num_workers=workers, persistent_workers=workers > 0)
    rows = 0
    for number in range(GROWTH):
        data.set_epoch(number)
        rows += drain(loader)
    return rows, clock.read()


def case_jin_int16(url: str, workers: int) -> tuple[int, tuple[float, float]]:
    return case_jin(url, workers, audio_dtype="int16")


def case_jin_inline(url: str, workers: int) -> tuple[int, tuple[float, float]]:
    return case_jin(url, workers, read_ahead=0)


@contextlib.contextmanager
def _local_ray(workers: int) -> Iterator[None]:
    """A private local Ray with ``workers`` CPUs for the duration (its start not timed)."""
    import ray

    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


def _ray_epoch(dataset: Any) -> int:
    from jin_data.ray_data import ray_collate_fn

    return drain(dataset.iter_torch_batches(batch_size=BATCH, collate_fn=ray_collate_fn()))


def case_ray(url: str, workers: int) -> tuple[int, tuple[float, float]]:
    from jin_data.ray_data import read_ray_dataset

    with _local_ray(workers):
        clock = Clock()
        rows = _ray_epoch(read_ray_dataset(url))
        return rows, clock.read()


def case_ray_warm(url: str, workers: int) -> tuple[int, tuple[float, float]]:
    from jin_data.ray_data import read_ray_dataset

    with _local_ray(workers):
        dataset = read_ray_dataset(url)
        return _warm(lambda number: _ray_epoch(dataset))


class PerFileDataset:
    """What a user writes by hand: three files per sample, decoded one sample at a time."""

    def __init__(self, root: str) -> None:
        self.stems = sorted(p.with_suffix("") for p in Path(root).glob("*.json"))

    def __len__(self) -> int:
        return len(self.stems)

    def files(self, stem: Any) -> tuple[str, Any, Any]:
        """The sample's JSON text and its WAV and PNG as paths (or file objects)."""
        return (
            stem.with_suffix(".json").read_text(),
            stem.with_suffix(".wav"),
            stem.with_suffix(".png"),
        )

    def __getitem__(self, index: int) -> dict:
        import numpy as np
        import soundfile
        import torch
        from PIL import Image

        meta_json, wav, png = self.files(self.stems[index])
        meta = json.loads(meta_json)
        wave, _ = soundfile.read(wav, dtype="float32")
        return {
            "id": meta["id"],
            "text": meta["text"],
            "label": meta["label"],
            "image": torch.from_numpy(np.asarray(Image.open(png)))[None],
            "audio": torch.from_numpy(wave),
            "points": torch.tensor(meta["points"], dtype=torch.float32),
            "custom": torch.tensor(meta["custom"], dtype=torch.float32),
        }


def per_file_collate(rows: list[dict]) -> dict:
    import torch
    from torch.nn.utils.rnn import pad_sequence

    text = [r["text"] for r in rows]
    encoded = [torch.tensor(list(t.encode()), dtype=torch.uint8) for t in text]
    return {
        "id": [r["id"] for r in rows],
        "text": text,
        "text_bytes": pad_sequence(encoded, batch_first=True),
        "label": torch.tensor([r["label"] for r in rows]),
        "image": torch.stack([r["image"] for r in rows]),
        "audio": pad_sequence([r["audio"] for r in rows], batch_first=True),
        "audio_lengths": torch.tensor([len(r["audio"]) for r in rows]),
        "points": pad_sequence([r["points"] for r in rows], batch_first=True),
        "custom": torch.stack([r["custom"] for r in rows]),
    }


def per_file_loader(dataset: PerFileDataset, workers: int, persistent: bool = False):
    """The baseline's DataLoader: shuffled batches of ``BATCH``, padded by `per_file_collate`."""
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_size=BATCH,
        shuffle=True,
        num_workers=workers,
        collate_fn=per_file_collate,
        persistent_workers=persistent and workers > 0,
    )


def case_per_file(root: str, workers: int) -> tuple[int, tuple[float, float]]:
    import torch.utils.data  # noqa: F401  imported before the clock, as the jin cases import jin_data

    clock = Clock()
    rows = drain(per_file_loader(PerFileDataset(root), workers))
    return rows, clock.read()


def case_per_file_warm(root: str, workers: int) -> tuple[int, tuple[float, float]]:
    import torch

    torch.manual_seed(0)  # the sampler's shuffle
    loader = per_file_loader(PerFileDataset(root), workers, persistent=True)
    return _warm(lambda number: drain(loader))


CASES = {
    "jin": case_jin,
    "jin-10x": case_jin,
    "jin-10epochs": case_jin_epochs,
    "jin-int16": case_jin_int16,
    "jin-inline": case_jin_inline,
    "ray": case_ray,
    "ray-warm": case_ray_warm,
    "per-file": case_per_file,
    "jin-warm": case_jin_warm,
    "per-file-warm": case_per_file_warm,
}


def export_per_file(url: str, root: Path) -> None:
    """Write the NumberWorld samples as one PNG, one WAV and one JSON per sample."""
    import pyarrow.parquet as pq

    root.mkdir(parents=True)
    for shard in sorted(Path(url).glob("shard-*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            stem = root / row["id"]
            stem.with_suffix(".png").write_bytes(row["image"])
            stem.with_suffix(".wav").write_bytes(row["audio"]["bytes"])
            meta = {k: row[k] for k in ("id", "text", "label", "points", "custom")}
            stem.with_suffix(".json").write_text(json.dumps(meta))


def repeat_dataset(url: str, out: Path, times: int) -> None:
    """A data set ``times`` larger: the same shards under new names, listed in a new manifest."""
    from jin_data.manifest import Manifest

    manifest = Manifest.model_validate_json((Path(url) / "manifest.json").read_text())
    out.mkdir(parents=True)
    shards = []
    for copy in range(times):
        for shard in manifest.shards:
            name = f"r{copy:02d}-{shard.path}"
            (out / name).write_bytes((Path(url) / shard.path).read_bytes())
            shards.append(shard.model_copy(update={"path": name}))
    bigger = manifest.model_copy(
        update={
            "shards": shards,
            "num_rows": manifest.num_rows * times,
            "splits": {k: v * times for k, v in manifest.splits.items()},
        }
    )
    (out / "manifest.json").write_text(bigger.to_json())


def run_case(name: str, target: str, workers: int) -> dict:
    """Run one case in a fresh interpreter and read its JSON line."""
    command = [sys.executable, __file__, "--case", name, "--target", target]
    command += ["--workers", str(workers)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return {"impl": name, "workers": workers, "error": result.stderr.strip()[-800:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def generate(url: str, samples: int, cache: str) -> float:
    from jin_data.numberworld import generate_numberworld

    start = time.perf_counter()
    generate_numberworld(url, samples, seed=0, cache_dir=cache, progress=False, overwrite=True)
    return samples / (time.perf_counter() - start)


def _baseline(impl: str) -> str:
    """The case ``impl`` is compared with: warm with warm, a fresh process with a fresh one."""
    return "per-file-warm" if impl.endswith("-warm") else "per-file"


def markdown(result: dict) -> str:
    lines = [
        "| impl | workers | samples/s | peak RSS (MB) | vs per-file | CPU us/sample |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    bases = {c["impl"]: c["samples_per_s"] for c in result["cases"] if "error" not in c}
    for c in result["cases"]:
        if "error" in c:
            lines.append(f"| {c['impl']} | {c['workers']} | error | | | |")
            continue
        base = bases.get(_baseline(c["impl"]))
        ratio = f"{c['samples_per_s'] / base:.1f}x" if base else "-"
        lines.append(
            f"| {c['impl']} | {c['workers']} | {c['samples_per_s']:.0f} | "
            f"{c['peak_rss_mb']:.0f} | {ratio} | "
            f"{c['cpu_us_per_sample']:.0f} |"
        )
    g = result["generation"]
    lines.append("")
    lines.append(
        f"Generation ({result['samples']} samples): {g['cold_cache_samples_per_s']:.0f} samples/s "
        f"with a cold speech cache, {g['warm_cache_samples_per_s']:.0f} samples/s warm."
    )
    lines.append("Ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--train-samples-per-s", type=float, default=None)
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # child process: one case, one JSON line
        rows, (seconds, cpu) = CASES[args.case](args.target, args.workers)
        print(
            json.dumps(
                {
                    "impl": args.case,
                    "workers": args.workers,
                    "samples_per_s": rows / seconds,
                    "peak_rss_mb": _peak_rss_mb(),
                    "samples": rows,
                    "seconds": seconds,
                    "cpu_us_per_sample": cpu / rows * 1e6,
                }
            )
        )
        return

    with tempfile.TemporaryDirectory(prefix="jin-bench-data-") as tmp:
        work = Path(tmp)
        url = str(work / "numberworld")
        cold = generate(url, args.samples, str(work / "cache"))
        warm = generate(url, args.samples, str(work / "cache"))
        repeat_dataset(url, work / "numberworld-10x", GROWTH)
        export_per_file(url, work / "per-file")
        cases = [
            run_case("per-file", str(work / "per-file"), 2),
            run_case("jin", url, 0),
            run_case("jin", url, 2),
            run_case("jin-10x", str(work / "numberworld-10x"), 2),
            run_case("jin-10epochs", url, 2),
            run_case("jin-int16", url, 2),
            run_case("jin-inline", url, 0),
            run_case("jin-inline", url, 2),
            run_case("ray", url, 2),
            run_case("ray-warm", url, 2),
            run_case("per-file-warm", str(work / "per-file"), 2),
            run_case("jin-warm", url, 0),
            run_case("jin-warm", url, 2),
        ]
    by = {(c["impl"], c["workers"]): c for c in cases if "error" not in c}
    ratios = {}
    if ("per-file", 2) in by and ("jin", 2) in by:
        base = by[("per-file", 2)]["samples_per_s"]
        ratios["jin(0)/per-file"] = by[("jin", 0)]["samples_per_s"] / base
        ratios["jin(2)/per-file"] = by[("jin", 2)]["samples_per_s"] / base
    if ("per-file-warm", 2) in by:
        base = by[("per-file-warm", 2)]["samples_per_s"]
        for workers in (0, 2):
            if ("jin-warm", workers) in by:
                ratios[f"jin-warm({workers})/per-file-warm"] = (
                    by[("jin-warm", workers)]["samples_per_s"] / base
                )
    for workers in (0, 2):
        if ("jin-inline", workers) in by and ("jin", workers) in by:
            inline = by[("jin-inline", workers)]["samples_per_s"]
            ratios[f"jin({workers})/jin-inline({workers})"] = (
                by[("jin", workers)]["samples_per_s"] / inline
            )
    if ("jin-10x", 2) in by and ("jin", 2) in by:
        big, small = by[("jin-10x", 2)], by[("jin", 2)]
        ratios["rss jin-10x/jin"] = big["peak_rss_mb"] / small["peak_rss_mb"]
        if ("jin-10epochs", 2) in by:
            same_work = by[("jin-10epochs", 2)]
            ratios["rss jin-10x/jin-10epochs"] = big["peak_rss_mb"] / same_work["peak_rss_mb"]
    if args.train_samples_per_s and ("jin", 2) in by:
        ratios["jin(2)/train step"] = by[("jin", 2)]["samples_per_s"] / args.train_samples_per_s
    result = {
        "samples": args.samples,
        "batch_size": BATCH,
        "cases": cases,
        "generation": {"cold_cache_samples_per_s": cold, "warm_cache_samples_per_s": warm},
        "ratios": ratios,
    }
    print(markdown(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
