"""The per-worker training loop of one curriculum stage, run by Ray Train's ``TorchTrainer``.

Everything Ray-specific is confined to :func:`train_stage_worker`; the step itself
(:class:`StageTrainer`) is plain PyTorch so tests can drive it without Ray.

Resumption order at worker start (paper §4.2: "each stage starts from the previous stage's
checkpoint"): the latest complete checkpoint of this stage on storage (after a worker failure, or
``--resume``), else Ray's own checkpoint, else the previous stage's final weights, else a fresh
model.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jin_orchestrate._worker_log import quiet_report_dumps, say
from jin_orchestrate.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from jin_orchestrate.config import DataConfig, JinConfig, StageConfig
from jin_orchestrate.data_faults import tally_metrics
from jin_orchestrate.ema import WeightEMA
from jin_orchestrate.faults import FaultPlan
from jin_orchestrate.model import JinModel

__all__ = [
    "STOPPED",
    "EmptyEpochError",
    "JobStopped",
    "NonFiniteLossError",
    "StageTrainer",
    "lr_at",
    "stopped_error",
    "train_stage_worker",
]

# Written into the stage's storage directory when the workers stop the job (a `JobStopped`): why.
STOPPED = "stopped.txt"


class JobStopped(RuntimeError):
    """A condition retrying cannot cure: the workers end and the driver raises it, so Ray Train
    does not restart them from the same checkpoint into the same failure."""


class NonFiniteLossError(JobStopped):
    """Too many consecutive steps produced a non-finite loss or gradient; the job stops."""


class EmptyEpochError(JobStopped):
    """An epoch of a worker's data shard gave no full batch: the job would wait forever."""


def stopped_error(text: str) -> JobStopped:
    """The `JobStopped` a worker recorded as ``"<TypeName>: <message>"`` in `STOPPED`."""
    name, _, message = text.partition(": ")
    kinds = {k.__name__: k for k in (NonFiniteLossError, EmptyEpochError)}
    return kinds[name](message) if name in kinds else JobStopped(text)


def lr_at(step: int, total: int, base_lr: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to ``min_ratio * base_lr``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class StepResult:
    """What one optimiser step reports (``skipped`` when the loss was not finite)."""

    metrics: dict[str, float]
    skipped: bool
    tokens: int


@dataclass
class StageTrainer:
    """One stage's optimisation state: model (maybe DDP-wrapped), optimiser and counters."""

    cfg: JinConfig
    stage: StageConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    step: int = 0
    global_step: int = 0
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0
    data_errors: dict[str, int] = field(default_factory=dict)
    faults: FaultPlan | None = None  # fault drills only (jin_orchestrate.faults)
    ema: WeightEMA | None = None  # train.weight_ema > 0

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole curriculum (the EMA momentum schedule spans them)."""
        return self.cfg.total_steps

    @property
    def core(self) -> JinModel:
        return getattr(self.model, "module", self.model)

    @classmethod
    def create(
        cls,
        cfg: JinConfig,
        stage: StageConfig,
        model: torch.nn.Module,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> StageTrainer:
        """AdamW, no weight decay on 1-D parameters (norms, biases, modality rows); seeded masks.

        With ``device``, the model is moved there first, so the optimiser state that
        :meth:`restore` loads and the weight average are created beside the parameters.
        """
        if device is not None:
            model = model.to(device)
        core = getattr(model, "module", model)
        if stage.trainable:
            core.freeze_except(stage.trainable)
        decay, no_decay = [], []
        for name, p in core.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or name.endswith("bias") else decay).append(p)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.train.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=stage.lr or cfg.train.lr,
            betas=(0.9, 0.95),
        )
        generator = torch.Generator().manual_seed(seed)
        ema = WeightEMA(core, cfg.train.weight_ema) if cfg.train.weight_ema > 0 else None
        return cls(cfg, stage, model, optimizer, generator, ema=ema)

    def train_step(self, batch: dict[str, Any]) -> StepResult:
        """Forward, backward, clip, step, EMA update; a non-finite loss skips the update."""
        t = self.cfg.train
        lr = lr_at(
            self.step, self.stage.steps, self.stage.lr or t.lr, t.warmup_steps, t.min_lr_ratio
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        device = next(self.core.parameters()).device.type  # JinModel or a baseline
        with torch.autocast(device, dtype=torch.bfloat16, enabled=t.precision == "bf16"):
            losses = self.model(batch, stage=self.stage, generator=self.generator)
        loss = losses["loss"]
        if self.faults is not None and self.faults.nonfinite(self.step + 1):
            loss = loss * float("nan")
        tokens = int(losses.get("tokens", torch.tensor(0)).item())
        self.optimizer.zero_grad(set_to_none=True)
        if not _finite_on_every_rank(loss):
            return self._skip("loss", tokens)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        # DDP all-reduced the gradients: every rank sees the same norm and skips alike.
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return self._skip("gradient", tokens)
        self.nonfinite_in_row = 0
        self.optimizer.step()
        # CLIP's bound on the temperature, kept on the stored value after the step (jin-zjepa
        # 0.3.1): past it the scale would get no gradient and could not come back.
        self.core.logit_scale.clamp_()
        # The momentum after optimiser step global_step (0-based): the schedule's start value after
        # the first step, as jin_zjepa's EMAConfig.momentum defines it.
        self.core.update_target(self.global_step, self.total_steps)
        self.step += 1
        self.global_step += 1
        if self.ema is not None:
            self.ema.update(self.core)
        metrics = {k: float(v.detach()) for k, v in losses.items() if k != "tokens"}
        metrics.update(
            lr=lr, grad_norm=float(grad_norm), nonfinite_steps=float(self.nonfinite_total)
        )
        return StepResult(metrics, False, tokens)

    def _skip(self, what: str, tokens: int) -> StepResult:
        """Count a step whose loss or gradient was not finite; too many in a row stop the job
        (a finite loss with a non-finite gradient, 0 * Inf in the backward, counts alike)."""
        self.nonfinite_total += 1
        self.nonfinite_in_row += 1
        if self.nonfinite_in_row >= self.cfg.train.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"stage {self.stage.name!r}: {what} was non-finite for {self.nonfinite_in_row} "
                f"steps in a row (at step {self.step}); stopping with the last good "
                "checkpoint intact. Lower train.lr or check the data."
            )
        return StepResult({"nonfinite_steps": float(self.nonfinite_total)}, True, tokens)

    def state(self, epoch: int, batch_in_epoch: int) -> dict[str, Any]:
        return {
            "stage": self.stage.name,
            "stage_step": self.step,
            "stage_steps": self.stage.steps,
            "global_step": self.global_step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "nonfinite_total": self.nonfinite_total,
            "data_errors": self.data_errors,
            **({"ema_updates": self.ema.updates} if self.ema is not None else {}),
        }

    def rng_states(self) -> dict[str, torch.Tensor]:
        """This process's random streams: torch's global RNGs and the mask generator."""
        return {**rng_state(), "mask_generator": self.generator.get_state()}

    def save(
        self,
        directory: Path,
        epoch: int,
        batch_in_epoch: int,
        peers: dict[int, dict[str, torch.Tensor]] | None = None,
    ) -> Path:
        """Checkpoint the stage; ``peers`` are the other data-parallel ranks' :meth:`rng_states`
        by rank (each rank draws its own masks and noise), stored as ``rank<r>.<name>``."""
        rng = {"mask_generator": self.generator.get_state()}
        for rank, states in (peers or {}).items():
            if rank != 0:
                rng.update({f"rank{rank}.{name}": t for name, t in states.items()})
        return save_checkpoint(
            directory,
            self.core,
            config=self.cfg.model_dump(mode="json"),
            state=self.state(epoch, batch_in_epoch),
            optimizer=self.optimizer,
            rng=rng,
            ema=self.ema.state() if self.ema is not None else None,
        )

    def restore(self, path: str | os.PathLike[str], rank: int = 0) -> tuple[int, int]:
        """Resume this stage: weights, optimiser, counters and this ``rank``'s RNG; returns
        (epoch, batch). A rank the checkpoint holds no RNG states for keeps its own seeds."""
        loaded = load_checkpoint(path, self.core, load_optimizer=True)
        self.global_step = int(loaded.state.get("global_step", 0))
        if loaded.optimizer_state is not None:
            self.optimizer.load_state_dict(loaded.optimizer_state)
        prefix = f"rank{rank}."
        rng = (
            loaded.rng
            if rank == 0
            else {k.removeprefix(prefix): t for k, t in loaded.rng.items() if k.startswith(prefix)}
        )
        restore_rng(rng)
        if "mask_generator" in rng:
            self.generator.set_state(rng["mask_generator"])
        self.step = int(loaded.state["stage_step"])
        self.nonfinite_total = int(loaded.state.get("nonfinite_total", 0))
        if self.ema is not None and loaded.ema is not None:
            self.ema.load(loaded.ema, int(loaded.state.get("ema_updates", 0)))
        elif self.ema is not None:  # saved without an average: start one from these weights
            self.ema = WeightEMA(self.core, self.ema.decay)
        return int(loaded.state.get("epoch", 0)), int(loaded.state.get("batch_in_epoch", 0))


def _finite_on_every_rank(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every data-parallel rank.

    A rank that skipped ``backward`` while the others ran it would hang DDP's gradient all-reduce,
    so the skip decision is agreed on by all ranks.
    """
    finite = torch.isfinite(loss.detach()).float()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite.item())


def _progress_line(stage: StageConfig, step: int, metrics: dict[str, float]) -> str:
    shown = " ".join(
        f"{k}={metrics[k]:.4g}"
        for k in ("loss", "jepa", "cross_modal", "align", "zjepa")
        if k in metrics
    )
    return (
        f"[jin] {stage.name} step {step}/{stage.steps} {shown} "
        f"lr={metrics['lr']:.2e} tok/s={metrics.get('tokens_per_s', 0):.0f}"
    )


def _batches(
    epochs: Iterable[int], make_epoch: Any, skip_first: int, batch_size: int
) -> Iterator[tuple[int, int, dict[str, Any]]]:
    for epoch in epochs:
        count = 0
        for count, batch in enumerate(make_epoch(epoch), start=1):
            if skip_first and count <= skip_first:
                continue
            yield epoch, count, batch
        if count == 0:
            raise EmptyEpochError(
                f"epoch {epoch} gave no full batch of {batch_size} samples on this worker "
                "(batches drop the last partial one): lower train.batch_size or give the job more "
                "data"
            )
        skip_first = 0


def epoch_shuffle(data: DataConfig, stage_seed: int, epoch: int, rank: int) -> dict[str, Any]:
    """``iter_torch_batches`` arguments that mix a worker's rows anew every epoch.

    The dataset's seeded ``random_shuffle`` is one fixed permutation: Ray repeats it on every
    pass, so without this each epoch (and stage) would see the rows in the same order. A local
    buffer of ``data.shuffle_buffer`` rows, seeded by (seed, stage, epoch, rank), reorders each
    epoch differently, and the same way again when a resumed run replays that epoch.
    """
    if not data.shuffle_buffer:
        return {}
    seed = np.random.SeedSequence([data.seed, stage_seed, epoch, rank]).generate_state(1)[0]
    return {"local_shuffle_buffer_size": data.shuffle_buffer, "local_shuffle_seed": int(seed)}


def train_stage_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker entry point for one stage (see module docstring for resumption)."""
    import mlflow
    import ray.train
    import ray.train.torch

    from jin_orchestrate.data import ray_collate, rename_columns
    from jin_orchestrate.extension import model_from_checkpoint

    quiet_report_dumps()
    cfg = JinConfig.model_validate(loop_config["config"])
    stage = cfg.stages[loop_config["stage_index"]]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    stage_seed = cfg.train.seed + 1000 * loop_config["stage_index"]
    torch.manual_seed(stage_seed)  # identical weights, and so identical EMA targets, on every rank
    ray_ckpt = ray.train.get_checkpoint()
    # Ray registers a reported checkpoint when its controller next polls the workers (every 2 s
    # by default), so a worker killed sooner after a report left a newer complete checkpoint on
    # storage than Ray hands back. The stage's directory holds this job's checkpoints only.
    on_disk = (
        latest_checkpoint(loop_config["stage_storage"]) if "stage_storage" in loop_config else None
    )
    resume = on_disk or loop_config.get("resume_checkpoint")
    init = None if ray_ckpt or resume else loop_config.get("init_checkpoint")
    init_state: dict[str, Any] = {}
    if init:  # the previous stage's weights, or a pretrained model to extend (§3.6)
        model, init_state = model_from_checkpoint(init, cfg.model)
    else:
        model = JinModel(cfg.model)
    torch.manual_seed(stage_seed + rank)
    # On the worker's device before the optimiser exists: a resumed optimiser state loads beside
    # the parameters (prepare_model, below, would move only the parameters).
    trainer = StageTrainer.create(
        cfg, stage, model, seed=stage_seed + 7919 * (rank + 1), device=ray.train.torch.get_device()
    )
    trainer.global_step = int(init_state.get("global_step", 0))
    start_epoch, skip = 0, 0
    if resume is not None:
        start_epoch, skip = trainer.restore(resume, rank)
    elif ray_ckpt is not None:
        with ray_ckpt.as_directory() as d:
            start_epoch, skip = trainer.restore(d, rank)
    if rank == 0 and (resume or ray_ckpt):
        say(f"[jin] {stage.name} resumes after step {trainer.step}")
    trainer.model = ray.train.torch.prepare_model(
        trainer.model, parallel_strategy_kwargs={"find_unused_parameters": True}
    )

    shard = ray.train.get_dataset_shard("train")
    # Ray Train starts train.num_workers workers, and the config holds batch_size to a multiple
    # of that count: every worker takes an equal share, and the shares add up to the batch.
    per_worker_batch = cfg.train.batch_size // ctx.get_world_size()

    def make_epoch(epoch: int) -> Iterable[dict[str, Any]]:
        batches = shard.iter_torch_batches(
            batch_size=per_worker_batch,
            collate_fn=ray_collate(cfg.data),
            drop_last=True,
            **epoch_shuffle(cfg.data, stage_seed, epoch, rank),
        )
        return (rename_columns(b, cfg.data.columns) for b in batches)

    run = None
    if rank == 0 and loop_config.get("mlflow"):
        mlflow.set_tracking_uri(loop_config["mlflow"]["tracking_uri"])
        run = mlflow.start_run(run_id=loop_config["mlflow"]["run_id"])
    tally = ray.get_actor(loop_config["data_tally"]) if loop_config.get("data_tally") else None
    trainer.faults = FaultPlan.from_env(stage.name)

    window_tokens, window_start = 0, time.perf_counter()
    last_metrics: dict[str, float] = {}
    epoch = batch_in_epoch = 0
    try:
        epochs = range(start_epoch, 10**9)
        for epoch, batch_in_epoch, batch in _batches(epochs, make_epoch, skip, per_worker_batch):
            if trainer.step >= stage.steps:
                break
            result = trainer.train_step(batch)
            window_tokens += result.tokens
            if result.skipped:
                if rank == 0:
                    say(_skip_line(stage, trainer))
                if run is not None:
                    mlflow.log_metrics(result.metrics, step=trainer.global_step)
                continue
            last_metrics = result.metrics
            step = trainer.step
            if step % cfg.train.log_every == 0 or step == stage.steps:
                elapsed = time.perf_counter() - window_start
                last_metrics["tokens_per_s"] = window_tokens * ctx.get_world_size() / elapsed
                window_tokens, window_start = 0, time.perf_counter()
                if tally is not None and rank == 0:
                    _note_data_errors(trainer, ray.get(tally.totals.remote()), last_metrics)
                if run is not None:
                    mlflow.log_metrics(last_metrics, step=trainer.global_step)
                if rank == 0:
                    say(_progress_line(stage, step, last_metrics))
            if step % cfg.train.checkpoint_every == 0 or step == stage.steps:
                report = {"stage_step": step, "global_step": trainer.global_step, **last_metrics}
                peers = _peer_rng_states(trainer, ctx.get_world_size())
                with tempfile.TemporaryDirectory() as tmp:
                    checkpoint = None
                    if rank == 0:  # DDP keeps replicas identical: one writer is enough
                        ckpt_dir = trainer.save(Path(tmp) / "ckpt", epoch, batch_in_epoch, peers)
                        checkpoint = ray.train.Checkpoint.from_directory(str(ckpt_dir))
                    ray.train.report(report, checkpoint=checkpoint)
            trainer.faults.maybe_pause(step, rank)
    except JobStopped as exc:
        # Every rank raises at the same step: the skip decision is all-reduced, and Ray Train
        # splits the data equally, so an empty epoch is empty on every rank. Ending the workers
        # normally, with the reason left next to the checkpoints, keeps Ray Train from
        # restarting them from the same checkpoint into the same failure; the driver raises it
        # (pretrain.py). Ray's result carries only metrics reported with a checkpoint.
        if run is not None:
            mlflow.log_metric("nonfinite_steps", trainer.nonfinite_total, step=trainer.global_step)
            mlflow.end_run(status="FAILED")
        if "stage_storage" not in loop_config:
            raise
        if rank == 0:
            stopped = Path(loop_config["stage_storage"]) / STOPPED
            stopped.parent.mkdir(parents=True, exist_ok=True)
            stopped.with_suffix(".tmp").write_text(f"{type(exc).__name__}: {exc}")
            os.replace(stopped.with_suffix(".tmp"), stopped)
        return
    except BaseException:
        if run is not None:
            mlflow.end_run(status="FAILED")
        raise
    if run is not None:
        mlflow.end_run()


def _peer_rng_states(trainer: StageTrainer, world_size: int) -> dict[int, dict[str, torch.Tensor]]:
    """Every rank's :meth:`StageTrainer.rng_states` by rank, on every rank (a collective).

    The weights and optimiser are the same on every rank, but each rank draws its own masks and
    noise; rank 0 writes them all into the checkpoint so each resumes its own streams."""
    if world_size == 1:
        return {}
    states: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(states, trainer.rng_states())
    return dict(enumerate(states))


def _skip_line(stage: StageConfig, trainer: StageTrainer) -> str:
    return (
        f"[jin] {stage.name} step {trainer.step + 1}: non-finite loss or gradient, update "
        f"skipped ({trainer.nonfinite_in_row} in a row, {trainer.nonfinite_total} in all; "
        f"the job stops at {trainer.cfg.train.max_nonfinite_steps} in a row)"
    )


def _note_data_errors(
    trainer: StageTrainer, totals: dict[str, int], metrics: dict[str, float]
) -> None:
    """Add the job's skipped-data counts to ``metrics``; print them when they have grown."""
    if sum(totals.values()) > sum(trainer.data_errors.values()):
        shown = ", ".join(f"{kind} {n}" for kind, n in sorted(totals.items()))
        say(f"[jin] data: {sum(totals.values())} rows skipped so far ({shown})")
    trainer.data_errors = totals
    metrics.update(tally_metrics(totals))
