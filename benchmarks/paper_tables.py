"""The paper's Tables 2, 3, 5 and 6 in miniature: Jin and its baselines trained on one budget.

    python benchmarks/paper_tables.py --json benchmarks/results/paper_tables.json \\
        [--budget-minutes 45] [--ablation-share 0.4] [--data URL] [--preset jin-tiny]

Everything runs in this process (no Ray), seeded, on the NumberWorld corpus (generated into
``~/.cache/jin`` when missing). Every model sees the same batches in the same order for the same
number of optimiser steps at the same batch size and learning-rate schedule (the preset's;
``--budget-minutes`` scales the step counts, 45 = the preset's own curriculum):

- Jin (MoE): the preset, its three curriculum stages (paper §4.2);
- Jin (dense): the same with every backbone FFN dense (Table 6);
- two-tower (CLIP/CLAP): a tower per modality, InfoNCE only, one stage of the same total steps;
- Jin, text+audio only: the retrieval pair alone, the paper's "single-modality baseline" for
  AudioCaps retrieval read at our scale (does training on more modalities help T↔A?);
- image-only z-JEPA, the five configurations of Table 5, one stage each of ``--ablation-share``
  of the total steps (Table 5 compares them only with each other; the five are half the run's
  time at full length, so they get a shorter, equal budget and the multimodal models keep theirs);
  the full configuration is also the single-modality baseline for the image probe;
- untrained Jin: the floor every figure should clear.

Each is evaluated by :func:`jin_orchestrate.evaluate.evaluate` (zero-shot, retrieval in both
pools, image linear probe). Table 6: validation InfoNCE of MoE and dense along stage 3, and
embedding throughput (samples/s, batch 64, median of interleaved repeats) per modality.
Writes the JSON, ``benchmarks/results/paper_tables.md`` and PNG plots beside it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
FULL_BUDGET_MINUTES = 45.0
THROUGHPUT_COLUMNS = ("text", "image", "audio", "points", "multi")


def _scaled(cfg: Any, scale: float) -> Any:
    data = cfg.model_dump()
    for stage in data["stages"]:
        stage["steps"] = max(1, round(stage["steps"] * scale))
    return type(cfg).model_validate(data)


def _log(msg: str) -> None:
    print(f"[paper_tables {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _train(name: str, cfg: Any, model: torch.nn.Module, url: str, **kw: Any) -> Any:
    from jin_orchestrate.inprocess import train_in_process

    every = max(1, cfg.total_steps // 10)

    def on_step(r: dict[str, Any]) -> None:
        if r["global_step"] % every == 0:
            _log(f"{name}: step {r['global_step']}/{cfg.total_steps} loss={r['loss']:.4f}")

    history = train_in_process(cfg, model, url, on_step=on_step, **kw)
    _log(f"{name}: trained {cfg.total_steps} steps in {history.wall_s:.0f} s")
    return history


def _only(batch: dict[str, Any], modality: str | None) -> dict[str, Any]:
    """``batch`` without the other modalities' keys (``None``: every modality)."""
    if modality is None:
        return batch
    others = [m for m in THROUGHPUT_COLUMNS[:-1] if m != modality]
    return {
        k: v for k, v in batch.items() if not any(k == m or k.startswith(f"{m}_") for m in others)
    }


@torch.no_grad()
def _throughput(
    models: dict[str, torch.nn.Module], batch: dict[str, Any], repeats: int
) -> dict[str, dict[str, float]]:
    """Samples/s of ``embed`` per modality and for all at once, models interleaved per repeat."""
    n = len(batch["label"])
    views = {c: _only(batch, None if c == "multi" else c) for c in THROUGHPUT_COLUMNS}
    times: dict[str, dict[str, list[float]]] = {m: {c: [] for c in views} for m in models}
    for model in models.values():
        model.eval()
        for view in views.values():
            model.embed(view)  # warm-up
    for _ in range(repeats):
        for name, model in models.items():
            for column, view in views.items():
                t = time.perf_counter()
                model.embed(view)
                times[name][column].append(time.perf_counter() - t)
    return {
        m: {c: n / statistics.median(ts) for c, ts in cols.items()} for m, cols in times.items()
    }


def _matched(validation: dict[str, list[dict[str, Any]]], key: str) -> dict[str, Any]:
    """The worse final ``key`` of the models, and the first step at which each reached it."""
    finals = {m: points[-1][key] for m, points in validation.items()}
    target = max(finals.values())
    reached = {
        m: next((p["global_step"] for p in points if p[key] <= target), None)
        for m, points in validation.items()
    }
    return {"target": target, "final": finals, "first_step_at_target": reached}


def render(report: dict[str, Any], path: Path) -> None:
    """``benchmarks/results/paper_tables.md`` from the report: the four tables and what was run."""
    from jin_orchestrate.tables import (
        ablation_table,
        probe_table,
        published_context,
        retrieval_table,
        throughput_table,
        write_atomic,
        zero_shot_table,
    )

    metrics = report["metrics"]
    t6 = report["table6"]
    matched = t6["matched_validation_align"]
    rows = {}
    for name in ("Jin (MoE)", "Jin (dense)"):
        p = t6["parameters"][name]
        rows[name] = {
            **t6["samples_per_s"][name],
            "val InfoNCE (end)": matched.get("final", {}).get(name, float("nan")),
            "step at matched loss": matched.get("first_step_at_target", {}).get(name) or 0,
            "params total": p["total"],
            "params active": p["active"],
        }
    stages = ", ".join(f"{s['name']} {s['steps']}" for s in report["stages"])
    load = ", ".join(f"{x:.1f}" for x in report["loadavg_start"])
    load_end = ", ".join(f"{x:.1f}" for x in report["loadavg_end"])
    text = [
        "# benchmarks/paper_tables.py — the paper's Tables 2, 3, 5, 6 on NumberWorld",
        f"`python benchmarks/paper_tables.py --json benchmarks/results/paper_tables.json "
        f"--budget-minutes {report['budget_minutes']:g} --ablation-share "
        f"{report['ablation_share']:g}`: preset {report['preset']}, "
        f"{report['steps_per_model']} optimiser steps of batch {report['batch_size']} per model "
        f"(stages {stages} for the "
        f"curriculum models; one stage of the same total for the two-tower and text+audio "
        f"models; one stage of {report['ablation_steps']} steps for each Table 5 config), "
        f"seed {report['seed']}, "
        f"torch {torch.__version__}, {report['torch_threads']} threads, one process. Wall time "
        f"{report['wall_s'] / 60:.1f} min; load average at start {load}, at end {load_end}.",
        "## Table 2 — zero-shot classification of held-out numbers (%)",
        zero_shot_table(metrics),
        "## Table 3 — retrieval R@1 / R@5 / R@10 (%), one candidate per number",
        retrieval_table(metrics, "prototype"),
        "## Table 3 — retrieval, instance pool (every test item; only the own pair counts)",
        retrieval_table(metrics, "instance"),
        "## Linear probe of frozen image embeddings (%)",
        probe_table(
            {
                **metrics,
                **{
                    f"image-only z-JEPA, {report['ablation_steps']} steps: {k}": v
                    for k, v in report["zjepa_ablation"].items()
                },
            }
        ),
        f"## Table 5 — z-JEPA ablation: image-only pretraining, {report['ablation_steps']} "
        "steps each, linear probe (%)",
        ablation_table(report["zjepa_ablation"]),
        "## Table 6 — dense vs MoE: embedding samples/s (batch "
        f"{t6['throughput_batch']}) and validation InfoNCE in stage {t6['last_stage']}",
        throughput_table(rows, THROUGHPUT_COLUMNS),
        f"Matched validation loss: the worse final validation InfoNCE of the two "
        f"({matched.get('target', float('nan')):.4f}); 'step at matched loss' is the first "
        "validation point at or below it (0: never reached).",
        "## Training time per model (s)",
        "\n".join(f"- {m}: {s:.0f}" for m, s in report["train_wall_s"].items()),
        "## Plots",
        "\n".join(f"- [{Path(p).name}]({p})" for p in report["plots"]),
        published_context(),
    ]
    write_atomic(path, "\n\n".join(text) + "\n")


def main() -> int:
    from jin_orchestrate.baselines import (
        TwoTowerModel,
        dense_config,
        image_jepa_stage,
        single_modality_config,
        zjepa_ablation,
    )
    from jin_orchestrate.config import load_config
    from jin_orchestrate.evaluate import evaluate, write_plots
    from jin_orchestrate.inprocess import batches
    from jin_orchestrate.model import JinModel, count_parameters
    from jin_orchestrate.plots import loss_curves
    from jin_orchestrate.tables import PUBLISHED, write_json
    from jin_zjepa import TABLE5_ABLATIONS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--budget-minutes", type=float, default=FULL_BUDGET_MINUTES)
    parser.add_argument(
        "--ablation-share",
        type=float,
        default=0.4,
        help="steps of each Table 5 config as a share of the multimodal models' steps (0, 1]",
    )
    parser.add_argument("--data", help="jin-data URL (default: the preset's NumberWorld corpus)")
    parser.add_argument("--preset", default="jin-tiny")
    parser.add_argument("--markdown", type=Path, default=RESULTS / "paper_tables.md")
    parser.add_argument("--plots", type=Path, default=RESULTS / "paper_tables")
    parser.add_argument("--repeats", type=int, default=7, help="throughput repeats")
    args = parser.parse_args()
    if not args.budget_minutes > 0:  # before the corpus and any training, not after them
        parser.error(f"--budget-minutes: expected a positive number, got {args.budget_minutes}")
    if args.repeats < 1:
        parser.error(f"--repeats: expected at least 1, got {args.repeats}")

    started = time.perf_counter()
    load_start = os.getloadavg()
    if args.data is None:
        from jin_orchestrate.data import default_corpus

        url = default_corpus(load_config(args.preset).data, progress=False)
    else:
        url = str(Path(args.data).expanduser())
    if not Path(url).is_dir():
        print(f"error: --data {url} is not a directory of jin-data shards", file=sys.stderr)
        return 2
    if not 0 < args.ablation_share <= 1:
        print(f"error: --ablation-share {args.ablation_share} is not in (0, 1]", file=sys.stderr)
        return 2
    scale = args.budget_minutes / FULL_BUDGET_MINUTES
    cfg = _scaled(load_config(args.preset), scale)
    total = cfg.total_steps
    seed = cfg.train.seed
    ablation_steps = max(1, round(total * args.ablation_share))
    _log(
        f"{args.preset}: {total} steps per model, {ablation_steps} per Table 5 config "
        f"(budget {args.budget_minutes} min), {url}"
    )

    val_batches = list(batches(url, cfg, "val", epochs=1))[:4]
    wide = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": 64})})
    throughput_batch = next(batches(url, wide, "val", epochs=1), None)
    if throughput_batch is None:  # found now, not after every model has trained
        print(
            f"error: --data {url}: its val split has no full batch of 64 samples for Table 6's "
            "throughput",
            file=sys.stderr,
        )
        return 2
    val_every = max(1, total // 10)
    histories: dict[str, Any] = {}
    evaluations: dict[str, Any] = {}
    models: dict[str, torch.nn.Module] = {}

    def run(name: str, run_cfg: Any, model: torch.nn.Module, **kw: Any) -> None:
        histories[name] = _train(name, run_cfg, model, url, **kw)
        evaluations[name] = evaluate(model, url)
        models[name] = model
        _log(f"{name}: evaluated ({time.perf_counter() - started:.0f} s so far)")

    torch.manual_seed(seed)
    run("Jin (MoE)", cfg, JinModel(cfg.model), val_batches=val_batches, val_every=val_every)
    dense = cfg.model_copy(update={"model": dense_config(cfg.model)})
    torch.manual_seed(seed)
    run("Jin (dense)", dense, JinModel(dense.model), val_batches=val_batches, val_every=val_every)
    contrastive = type(cfg).model_validate(
        {**cfg.model_dump(), "stages": [{"name": "contrastive", "steps": total, "gamma": 1.0}]}
    )
    torch.manual_seed(seed)
    run("two-tower (CLIP/CLAP)", contrastive, TwoTowerModel(cfg.model))
    pair = single_modality_config(cfg, ("text", "audio"))
    torch.manual_seed(seed)
    run("Jin, text+audio only", pair, JinModel(pair.model))
    image_cfg = single_modality_config(cfg, ("image",))
    ablation: dict[str, Any] = {}
    for row in TABLE5_ABLATIONS:
        row_cfg = type(cfg).model_validate(
            {
                **image_cfg.model_dump(),
                "model": zjepa_ablation(image_cfg.model, row).model_dump(),
                "stages": [image_jepa_stage(ablation_steps).model_dump()],
            }
        )
        torch.manual_seed(seed)
        model = JinModel(row_cfg.model)
        name = f"image-only z-JEPA: {row}"
        histories[name] = _train(name, row_cfg, model, url)
        ablation[row] = evaluate(model, url).metrics
        _log(f"{name}: evaluated")
    torch.manual_seed(seed)
    evaluations["untrained Jin"] = evaluate(JinModel(cfg.model), url)

    speed = _throughput(
        {"Jin (MoE)": models["Jin (MoE)"], "Jin (dense)": models["Jin (dense)"]},
        throughput_batch,
        args.repeats,
    )
    validation = {m: histories[m].validation for m in ("Jin (MoE)", "Jin (dense)")}
    last_stage = cfg.stages[-1].name
    stage3_from = total - cfg.stages[-1].steps
    stage3 = {m: [p for p in v if p["global_step"] > stage3_from] for m, v in validation.items()}
    matched = _matched(stage3, "align") if all(stage3.values()) else {}
    params = {
        "Jin (MoE)": count_parameters(cfg.model),
        "Jin (dense)": count_parameters(dense.model),
    }

    args.plots.mkdir(parents=True, exist_ok=True)
    plots = [
        loss_curves(
            {m: h.steps for m, h in histories.items() if not m.startswith("image-only")},
            args.plots / "loss_curves.png",
        ),
        loss_curves(
            {m: h.steps for m, h in histories.items() if m.startswith("image-only")},
            args.plots / "loss_curves_zjepa_ablation.png",
        ),
    ]
    for name, prefix in (("Jin (MoE)", "jin_"), ("two-tower (CLIP/CLAP)", "two_tower_")):
        plots += write_plots(evaluations[name], args.plots, prefix)

    wall = time.perf_counter() - started
    report = {
        "preset": args.preset,
        "data": url,
        "budget_minutes": args.budget_minutes,
        "steps_per_model": total,
        "ablation_share": args.ablation_share,
        "ablation_steps": ablation_steps,
        "stages": [s.model_dump() for s in cfg.stages],
        "batch_size": cfg.train.batch_size,
        "seed": seed,
        "torch_threads": torch.get_num_threads(),
        "wall_s": wall,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "train_wall_s": {m: h.wall_s for m, h in histories.items()},
        "metrics": {m: e.metrics for m, e in evaluations.items()},
        "zjepa_ablation": ablation,
        "validation": validation,
        "table6": {
            "last_stage": last_stage,
            "matched_validation_align": matched,
            "samples_per_s": speed,
            "throughput_batch": len(throughput_batch["label"]),
            "parameters": {m: {"total": p.total, "active": p.active} for m, p in params.items()},
        },
        # Relative to the Markdown file, wherever --markdown and --plots put the two.
        "plots": [os.path.relpath(p, args.markdown.parent) for p in plots],
        "published_for_context": PUBLISHED,
    }
    write_json(args.json, report)
    render(report, args.markdown)
    _log(f"done in {wall / 60:.1f} min: {args.json}, {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
