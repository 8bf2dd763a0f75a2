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

import json
import time
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


def supervised(frame: str, data: dict[str, Tensor], steps: int, every: int) -> dict[str, Any]:
    from jin_encoders import PointCloudEncoder, PointCloudEncoderConfig

    torch.manual_seed(0)
    encoder = PointCloudEncoder(
        PointCloudEncoderConfig(dim=128, num_groups=64, group_size=16, hidden=64, frame=frame)
    )
    return {"frame": frame, **train_reader(Reader(encoder), data, steps, every)}


def demo(frame: str, url: str) -> dict[str, Any]:
    from jin_orchestrate.config import load_config
    from jin_orchestrate.evaluate import evaluate_model
    from jin_orchestrate.inprocess import train_in_process
    from jin_orchestrate.model import JinModel

    cfg = load_config("jin-tiny", overrides=[f"model.space.points.frame={frame}"])
    torch.manual_seed(0)
    model = JinModel(cfg.model)
    start = time.perf_counter()
    train_in_process(cfg, model, url)
    metrics = evaluate_model(model, url, cfg.data)
    return {"frame": frame, "seconds": time.perf_counter() - start, "metrics": metrics}


def main() -> int:
    parser = reader_parser(__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="also the demo curriculum per frame")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    url = args.data or demo_corpus()
    data = split_by_seen(*_split(url, "train"), *_split(url, "test"))
    runs = [supervised(frame, data, args.steps, args.every) for frame in FRAMES]
    print_curves(data, runs, "frame", "clouds")
    print(", ".join(f"{r['frame']} {r['seconds']:.0f} s" for r in runs))
    demos = [demo(frame, url) for frame in FRAMES] if args.demo else []
    if demos:
        print("| measure (demo curriculum, in process) | " + " | ".join(FRAMES) + " |")
        print("|---|" + "---|" * len(FRAMES))
        for key in DEMO_KEYS:
            cells = " | ".join(f"{d['metrics'].get(key, float('nan')):.1%}" for d in demos)
            print(f"| {key} | {cells} |")
        print(", ".join(f"{d['frame']} {d['seconds']:.0f} s" for d in demos))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {"supervised": runs, "demo": demos, "data": url}
    args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
