"""The curriculum trained in this process, without Ray: for benchmarks, baselines and tests.

Each stage gets a fresh :class:`~jin_orchestrate.train.StageTrainer` (optimiser and schedule), as
each Ray Train stage does, and the EMA schedule spans the whole curriculum. Batches come from one
seeded :class:`jin_data.ShardDataset` per epoch, so two models trained with the same config see the
same batches in the same order: comparisons between them differ only in the model. With a
``checkpoint_dir`` a run is resumable: killed and started again with the same arguments, it goes on
from its last checkpoint and ends with the weights an uninterrupted run would have.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from jin_data import ShardDataset
from jin_orchestrate.checkpoint import latest_checkpoint, stage_dir_name
from jin_orchestrate.config import JinConfig, StageConfig
from jin_orchestrate.data import rename_columns
from jin_orchestrate.ema import WeightEMA
from jin_orchestrate.train import StageTrainer, _batches

__all__ = ["TrainHistory", "batches", "train_in_process", "validation_losses"]


@dataclass
class TrainHistory:
    """Per-step metrics (with ``stage``, ``global_step``, ``step_s``), validation points, time."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    ema: WeightEMA | None = None  # the last stage's average (train.weight_ema > 0)


def batches(
    url: str, cfg: JinConfig, split: str = "train", *, epochs: int | None = None
) -> Iterator[dict[str, Any]]:
    """Shuffled full batches of ``split`` epoch after epoch (seeded by ``train.seed``)."""
    epoch = 0
    while epochs is None or epoch < epochs:
        yield from _epoch(url, cfg, split, epoch)
        epoch += 1


def _epoch(url: str, cfg: JinConfig, split: str, epoch: int) -> Iterator[dict[str, Any]]:
    # The columns the modalities are read from, each batch keyed by modality, as a Ray Train
    # worker reads them: a runtime-added modality reads the custom column (jin_orchestrate.extend).
    data = ShardDataset(
        url,
        batch_size=cfg.train.batch_size,
        shuffle=True,
        seed=cfg.train.seed,
        epoch=epoch,
        rank=0,
        world_size=1,
        split=split,
        modalities=list(cfg.data.source_columns),
        drop_last=True,
        audio_sample_rate=cfg.model.audio_sample_rate,
    )
    return (rename_columns(batch, cfg.data.columns) for batch in data)


@torch.no_grad()
def validation_losses(
    model: torch.nn.Module, val_batches: Sequence[dict[str, Any]], stage: StageConfig, seed: int = 0
) -> dict[str, float]:
    """Mean loss terms of ``model`` in eval mode on fixed batches, with fixed masks (``seed``)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    for batch in val_batches:
        for key, value in model(batch, stage=stage, generator=generator).items():
            if key != "tokens":
                sums[key] = sums.get(key, 0.0) + float(value)
    return {k: v / len(val_batches) for k, v in sums.items()}


def train_in_process(
    cfg: JinConfig,
    model: torch.nn.Module,
    url: str,
    *,
    val_batches: Sequence[dict[str, Any]] = (),
    val_every: int = 0,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_dir: str | Path | None = None,
) -> TrainHistory:
    """Train ``model`` through ``cfg.stages`` on the train split of ``url``; returns its history.

    With ``val_every`` > 0, :func:`validation_losses` of the current stage on ``val_batches`` is
    recorded every ``val_every`` global steps and at the end of training.

    With ``checkpoint_dir``, each stage's training state (weights, optimiser, EMA, RNGs, data
    position) is checkpointed there every ``train.checkpoint_every`` steps and at its end, only
    the newest kept; a stage that already has one resumes from it (a finished stage is restored
    and not trained again). ``history`` then holds this call's steps only.
    """
    history = TrainHistory()
    started = time.perf_counter()
    root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    stage_dirs = [stage_dir_name(index, stage.name) for index, stage in enumerate(cfg.stages)]
    position = (0, 0)  # (epoch, batches of it consumed)
    global_step = 0
    for index, stage in enumerate(cfg.stages):
        trainer = StageTrainer.create(cfg, stage, model, seed=cfg.train.seed + 1000 * index)
        trainer.global_step = global_step
        stage_dir = root / stage_dirs[index] if root is not None else None
        resume = latest_checkpoint(stage_dir) if stage_dir is not None else None
        if resume is not None:
            position = trainer.restore(resume)
        epochs = _batches(
            range(position[0], 10**9),
            lambda epoch: _epoch(url, cfg, "train", epoch),
            position[1],
            cfg.train.batch_size,
        )
        while trainer.step < stage.steps:
            epoch, count, batch = next(epochs)
            position = (epoch, count)
            t = time.perf_counter()
            result = trainer.train_step(batch)
            if result.skipped:
                continue
            record = {
                "stage": stage.name,
                "global_step": trainer.global_step,
                "step_s": time.perf_counter() - t,
                **result.metrics,
            }
            history.steps.append(record)
            if on_step is not None:
                on_step(record)
            last = index == len(cfg.stages) - 1 and trainer.step == stage.steps
            if val_batches and val_every and (trainer.global_step % val_every == 0 or last):
                point = validation_losses(model, val_batches, stage, seed=cfg.train.seed)
                history.validation.append({"global_step": trainer.global_step, **point})
            if stage_dir is not None and (
                trainer.step % cfg.train.checkpoint_every == 0 or trainer.step == stage.steps
            ):
                _replace_checkpoint(trainer, stage_dir, *position)
        global_step = trainer.global_step
        history.ema = trainer.ema
    history.wall_s = time.perf_counter() - started
    return history


def _replace_checkpoint(trainer: StageTrainer, stage_dir: Path, epoch: int, batch: int) -> None:
    """Write the trainer's state under ``stage_dir``, then drop the older ones: the newest
    complete checkpoint is on disk at every moment."""
    new = stage_dir / f"step-{trainer.step:08d}"
    # One of that name is a damaged checkpoint `latest_checkpoint` passed over (this run resumed
    # from an older one, or from the stage's start): this one takes its place.
    shutil.rmtree(new, ignore_errors=True)
    new = trainer.save(new, epoch, batch)
    for old in stage_dir.iterdir():
        if old != new:
            shutil.rmtree(old, ignore_errors=True)
