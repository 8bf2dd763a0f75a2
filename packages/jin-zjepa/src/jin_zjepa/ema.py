"""The EMA target network of JEPA (paper §2.1: f_θ̄ is an exponential moving average of f_θ).

The target is a frozen deep copy of the online module, updated after every optimiser step as
``θ̄ ← m θ̄ + (1 - m) θ`` with a momentum ``m`` that rises from ``momentum_start`` to
``momentum_end`` (I-JEPA: 0.996 -> 1.0, linear; BYOL: cosine). No gradient ever reaches it: its
parameters have ``requires_grad=False`` and its forward runs under ``torch.no_grad``. It is kept in
eval mode so dropout or stochastic depth never perturb the targets.

Batch normalisation is the exception (``norm_stats="batch"``, the default): while the enclosing
model trains, the target's batch-norm layers normalise with the statistics of the batch they see,
as BYOL's and MoCo's target networks do, and keep running statistics of their own for eval. The
target's weights lag the online network's, so the online running statistics do not fit them:
copied (``norm_stats="copy"``), they shrank a slowly-averaged (m = 0.9995) convolutional stem's
activations until the target's image tokens carried almost nothing but their position
(across-sample spread 0.03 with the online's statistics against 0.62 with its own, measured on a
jin-tiny checkpoint), so the image JEPA terms asked the online network for little more than
positions.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from jin_zjepa._config import StrictConfig

__all__ = ["EMAConfig", "EMATarget", "unwrap_module"]


class EMAConfig(StrictConfig):
    """Momentum schedule of the target network."""

    momentum_start: float = Field(0.996, ge=0.0, le=1.0)
    momentum_end: float = Field(1.0, ge=0.0, le=1.0)
    schedule: Literal["cosine", "linear"] = "cosine"
    total_steps: int = Field(..., ge=1, description="optimiser steps over which m reaches its end")
    norm_stats: Literal["batch", "copy"] = Field(
        "batch",
        description="the target's batch-norm layers: 'batch' normalises with the statistics of "
        "the batch in training and keeps its own running statistics; 'copy' copies the online "
        "network's running statistics at every update and always uses them",
    )

    @model_validator(mode="after")
    def _check_order(self) -> EMAConfig:
        if self.momentum_end < self.momentum_start:
            raise ValueError(
                f"momentum_end ({self.momentum_end}) must be >= momentum_start "
                f"({self.momentum_start}): the target should slow down, not speed up"
            )
        return self

    def momentum(self, step: int) -> float:
        """Momentum after optimiser step ``step`` (0-based); constant at the end value after."""
        if step < 0:
            raise ValueError(f"EMA step must be >= 0; got {step}")
        progress = min(step / self.total_steps, 1.0)
        ramp = progress if self.schedule == "linear" else 0.5 * (1.0 - math.cos(math.pi * progress))
        return self.momentum_start + (self.momentum_end - self.momentum_start) * ramp


def unwrap_module(module: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel | nn.DataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


class EMATarget(nn.Module):
    """A frozen EMA copy of an online module; call :meth:`update` after each optimiser step."""

    def __init__(self, online: nn.Module, config: EMAConfig) -> None:
        super().__init__()
        self.config = config
        self.module = copy.deepcopy(unwrap_module(online))
        self.module.requires_grad_(False)
        self.train(self.training)

    def _batch_norms(self) -> dict[str, nn.Module]:
        return {
            name: m
            for name, m in self.module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        }

    def train(self, mode: bool = True) -> EMATarget:
        """Keep the wrapped copy in eval mode whatever the mode of the enclosing model; with
        ``norm_stats="batch"`` its batch-norm layers follow ``mode`` (batch statistics in
        training)."""
        self.training = mode
        self.module.eval()
        if self.config.norm_stats == "batch":
            for norm in self._batch_norms().values():
                norm.train(mode)
        return self

    @torch.no_grad()
    def update(self, online: nn.Module, step: int) -> float:
        """Move the target towards ``online`` (DDP-wrapped or not); returns the momentum used."""
        m = self.config.momentum(step)
        source = unwrap_module(online)
        target_params = dict(self.module.named_parameters())
        source_params = dict(source.named_parameters())
        if target_params.keys() != source_params.keys():
            missing = sorted(target_params.keys() ^ source_params.keys())
            raise ValueError(
                f"EMATarget.update: online module's parameters differ from the target's; "
                f"mismatched names: {missing[:8]}"
            )
        for name, target in target_params.items():
            # lerp_(x, w) = target + w (x - target) = m target + (1 - m) x for w = 1 - m.
            target.lerp_(source_params[name].detach().to(target.dtype), 1.0 - m)
        # Buffers are copied, not averaged, as in I-JEPA/BYOL code; the target's own batch-norm
        # statistics are kept under norm_stats="batch".
        own = (
            tuple(f"{n}." for n in self._batch_norms()) if self.config.norm_stats == "batch" else ()
        )
        for (name, target_buf), (_, source_buf) in zip(
            self.module.named_buffers(), source.named_buffers(), strict=True
        ):
            if own and name.startswith(own):
                continue
            if target_buf.shape != source_buf.shape:
                raise ValueError(f"EMATarget.update: buffer {name!r} changed shape")
            target_buf.copy_(source_buf)
        return m

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the target copy without building a graph."""
        return self.module(*args, **kwargs)
