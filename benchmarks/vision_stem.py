"""Linear patches vs the convolutional stem, side by side in one run (jin-encoders).

    python benchmarks/vision_stem.py --json benchmarks/results/vision_stem.json [--steps 1200]

Can the image path read NumberWorld's digits from the demo corpus (~1,700 training images)? A
jin-encoders `VisionEncoder` (jin-tiny's: 8-px patches, width 128) under a jin-backbone
`Backbone` (4 dense blocks) is trained, supervised, to read the tens and the units digit (two
10-way heads on the masked mean of the tokens) of 32-px images, once per stem, with the same
seed, batches and optimiser. Printed: accuracy on test images of numbers seen in training and on
the held-out numbers (the digits are seen, the pair is not), and training loss, every 300 steps,
and the wall time of each run. The corpus is generated into the jin cache if missing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Reader(nn.Module):
    """``encoder``'s tokens under a 4-block dense jin-backbone `Backbone`, two 10-way digit heads
    (tens, units) on the mean token. Built after the encoder, so seeded runs stay comparable."""

    def __init__(self, encoder: nn.Module) -> None:
        from jin_backbone import Backbone, BackboneConfig

        super().__init__()
        self.encoder = encoder
        self.backbone = Backbone(
            BackboneConfig(dim=128, depth=4, num_heads=4, num_experts=4, moe_every=0)
        )
        self.head = nn.Linear(128, 20)

    def forward(self, inputs: Tensor) -> Tensor:
        hidden = self.backbone(self.encoder(inputs).tokens).hidden
        return self.head(hidden.mean(1))


def _split(url: str, split: str) -> tuple[Tensor, Tensor]:
    from jin_data import ShardDataset

    batch = next(
        iter(ShardDataset(url, batch_size=4096, shuffle=False, split=split, modalities=["image"]))
    )
    images = F.interpolate(batch["image"].float(), size=(32, 32), mode="area")
    return images.round().clamp(0, 255).to(torch.uint8), batch["label"]


def _accuracy(model: nn.Module, inputs: Tensor, labels: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(inputs[i : i + 256]) for i in range(0, len(inputs), 256)])
    model.train()
    read = 10 * logits[:, :10].argmax(-1) + logits[:, 10:].argmax(-1)
    return float((read == labels).float().mean())


def train_reader(
    model: nn.Module, data: dict[str, Tensor], steps: int, every: int
) -> dict[str, Any]:
    """Train ``model`` (inputs -> 20 logits: tens, units) to read ``data``'s numbers.

    AdamW at 2e-3 with 50 warm-up steps, batches of 32 in a seeded order; ``data`` holds
    ``train_x/y``, ``seen_x/y`` and ``held_x/y``. Returns the wall time and, every ``every``
    steps, the training loss and the accuracy on the seen and held-out test numbers.
    """
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    inputs, labels = data["train_x"], data["train_y"]
    curve: list[dict[str, float]] = []
    step, start = 0, time.perf_counter()
    while step < steps:
        order = torch.randperm(len(labels), generator=generator)
        for first in range(0, len(labels) - 31, 32):
            rows = order[first : first + 32]
            for group in optimizer.param_groups:
                group["lr"] = 2e-3 * min(1.0, (step + 1) / 50)
            logits = model(inputs[rows])
            loss = F.cross_entropy(logits[:, :10], labels[rows] // 10) + F.cross_entropy(
                logits[:, 10:], labels[rows] % 10
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % every == 0 or step == steps:
                curve.append(
                    {
                        "step": step,
                        "train_loss": round(loss.item(), 4),
                        "seen": _accuracy(model, data["seen_x"], data["seen_y"]),
                        "held_out": _accuracy(model, data["held_x"], data["held_y"]),
                    }
                )
            if step >= steps:
                break
    return {"seconds": time.perf_counter() - start, "curve": curve}


def split_by_seen(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor
) -> dict[str, Tensor]:
    """``train_reader``'s data: the test items of numbers seen in training and the others."""
    seen = torch.isin(test_y, train_y.unique())
    return {
        "train_x": train_x,
        "train_y": train_y,
        "seen_x": test_x[seen],
        "seen_y": test_y[seen],
        "held_x": test_x[~seen],
        "held_y": test_y[~seen],
    }


def demo_corpus() -> str:
    """The demo's NumberWorld corpus (jin-tiny's data), generated into the cache if absent."""
    from jin_orchestrate.config import load_config
    from jin_orchestrate.data import default_corpus

    return default_corpus(load_config("jin-tiny").data, progress=False)


def print_curves(data: dict[str, Tensor], runs: list[dict[str, Any]], key: str, items: str) -> None:
    """The data's sizes and a Markdown table of each run's curve (runs told apart by ``key``)."""
    print(
        f"{len(data['train_y'])} training {items}, {len(data['seen_y'])} seen / "
        f"{len(data['held_y'])} held-out"
    )
    print(f"| {key} | step | train loss | test acc (seen) | test acc (held-out) |")
    print("|---|---|---|---|---|")
    for r in runs:
        for point in r["curve"]:
            print(
                f"| {r[key]} | {point['step']} | {point['train_loss']:.3f} | "
                f"{point['seen']:.1%} | {point['held_out']:.1%} |"
            )


def run(stem: str, data: dict[str, Tensor], steps: int, every: int) -> dict[str, Any]:
    from jin_encoders import VisionEncoder, VisionEncoderConfig

    torch.manual_seed(0)
    encoder = VisionEncoder(
        VisionEncoderConfig(dim=128, patch_size=8, in_channels=1, pos_grid=4, stem=stem)
    )
    return {"stem": stem, **train_reader(Reader(encoder), data, steps, every)}


def reader_parser(description: str) -> argparse.ArgumentParser:
    """The options of a supervised-reading benchmark (this one and `point_frame.py`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--data", default=None, help="corpus URL (default: the demo's cache)")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--every", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    return parser


def main() -> int:
    args = reader_parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(args.threads)
    url = args.data or demo_corpus()
    data = split_by_seen(*_split(url, "train"), *_split(url, "test"))
    runs = [run(stem, data, args.steps, args.every) for stem in ("patch", "conv")]
    print_curves(data, runs, "stem", "images")
    patch, conv = runs
    print(
        f"wall: patch {patch['seconds']:.0f} s, conv {conv['seconds']:.0f} s "
        f"(conv/patch {conv['seconds'] / patch['seconds']:.2f}x); final seen accuracy "
        f"conv/patch {conv['curve'][-1]['seen']:.1%} / {patch['curve'][-1]['seen']:.1%}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"runs": runs, "data": url}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
