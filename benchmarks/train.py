"""Training-step throughput of a Jin preset on this machine: tokens/s and model FLOP utilisation.

    python benchmarks/train.py --json benchmarks/results/train.json [--preset jin-tiny]

For every curriculum stage of the preset, one optimiser step (forward, backward, clipping, AdamW,
EMA update) on a NumberWorld batch is timed after warm-up, in this process, with torch's default
intra-op threads. Model FLOPs per step are counted by ``torch.utils.flop_counter`` on one real step
(matmuls, convolutions and attention, forward and backward: what the model does, not an estimate);
MFU is those FLOPs per second over the machine's fp32 matmul rate, measured in the same run with a
square matmul of the largest size that fits the cache-friendly regime of the model's own GEMMs.
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


def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
    """Measured fp32 GEMM rate (best of ``repeats``) on an n x n x n product."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
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
    args = parser.parse_args()

    cfg = load_config(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"{tmp}/nw"
        generate_numberworld(
            url,
            4 * cfg.train.batch_size,
            0,
            progress=False,
            cache_dir=str(Path(cfg.data.cache_dir).expanduser() / "speech"),
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

    peak = matmul_gflops()
    cases = []
    for index, stage in enumerate(cfg.stages):
        torch.manual_seed(0)
        trainer = StageTrainer.create(cfg, stage, JinModel(cfg.model), seed=index)
        for _ in range(args.warmup):
            trainer.train_step(batch)
        with FlopCounterMode(display=False) as counter:
            tokens = trainer.train_step(batch).tokens
        flops = counter.get_total_flops()
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            trainer.train_step(batch)
            times.append(time.perf_counter() - t)
        step_s = statistics.median(times)
        cases.append({
            "preset": args.preset,
            "stage": stage.name,
            "batch_size": cfg.train.batch_size,
            "tokens_per_step": tokens,
            "step_s": step_s,
            "tokens_per_s": tokens / step_s,
            "model_gflop_per_step": flops / 1e9,
            "model_gflops": flops / step_s / 1e9,
            "mfu": flops / step_s / 1e9 / peak,
        })  # fmt: skip

    print(f"fp32 matmul: {peak:.1f} GFLOP/s, torch threads: {torch.get_num_threads()}")
    print(f"{'stage':<16}{'tokens/s':>10}{'step s':>9}{'GFLOP/step':>12}{'GFLOP/s':>9}{'MFU':>7}")
    for c in cases:
        print(
            f"{c['stage']:<16}{c['tokens_per_s']:>10.0f}{c['step_s']:>9.3f}"
            f"{c['model_gflop_per_step']:>12.2f}{c['model_gflops']:>9.1f}{c['mfu']:>7.1%}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"matmul_gflops": peak, "cases": cases}, indent=2))


if __name__ == "__main__":
    main()
