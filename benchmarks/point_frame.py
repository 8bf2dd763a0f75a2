"""Point clouds as given vs in their principal-axes frame, side by side in one run (jin-encoders).

    python benchmarks/point_frame.py --json benchmarks/results/point_frame.json [--demo]

NumberWorld's point clouds are its glyphs extruded and rotated at random, so an encoder that
reads the coordinates as given must learn the rotations from ~1,700 training clouds.
`PointCloudEncoderConfig(frame="pca")` removes them instead. Two measures, each run once per
frame with the same seed, batches and optimiser:

- supervised reading: a jin-encoders `PointCloudEncoder` (jin-tiny's: 64 groups of 16, width
  128) under a 4-block dense jin-backbone `Backbone` learns to read the tens and the units digit
  (two 10-way heads on the mean token); accuracy on test clouds of numbers seen in training and
  of the held-out numbers, every ``--every`` steps;
- with ``--demo``: the demo's whole self-supervised curriculum (jin-tiny, in process, ~15 min
  per frame on 2 cores) and its evaluation's point-cloud rows (retrieval against class
  prototypes, 90-way on the test split).

The corpus is generated into the jin cache if missing.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from vision_stem import (
    Reader,
    demo_corpus,
    print_curves,
    reader_parser,
    split_by_seen,
    train_reader,
)

FRAMES = ("input", "pca")
DEMO_KEYS = (
    "retrieval/text_to_points/R10",
    "retrieval/points_to_text/R10",
    "retrieval/image_to_points/R10",
    "retrieval/points_to_image/R10",
    "retrieval/audio_to_points/R10",
    "retrieval/points_to_audio/R10",
    "retrieval/text_to_image/R10",
    "retrieval/text_to_audio/R10",
)


def _split(url: str, split: str) -> tuple[Tensor, Tensor]:
    from jin_data import ShardDataset

    data = ShardDataset(url, batch_size=4096, shuffle=False, split=split, modalities=["points"])
    batch = next(iter(data))
    if batch["points_padding_mask"].any():
        raise ValueError(f"{url}: clouds of different sizes; this benchmark takes equal ones")
    return batch["points"].float(), batch["label"]


def supervised(data: dict[str, Tensor], steps: int, every: int, **config: Any) -> dict[str, Any]:
    """The supervised reader's curve with a jin-tiny-sized point encoder (``config`` on top)."""
    from jin_encoders import PointCloudEncoder, PointCloudEncoderConfig

    torch.manual_seed(0)
    encoder = PointCloudEncoder(
        PointCloudEncoderConfig(dim=128, num_groups=64, group_size=16, hidden=64, **config)
    )
    return train_reader(Reader(encoder), data, steps, every)


def demo(url: str, overrides: list[str]) -> dict[str, Any]:
    """The demo's curriculum in process (jin-tiny with ``overrides``) and its evaluation."""
    from jin_orchestrate.config import load_config
    from jin_orchestrate.evaluate import evaluate_model
    from jin_orchestrate.inprocess import train_in_process
    from jin_orchestrate.model import JinModel

    cfg = load_config("jin-tiny", overrides=overrides)
    torch.manual_seed(0)
    model = JinModel(cfg.model)
    start = time.perf_counter()
    train_in_process(cfg, model, url)
    metrics = evaluate_model(model, url, cfg.data)
    return {"seconds": time.perf_counter() - start, "metrics": metrics}


def print_demos(demos: list[dict[str, Any]], key: str) -> None:
    """A Markdown table of the demos' point-cloud retrieval rows (demos told apart by ``key``)."""
    print("| measure (demo curriculum, in process) | " + " | ".join(d[key] for d in demos) + " |")
    print("|---|" + "---|" * len(demos))
    for measure in DEMO_KEYS:
        cells = " | ".join(f"{d['metrics'].get(measure, float('nan')):.1%}" for d in demos)
        print(f"| {measure} | {cells} |")
    print(", ".join(f"{d[key]} {d['seconds']:.0f} s" for d in demos))


def compare(
    args: argparse.Namespace,
    variants: Mapping[str, dict[str, Any]],
    demo_variants: Iterable[str],
    key: str,
) -> int:
    """Each variant (``PointCloudEncoderConfig`` fields) in the supervised probe, then with
    ``args.demo`` each of ``demo_variants`` in the demo's curriculum; tables printed, JSON
    written to ``args.json``. Runs are told apart by ``key`` in both."""
    torch.set_num_threads(args.threads)
    url = args.data or demo_corpus()
    data = split_by_seen(*_split(url, "train"), *_split(url, "test"))
    runs = [
        {key: name, **supervised(data, args.steps, args.every, **config)}
        for name, config in variants.items()
    ]
    print_curves(data, runs, key, "clouds")
    print(", ".join(f"{r[key]} {r['seconds']:.0f} s" for r in runs))
    demos = [
        {key: name, **demo(url, [f"model.space.points.{k}={v}" for k, v in variants[name].items()])}
        for name in demo_variants
        if args.demo
    ]
    if demos:
        print_demos(demos, key)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {"supervised": runs, "demo": demos, "data": url}
    args.json.write_text(json.dumps(report, indent=1))
    return 0


def main() -> int:
    parser = reader_parser(__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="also the demo curriculum per frame")
    return compare(parser.parse_args(), {f: {"frame": f} for f in FRAMES}, FRAMES, "frame")


if __name__ == "__main__":
    raise SystemExit(main())
