"""Training-step throughput of a Jin preset on this machine: tokens/s and model FLOP utilisation.

    python benchmarks/train.py --json benchmarks/results/train.json [--preset jin-tiny]
    python benchmarks/train.py --device cuda --precision fp32 bf16 [--data URL] --json ...

For every curriculum stage of the preset, one optimiser step (forward, backward, clipping, AdamW,
EMA update) on a NumberWorld batch is timed after warm-up, in this process, with torch's default
intra-op threads. Model FLOPs per step are counted by ``torch.utils.flop_counter`` on one real step
(matmuls, convolutions and attention, forward and backward: what the model does, not an estimate);
MFU is those FLOPs per second over the machine's matmul rate in the step's dtype (fp32, or bf16
for ``--precision bf16``), measured in the same run with a square matmul of the largest size that
fits the cache-friendly regime of the model's own GEMMs (1024^3 on a CPU, 4096^3 on a GPU).

``--device cuda`` times on a GPU (synchronised). ``--precision fp32 bf16`` times both settings of
``train.precision`` side by side and prints bf16's tokens/s over fp32's per stage. ``--data``
reads an existing NumberWorld corpus instead of generating one (which needs espeak-ng).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_gflops(
    n: int = 1024, repeats: int = 20, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> float:
    """Measured GEMM rate (best of ``repeats``) on an n x n x n product."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def main() -> None:
    from jin_data import ShardDataset
    from jin_data.numberworld import generate_numberworld
    from jin_orchestrate.config import load_config
    from jin_orchestrate.model import JinModel
    from jin_orchestrate.train import StageTrainer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="jin-tiny")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per stage")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument(
        "--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
        help="train.precision settings to time, side by side",
    )  # fmt: skip
    parser.add_argument("--data", help="an existing NumberWorld corpus (default: generate one)")
    args = parser.parse_args()

    cfg = load_config(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        url = args.data or f"{tmp}/nw"
        if not args.data:
            generate_numberworld(
                url,
                4 * cfg.train.batch_size,
                0,
                progress=False,
                cache_dir=str(Path(cfg.data.cache_dir).expanduser()),  # the demo's speech/
            )
        data = ShardDataset(
            url,
            batch_size=cfg.train.batch_size,
            shuffle=False,
            modalities=list(cfg.data.modalities),
            rank=0,
            world_size=1,
        )
        batch = next(iter(data))

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    on_gpu = args.device.startswith("cuda")
    size, repeats = (4096, 10) if on_gpu else (1024, 20)
    peaks = {p: matmul_gflops(size, repeats, args.device, dtypes[p]) for p in args.precision}
    cases = []
    for precision in args.precision:
        run = cfg.model_copy(
            update={"train": cfg.train.model_copy(update={"precision": precision})}
        )
        for index, stage in enumerate(run.stages):
            torch.manual_seed(0)
            model = JinModel(run.model)
            trainer = StageTrainer.create(run, stage, model, seed=index, device=args.device)
            for _ in range(args.warmup):
                trainer.train_step(batch)
            with FlopCounterMode(display=False) as counter:
                tokens = trainer.train_step(batch).tokens
            flops = counter.get_total_flops()
            times = []
            for _ in range(args.steps):
                _sync(args.device)
                t = time.perf_counter()
                trainer.train_step(batch)
                _sync(args.device)
                times.append(time.perf_counter() - t)
            step_s = statistics.median(times)
            cases.append({
                "preset": args.preset,
                "device": args.device,
                "precision": precision,
                "stage": stage.name,
                "batch_size": run.train.batch_size,
                "tokens_per_step": tokens,
                "step_s": step_s,
                "tokens_per_s": tokens / step_s,
                "model_gflop_per_step": flops / 1e9,
                "model_gflops": flops / step_s / 1e9,
                "mfu": flops / step_s / 1e9 / peaks[precision],
            })  # fmt: skip

    where = torch.cuda.get_device_name(args.device) if on_gpu else "CPU"
    rates = ", ".join(f"{p} {g:.1f}" for p, g in peaks.items())
    print(f"{where}: matmul GFLOP/s {rates}; torch threads: {torch.get_num_threads()}")
    print(
        f"{'stage':<16}{'prec':>5}{'tokens/s':>10}{'step s':>9}{'GFLOP/step':>12}"
        f"{'GFLOP/s':>9}{'MFU':>7}"
    )
    for c in cases:
        print(
            f"{c['stage']:<16}{c['precision']:>5}{c['tokens_per_s']:>10.0f}{c['step_s']:>9.3f}"
            f"{c['model_gflop_per_step']:>12.2f}{c['model_gflops']:>9.1f}{c['mfu']:>7.1%}"
        )
    speedups = {}
    if {"fp32", "bf16"} <= set(args.precision):
        rate = {(c["precision"], c["stage"]): c["tokens_per_s"] for c in cases}
        for stage in cfg.stages:
            speedups[stage.name] = rate[("bf16", stage.name)] / rate[("fp32", stage.name)]
            print(f"bf16/fp32 tokens/s, {stage.name}: {speedups[stage.name]:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {"matmul_gflops": peaks, "cases": cases, "bf16_over_fp32": speedups}
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
