"""Stage trainers for tests: seeded, and a run interrupted by a checkpoint beside a straight one."""

import torch

from jin_orchestrate.model import JinModel
from jin_orchestrate.train import StageTrainer


def make_trainer(cfg, stage_index=2, seed=0):
    torch.manual_seed(0)
    return StageTrainer.create(cfg, cfg.stages[stage_index], JinModel(cfg.model), seed=seed)


def straight_and_interrupted(cfg, batch, tmp_path, resume_seed):
    """Four steps in one go; and two steps saved to a checkpoint, then a fresh trainer seeded
    ``resume_seed`` (the checkpoint must win over it). Returns (straight, fresh, checkpoint)."""
    straight = make_trainer(cfg)
    for _ in range(4):
        straight.train_step(batch)
    first = make_trainer(cfg)
    for _ in range(2):
        first.train_step(batch)
    path = first.save(tmp_path / "ckpt", epoch=0, batch_in_epoch=2)
    return straight, make_trainer(cfg, seed=resume_seed), path
