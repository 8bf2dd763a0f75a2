"""An exponential moving average of the trained weights, the weights a diffusion model samples with.

DiT and most diffusion models since DDPM sample from an EMA of the weights rather than from the
last optimiser step: the denoiser's weights jitter with the noise of the diffusion loss (every
step draws other timesteps and noise), and the average sits nearer the minimum. This is not
z-JEPA's target encoder (``JinModel.update_target``), which is part of the training objective; this
average is only read after training.

``train.weight_ema`` (0: off) is its decay. The decay warms up as ``min(decay, (1 + n) / (10 + n))``
after ``n`` updates, so a short fine-tune is not dominated by its starting weights. Checkpoints
store it beside the weights (``ema.safetensors``); :func:`jin_orchestrate.evaluate.load_model`
loads it when present, and the next stage (or ``generate train``) continues from the raw weights,
as DiT's training does. ``extend``, which freezes them, starts from the average.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["WeightEMA", "apply_ema"]


class WeightEMA:
    """The average of ``model``'s trainable parameters, by name."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"WeightEMA: decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow: dict[str, Tensor] = {
            name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad
        }
        if not self.shadow:
            raise ValueError("WeightEMA: the model has no trainable parameters")

    def decay_at(self, updates: int) -> float:
        return min(self.decay, (1.0 + updates) / (10.0 + updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (after an optimiser step)."""
        params = dict(model.named_parameters())
        names = list(self.shadow)
        live = [params[name].detach() for name in names]
        if live[0].device != self.shadow[names[0]].device:  # the model moved to its device
            self.shadow = {name: t.to(live[0].device) for name, t in self.shadow.items()}
        torch._foreach_lerp_(
            [self.shadow[name] for name in names], live, 1.0 - self.decay_at(self.updates)
        )
        self.updates += 1

    def state(self) -> dict[str, Tensor]:
        """The averaged tensors (on the CPU), as a checkpoint stores them."""
        return {name: t.detach().cpu().contiguous() for name, t in self.shadow.items()}

    def load(self, shadow: dict[str, Tensor], updates: int) -> None:
        """Resume from a checkpoint's average; it must cover the same trainable parameters."""
        if set(shadow) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(shadow))[:5]
            extra = sorted(set(shadow) - set(self.shadow))[:5]
            raise ValueError(
                f"WeightEMA: the stored average does not fit the trainable parameters "
                f"(missing {missing}, unexpected {extra})"
            )
        device = next(iter(self.shadow.values())).device
        self.shadow = {name: shadow[name].to(device).clone() for name in self.shadow}
        self.updates = updates


@torch.no_grad()
def apply_ema(model: nn.Module, shadow: dict[str, Tensor]) -> None:
    """Copy an average into ``model``'s parameters of the same names (the rest stay as loaded)."""
    params = dict(model.named_parameters())
    stray = sorted(set(shadow) - set(params))
    if stray:
        raise ValueError(f"apply_ema: the average has parameters the model lacks: {stray[:5]}")
    for name, value in shadow.items():
        if params[name].shape != value.shape:
            raise ValueError(
                f"apply_ema: {name} is {tuple(value.shape)} in the average and "
                f"{tuple(params[name].shape)} in the model"
            )
        params[name].copy_(value)
