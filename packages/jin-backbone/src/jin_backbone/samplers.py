"""DDPM and DDIM samplers with classifier-free guidance over any denoiser callable.

Shapes: B batch; samples have any ``(B, ...)`` shape, typically ``(B, T, D)`` token sequences.

Both samplers take a ``torch.Generator`` and draw all their noise from it, so a seed fixes the
sample. The denoiser is ``model(x_t, t, cond) -> prediction`` (:class:`Denoiser`), predicting what
the :class:`GaussianDiffusion` config says (``eps``, ``v`` or ``x0``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from jin_backbone.diffusion import Denoiser, GaussianDiffusion, randn

__all__ = ["ddim_sample", "ddim_timesteps", "ddpm_sample", "guided_prediction"]


def guided_prediction(
    model: Denoiser, x_t: Tensor, t_B: Tensor, cond: Any, uncond: Any, guidance_scale: float
) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): ``u + s (c - u)``.

    ``guidance_scale == 1`` (or ``cond is None``) is a single conditional call. Otherwise the
    model runs twice, with ``cond`` and with ``uncond`` (``None`` unless given: the model's
    "no condition" input, e.g. a learned null embedding the caller substitutes).
    """
    conditional = model(x_t, t_B, cond)
    if guidance_scale == 1.0 or cond is None:
        return conditional
    unconditional = model(x_t, t_B, uncond)
    return unconditional + guidance_scale * (conditional - unconditional)


def _state_like(device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """The sampler's running ``x`` is kept in ``dtype`` or float32, whichever is wider; the
    model sees it in ``dtype``. In bfloat16 the schedule's ``abar_t`` is exactly 1 for the first
    timesteps, so the update's ``1 / sqrt(1 - abar)`` would be inf and the sample NaN."""
    return torch.empty(0, device=device, dtype=torch.promote_types(dtype, torch.float32))


def _start(
    shape: tuple[int, ...], x_T: Tensor | None, generator: torch.Generator | None, like: Tensor
) -> Tensor:
    if x_T is None:
        return randn(shape, generator, like)
    if tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T: expected shape {tuple(shape)}, got {tuple(x_T.shape)}")
    return x_T.to(device=like.device, dtype=like.dtype)


def _check_clip_x0(clip_x0: float | None) -> None:
    # clamp(-c, c) with c <= 0 would set every x0 estimate to c, and NaN would make it NaN.
    if clip_x0 is not None and not clip_x0 > 0:
        raise ValueError(f"clip_x0: expected a positive bound or None, got {clip_x0}")


def _x0_and_eps(
    diffusion: GaussianDiffusion, x: Tensor, t_B: Tensor, prediction: Tensor, clip_x0: float | None
) -> tuple[Tensor, Tensor]:
    x0, eps = diffusion.predict_x0_and_eps(x, t_B, prediction)
    if clip_x0 is not None:
        # Clipping x0 changes it, so eps is re-derived to keep the pair consistent with x_t.
        x0 = x0.clamp(-clip_x0, clip_x0)
        abar = diffusion.at(diffusion.alphas_cumprod, t_B, x)
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
    return x0, eps


@torch.no_grad()
def ddpm_sample(
    diffusion: GaussianDiffusion,
    model: Denoiser,
    shape: tuple[int, ...],
    *,
    cond: Any = None,
    uncond: Any = None,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    x_T: Tensor | None = None,
    clip_x0: float | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, Alg. 2) over all ``num_timesteps`` steps.

    Each step draws ``x_{t-1} ~ N(mu(x_t, x0_hat), beta_tilde_t I)`` with the posterior variance
    ``beta_tilde``; the last step (``t = 0``) returns the posterior mean without noise.
    """
    _check_clip_x0(clip_x0)
    like = _state_like(device, dtype)
    x = _start(shape, x_T, generator, like)
    for step in reversed(range(diffusion.num_timesteps)):
        t_B = torch.full((shape[0],), step, dtype=torch.long, device=like.device)
        prediction = guided_prediction(model, x.to(dtype), t_B, cond, uncond, guidance_scale)
        x0, _ = _x0_and_eps(diffusion, x, t_B, prediction, clip_x0)
        mean = (
            diffusion.at(diffusion.posterior_mean_coef_x0, t_B, x) * x0
            + diffusion.at(diffusion.posterior_mean_coef_xt, t_B, x) * x
        )
        if step == 0:
            return mean.to(dtype)
        std = diffusion.at(diffusion.posterior_variance, t_B, x).sqrt()
        x = mean + std * randn(shape, generator, like)
    raise AssertionError("unreachable: num_timesteps > 1 is validated")


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` timesteps evenly spaced from ``num_timesteps - 1`` down to 0 (first is T-1)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps: expected 1..{num_timesteps}, got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (steps - 1)
    return [round(num_timesteps - 1 - i * stride) for i in range(steps)]


@torch.no_grad()
def ddim_sample(
    diffusion: GaussianDiffusion,
    model: Denoiser,
    shape: tuple[int, ...],
    *,
    steps: int = 50,
    eta: float = 0.0,
    cond: Any = None,
    uncond: Any = None,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    x_T: Tensor | None = None,
    clip_x0: float | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """DDIM (Song et al. 2021, Eq. 12) over :func:`ddim_timesteps`.

    ``eta=0`` is deterministic given ``x_T``; ``eta=1`` matches DDPM's variance. After the last
    listed timestep the sampler jumps to ``abar = 1``, so it returns the final ``x0`` prediction:
    with ``steps=1`` and ``eta=0`` the result is exactly the model's ``x0`` estimate at
    ``t = T-1`` from ``x_T``.
    """
    # Outside [0, 1] sigma^2 can exceed the room left for eps (clamped to 0) or, negative, adds no
    # noise while still taking sigma^2 from eps: either way not DDIM's distribution.
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta: expected 0..1, got {eta}")
    _check_clip_x0(clip_x0)
    like = _state_like(device, dtype)
    x = _start(shape, x_T, generator, like)
    timesteps = ddim_timesteps(diffusion.num_timesteps, steps)
    for i, step in enumerate(timesteps):
        t_B = torch.full((shape[0],), step, dtype=torch.long, device=like.device)
        prediction = guided_prediction(model, x.to(dtype), t_B, cond, uncond, guidance_scale)
        x0, eps = _x0_and_eps(diffusion, x, t_B, prediction, clip_x0)
        abar = diffusion.alphas_cumprod[step].item()
        abar_prev = diffusion.alphas_cumprod[timesteps[i + 1]].item() if i + 1 < steps else 1.0
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)) ** 0.5
        x = abar_prev**0.5 * x0 + max(1 - abar_prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * randn(shape, generator, like)
    return x.to(dtype)
