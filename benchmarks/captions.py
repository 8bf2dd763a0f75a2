"""Caption decoding with and without the KV cache, side by side in one run (jin-orchestrate).

    python benchmarks/captions.py --json benchmarks/results/captions.json [--batch 100]

A jin-tiny model with generation heads (untrained: speed does not depend on the weights, and an
untrained model never emits EOS, so every caption runs the full ``--max-bytes``) captions
``--batch`` images of the demo's size (64 x 64 grayscale, 64 condition tokens), greedy, with
``decode_captions(kv_cache=True)`` and ``kv_cache=False``, interleaved, best of ``--repeats``.
Also checks that both give the same captions.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def main() -> int:
    from jin_orchestrate.config import load_config
    from jin_orchestrate.generate import build_generation_config
    from jin_orchestrate.generation import decode_captions
    from jin_orchestrate.model import JinModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--max-bytes", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = load_config("jin-tiny").model_dump(mode="json")
    cfg = build_generation_config(base, steps=1, lr=1e-3)
    torch.manual_seed(0)
    model = JinModel(cfg.model).eval()
    images = torch.randint(0, 256, (args.batch, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        cond = model.space.encode_batch({"image": images})["image"]
    padding = torch.zeros(cond.tokens.shape[:2], dtype=torch.bool)

    seconds: dict[bool, list[float]] = {True: [], False: []}
    captions: dict[bool, list[str]] = {}
    for _ in range(args.repeats):
        for cached in (True, False):
            start = time.perf_counter()
            captions[cached] = decode_captions(
                model, cond.tokens, padding, max_bytes=args.max_bytes, kv_cache=cached
            )
            seconds[cached].append(time.perf_counter() - start)
    best = {cached: min(times) for cached, times in seconds.items()}
    result = {
        "machine": f"{os.cpu_count()} CPU cores, {args.threads} threads, torch {torch.__version__}",
        "batch": args.batch,
        "condition_tokens": int(cond.tokens.shape[1]),
        "max_bytes": args.max_bytes,
        "kv_cache_s": round(best[True], 3),
        "full_recompute_s": round(best[False], 3),
        "speedup": round(best[False] / best[True], 2),
        "same_captions": captions[True] == captions[False],
    }
    print(
        f"{args.batch} captions of {args.max_bytes} bytes after {result['condition_tokens']} "
        f"condition tokens: KV cache {best[True]:.2f} s, full recompute {best[False]:.2f} s "
        f"({result['speedup']:.2f}x); same captions: {result['same_captions']}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["same_captions"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
