"""The paper's Table 4 in miniature: a generation fine-tune of the jin-tiny demo, then its scores.

    python benchmarks/generation.py --json benchmarks/results/generation.json \\
        [--checkpoint CKPT] [--steps 900] [--threads 1] [--data URL] [--trained DIR] \\
        [--seeds 3] [--set model.generation.audio_head=conv ...]

Starts from a pretrained checkpoint (``--checkpoint``; without one, the jin-tiny demo curriculum is
first pretrained in this process, ~8 min on 2 cores, and saved beside the JSON), adds generation
heads and trains one generation stage in this process (no Ray; the same `StageTrainer` step as the
Ray Train job of ``python -m jin_orchestrate.generate train``), seeded, on the NumberWorld corpus
(default: the demo's, generated into ``~/.cache/jin`` when missing), then scores it with
`jin_orchestrate.generation_eval.evaluate_generation`: Fréchet distances in the feature spaces of
small probe classifiers (not Inception-FID / FAD), conditioning accuracy, caption exact-match.
``--trained DIR`` skips training and scores a checkpoint written by an earlier run. Training is
checkpointed beside the JSON (``<json stem>/progress``, every ``train.checkpoint_every`` steps):
the same command run again after a kill resumes it, and ends where an uninterrupted run would.
``--seeds N`` scores it N times (seeds 0..N-1) and reports the spread of conditioning accuracy:
one seed on ~200 items is good to about +-4 points, so settings closer than that need several.
Writes the JSON, ``benchmarks/results/generation.md`` and PNGs of generated images under
``benchmarks/results/generation/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def _log(msg: str) -> None:
    print(f"[generation {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pretrain_demo(url: str, out: Path) -> str:
    """The jin-tiny demo curriculum, trained in this process on ``url``; saved to ``out``."""
    from jin_orchestrate.checkpoint import save_checkpoint
    from jin_orchestrate.config import load_config
    from jin_orchestrate.inprocess import train_in_process
    from jin_orchestrate.model import JinModel

    if (out / "state.json").exists():
        _log(f"reusing the demo pretrained earlier in {out}")
        return str(out)
    cfg = load_config("jin-tiny")
    torch.manual_seed(cfg.train.seed)
    model = JinModel(cfg.model)
    history = train_in_process(cfg, model, url)
    state = {"global_step": cfg.total_steps, "stage": cfg.stages[-1].name}
    save_checkpoint(out, model, config=cfg.model_dump(mode="json"), state=state)
    _log(f"pretrained the demo ({cfg.total_steps} steps, {history.wall_s:.0f} s) into {out}")
    return str(out)


def train(
    checkpoint: str, url: str, steps: int, lr: float, out: Path, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Fine-tune ``checkpoint`` for generation (``overrides``: ``--set`` of the generate job);
    save the result to ``out``; return the history. Resumes from ``out``'s sibling ``progress``
    when an earlier call was stopped."""
    from jin_orchestrate.checkpoint import latest_checkpoint, read_config, save_checkpoint
    from jin_orchestrate.extension import model_from_checkpoint
    from jin_orchestrate.generate import build_generation_config
    from jin_orchestrate.inprocess import train_in_process

    cfg = build_generation_config(read_config(checkpoint), steps=steps, lr=lr, overrides=overrides)
    torch.manual_seed(cfg.train.seed)
    model, base = model_from_checkpoint(checkpoint, cfg.model)
    every = max(1, steps // 20)

    def on_step(r: dict[str, Any]) -> None:
        if r["global_step"] % every == 0:
            terms = {k.split("/")[1]: round(v, 3) for k, v in r.items() if _logged(k)}
            _log(f"step {r['global_step']} ({r['step_s']:.2f} s) {terms}")

    progress = out.with_name("progress")
    resume = latest_checkpoint(progress)  # verifies every file's hash: once is enough
    if resume is not None:
        _log(f"resuming from {resume}")
    history = train_in_process(cfg, model, url, on_step=on_step, checkpoint_dir=progress)
    save_checkpoint(
        out,
        model,
        config=cfg.model_dump(mode="json"),
        state={
            "global_step": int(base.get("global_step", 0)) + steps,
            "stage": "generation",
            "stage_step": steps,
            "generation_steps": generation_steps(base) + steps,
        },
        ema=history.ema.state() if history.ema is not None else None,
    )
    shutil.rmtree(progress)  # optimiser state and all: the checkpoint above is the result
    last = history.steps[-1] if history.steps else {}
    step_s = sorted(r["step_s"] for r in history.steps) or [float("nan")]
    return {
        "steps": steps,
        "lr": lr,
        "batch_size": cfg.train.batch_size,
        "wall_s": round(history.wall_s, 1),
        "step_s_median": round(step_s[len(step_s) // 2], 3),
        "steps_this_run": len(history.steps),
        "final_losses": {k: round(v, 4) for k, v in last.items() if _logged(k)},
        "overrides": list(overrides),
        "base_pretraining_steps": base.get("global_step"),
        "base_stage": base.get("stage"),
        "base_generation_steps": generation_steps(base),
    }


def _resumed(training: dict[str, Any]) -> str:
    """``for the last N steps, resumed, `` when the run was resumed from its progress."""
    done = training.get("steps_this_run", training["steps"])
    return "" if done == training["steps"] else f"for the last {done} steps, resumed, "


def generation_steps(state: dict[str, Any]) -> int:
    """Generation steps behind a checkpoint's weights, over all its continuations (checkpoints
    of 0.14.1 and before record only their last run's, as ``stage_step``)."""
    if "generation_steps" in state:
        return int(state["generation_steps"])
    return int(state.get("stage_step", 0)) if state.get("stage") == "generation" else 0


def _logged(key: str) -> bool:
    """The generation stage's loss terms: diffusion and captions, and Eq. 6 alignment."""
    return key.startswith(("generation/", "align/"))


def main(argv: list[str] | None = None) -> int:
    from jin_orchestrate.evaluate import add_weights_argument
    from jin_orchestrate.overrides import add_override_argument

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument(
        "--checkpoint", help="pretrained checkpoint (default: pretrain the jin-tiny demo first)"
    )
    p.add_argument("--trained", type=Path, help="score this generation checkpoint, no training")
    p.add_argument("--data", help="jin-data URL (default: the demo's NumberWorld corpus)")
    p.add_argument("--steps", type=int, default=900)
    p.add_argument(
        "--lr",
        type=float,
        default=1e-3,
        help="peak learning rate (1e-3, the rate of the commands recorded in "
        "results/generation.md that do not name one; `generate train` defaults to 2e-3)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--samples", type=int, default=100, help="generated samples per direction")
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="the split generated from and scored (val: to choose guidance without the test set)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="score with seeds 0..N-1 (each seeds the probes and the initial noise) and report "
        "every image and audio direction's conditioning accuracy per seed and their mean; the "
        "table is seed 0's",
    )
    add_override_argument(
        p, "config override of the generation fine-tune, as the generate job's --set"
    )
    add_weights_argument(p)
    args = p.parse_args(argv)
    if args.seeds < 1:  # before any training, not after it
        p.error(f"--seeds: expected at least 1, got {args.seeds}")
    torch.set_num_threads(args.threads)
    if args.data is None:
        from jin_orchestrate.config import load_config
        from jin_orchestrate.data import default_corpus

        url = default_corpus(load_config("jin-tiny").data, progress=False)
    else:
        url = os.path.expanduser(args.data)
    result: dict[str, Any] = {"machine": f"{os.cpu_count()} CPU cores, {args.threads} thread(s)"}
    trained = args.trained
    if trained is None:
        trained = args.json.with_suffix("") / "checkpoint"
        if trained.exists():
            raise SystemExit(f"{trained} exists: remove it or pass --trained {trained}")
        base = args.checkpoint
        if base is None:
            base = pretrain_demo(url, args.json.with_suffix("") / "pretrained")
        _log(f"training {args.steps} steps from {base}")
        result["training"] = train(base, url, args.steps, args.lr, trained, args.overrides)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    from jin_orchestrate.checkpoint import EMA
    from jin_orchestrate.evaluate import load_model, weights_choice
    from jin_orchestrate.generation_eval import evaluate_generation

    ema = weights_choice(args)
    model = load_model(trained, ema=ema)
    result["weights"] = "ema" if ema or (ema is None and (trained / EMA).exists()) else "raw"
    started = time.perf_counter()
    runs = [
        evaluate_generation(
            model,
            url,
            samples=args.samples,
            steps=args.ddim_steps,
            guidance=args.guidance,
            seed=seed,
            image_dir=RESULTS / "generation" if seed == 0 else None,
            split=args.split,
        )
        for seed in range(args.seeds)
    ]
    result.update(checkpoint=str(trained), evaluation=runs[0])
    if args.seeds > 1:
        result["seeds"] = {
            key: [run[key] for run in runs]
            for key in runs[0]
            if key.startswith("conditioning_accuracy/")
        }
    result["evaluation_s"] = round(time.perf_counter() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (RESULTS / "generation.md").write_text(table + "\n")
    print(table)
    return 0


def markdown(result: dict[str, Any]) -> str:
    """The table of `format_generation` under a line on how the model was trained and scored."""
    from jin_orchestrate.generation_eval import format_generation

    lines = ["# Cross-modal generation: the paper's Table 4 in miniature", ""]
    training = result.get("training")
    if training:
        losses = ", ".join(f"{k.split('/')[1]} {v}" for k, v in training["final_losses"].items())
        base = (
            f"a jin-tiny generation checkpoint of "
            f"{training.get('base_generation_steps', training['base_pretraining_steps'])} "
            f"generation steps (continued)"
            if training.get("base_stage") == "generation"
            else f"a jin-tiny checkpoint pretrained for "
            f"{training.get('base_pretraining_steps', 340)} steps"
        )
        sets = " ".join(f"--set {o}" for o in training.get("overrides", []))
        lines += [
            f"Generation fine-tune of {base}: {training['steps']} steps"
            f"{f' ({sets})' if sets else ''}, "
            f"batch {training['batch_size']}, lr {training['lr']}, {training['wall_s']:.0f} s "
            f"{_resumed(training)}(median step {training['step_s_median']} s) "
            f"on {result['machine']}, in process. "
            f"Last-step losses: {losses}.",
            "",
        ]
    if result.get("weights") == "ema":
        lines += ["Scored with the average of the trained weights (`train.weight_ema`).", ""]
    lines += [format_generation(result["evaluation"]), ""]
    seeds = result.get("seeds")
    if seeds:
        n = len(next(iter(seeds.values())))
        per_direction = [
            key.split("/")[1].replace("_to_", "→")
            + ": "
            + ", ".join(f"{a:.1%}" for a in accuracies)
            + f" (mean {sum(accuracies) / n:.1%})"
            for key, accuracies in seeds.items()
        ]
        lines += [
            f"Conditioning accuracy with seeds 0-{n - 1} (each seeds the probes and the initial "
            "noise; the table is seed 0's): " + "; ".join(per_direction) + ".",
            "",
        ]
    lines.append(f"Scoring took {result['evaluation_s']:.0f} s. Generated images: `generation/`.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
