"""Gaussian diffusion on continuous token sequences (paper §2.3 Eq. 3; Ho et al. 2020).

Shapes: B batch, T tokens, D width; ``x`` may be any ``(B, ...)`` tensor.

The forward process ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` with a linear (Ho et
al.) or cosine (Nichol & Dhariwal 2021) schedule; the network predicts ``eps``, ``v`` (Salimans &
Ho 2022) or ``x0``, and the training loss is uniform over timesteps or Min-SNR-gamma weighted
(Hang et al. 2023). Samplers are in :mod:`jin_backbone.samplers`.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Protocol

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from jin_backbone._config import StrictConfig

__all__ = [
    "Denoiser",
    "DiffusionConfig",
    "GaussianDiffusion",
    "LossWeighting",
    "Prediction",
    "cosine_betas",
    "linear_betas",
    "randn",
]

Prediction = Literal["eps", "v", "x0"]
LossWeighting = Literal["uniform", "min_snr"]


class Denoiser(Protocol):
    """The denoiser callable: ``model(x_t, t, cond) -> prediction``.

    ``x_t`` has the sample's shape, ``t`` is ``(B,)`` int64 timesteps, ``cond`` is whatever the
    model is conditioned on (``None`` for unconditional). Any callable with this signature works
    (a ``Backbone`` wrapped with its heads, a ``JinModel``, a lambda in a test).

    Given a padding mask, :meth:`GaussianDiffusion.training_loss` calls
    ``model(x_t, t, cond, padding_mask=padding_mask)`` instead, so a model trained on padded
    batches takes that keyword and keeps the padding away from the real tokens (a ``Backbone``:
    its own ``padding_mask`` argument). The loss masks only the error at padded positions; what
    the network attends to and routes is the model's to mask.
    """

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any, /) -> Tensor: ...


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Ho et al.'s linear schedule, float64 ``(num_timesteps,)``; the defaults are theirs at
    1000 steps and are rescaled by ``1000 / num_timesteps`` so other lengths stay comparable."""
    scale = 1000 / num_timesteps
    return torch.linspace(
        beta_start * scale, beta_end * scale, num_timesteps, dtype=torch.float64
    ).clamp(max=0.999)


def cosine_betas(num_timesteps: int, s: float = 0.008) -> Tensor:
    """Nichol & Dhariwal's cosine schedule: ``abar(t) = cos((t/T + s)/(1 + s) * pi/2)^2``,
    betas clipped at 0.999 to avoid the singularity at ``t = T``."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)


def randn(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Standard normal noise drawn from ``generator`` (on its own device), moved to ``like``'s
    device and dtype: the same seed gives the same noise whatever device the model is on."""
    device = generator.device if generator is not None else like.device
    noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return noise.to(device=like.device, dtype=like.dtype)


class DiffusionConfig(StrictConfig):
    """Noise schedule, prediction target and the training loss's weighting over timesteps.

    ``loss_weighting="min_snr"`` weights each sample's loss so that, counted in x0 error, a
    timestep weighs ``min(SNR_t, min_snr_gamma)`` (``SNR_t = abar_t / (1 - abar_t)``): the
    low-noise timesteps, whose small errors dominate an eps loss, and the nearly pure-noise ones,
    which dominate an x0 loss, stop competing with the middle of the schedule (Min-SNR-gamma,
    Hang et al. 2023; gamma 5 is their default). The weights are scaled to mean 1 over the
    timesteps, so the loss keeps its size against any other loss it is summed with.
    """

    schedule: Literal["linear", "cosine"] = "cosine"
    num_timesteps: int = Field(default=1000, gt=1)
    prediction: Prediction = "eps"
    beta_start: float = Field(default=1e-4, gt=0.0, lt=1.0)
    beta_end: float = Field(default=0.02, gt=0.0, lt=1.0)
    cosine_s: float = Field(default=0.008, ge=0.0)
    loss_weighting: LossWeighting = "uniform"
    min_snr_gamma: float = Field(default=5.0, gt=0.0)

    @model_validator(mode="after")
    def _betas_increase(self) -> DiffusionConfig:
        if self.beta_start >= self.beta_end:
            raise ValueError(f"beta_start={self.beta_start} must be below beta_end={self.beta_end}")
        return self


class GaussianDiffusion(nn.Module):
    """Schedule buffers plus ``q_sample``, training targets and loss.

    A module only so that ``.to(device)`` moves its buffers; it has no parameters. Coefficients
    are computed in float64 and stored as float32, and stay float32 when a model holding the
    schedule is cast (``model.to(torch.bfloat16)``, ``.half()``): see `_apply`.
    """

    betas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    posterior_variance: Tensor
    posterior_mean_coef_x0: Tensor
    posterior_mean_coef_xt: Tensor
    loss_weight_table: Tensor

    def __init__(self, cfg: DiffusionConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or DiffusionConfig()
        if cfg.schedule == "linear":
            betas = linear_betas(cfg.num_timesteps, cfg.beta_start, cfg.beta_end)
        else:
            betas = cosine_betas(cfg.num_timesteps, cfg.cosine_s)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        # Posterior q(x_{t-1} | x_t, x_0) of Ho et al. Eqs. 6-7.
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        coef_x0 = betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod)
        coef_xt = (1 - alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - alphas_cumprod)
        for name, value in {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "posterior_variance": posterior_variance,
            "posterior_mean_coef_x0": coef_x0,
            "posterior_mean_coef_xt": coef_xt,
        }.items():
            self.register_buffer(name, value.float(), persistent=False)
        weights = torch.ones_like(alphas_cumprod)
        if cfg.loss_weighting == "min_snr":
            snr = alphas_cumprod / (1 - alphas_cumprod)
            implied = {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[cfg.prediction]
            weights = snr.clamp_max(cfg.min_snr_gamma) / implied
        # Mean 1 over the schedule: the weighting moves the loss between timesteps, not the size
        # of the whole against the other objectives it is summed with.
        self.loss_weight_scale = float(weights.mean())
        self.register_buffer("loss_weight_table", (weights / weights.mean()).float(), False)
        # The float32 values the buffers are restored from after a cast (plain tensors, not
        # buffers, so that `_apply` leaves them alone).
        self._float32_buffers = {name: b.clone() for name, b in self.named_buffers()}

    def _apply(self, fn: Any, recurse: bool = True) -> GaussianDiffusion:
        """Moves apply to the schedule, dtype casts do not: a model cast to bfloat16 would cast
        its schedule too, where ``abar_t`` rounds to exactly 1 for the first timesteps (DDIM then
        divides by ``1 - abar = 0``, and ``q_sample`` adds no noise there even to float32 data)."""
        super()._apply(fn, recurse)
        for name, value in self._float32_buffers.items():
            buffer = self._buffers[name]
            if buffer is not None and buffer.dtype != torch.float32:
                self._buffers[name] = value.to(buffer.device, copy=True)
        return self

    @property
    def num_timesteps(self) -> int:
        return self.cfg.num_timesteps

    @staticmethod
    def at(coefficients: Tensor, t_B: Tensor, like: Tensor) -> Tensor:
        """``coefficients[t]`` shaped ``(B, 1, ..., 1)`` to broadcast against ``like``, in
        ``like``'s dtype or float32, whichever is wider: in bfloat16 or float16 ``abar_t`` rounds
        to exactly 1 for the first timesteps, and dividing by ``sqrt(1 - abar)`` gives inf."""
        values = coefficients.to(like.device)[t_B.to(like.device)]
        dtype = torch.promote_types(like.dtype, torch.float32)
        return values.view(-1, *([1] * (like.dim() - 1))).to(dtype)

    def _check_timesteps(self, t_B: Tensor, x: Tensor) -> None:
        if t_B.shape != (x.shape[0],):
            raise ValueError(f"t: expected shape ({x.shape[0]},), got {tuple(t_B.shape)}")

    def q_sample(self, x0: Tensor, t_B: Tensor, noise: Tensor) -> Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
        self._check_timesteps(t_B, x0)
        abar = self.at(self.alphas_cumprod, t_B, x0)
        return (abar.sqrt() * x0 + (1 - abar).sqrt() * noise).to(x0.dtype)

    def target(self, x0: Tensor, noise: Tensor, t_B: Tensor) -> Tensor:
        """The regression target for ``cfg.prediction``: ``eps``, ``x0`` or
        ``v = sqrt(abar) eps - sqrt(1 - abar) x0``."""
        if self.cfg.prediction == "eps":
            return noise
        if self.cfg.prediction == "x0":
            return x0
        abar = self.at(self.alphas_cumprod, t_B, x0)
        return (abar.sqrt() * noise - (1 - abar).sqrt() * x0).to(x0.dtype)

    def predict_x0_and_eps(
        self, x_t: Tensor, t_B: Tensor, prediction: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Recover ``(x0_hat, eps_hat)`` from the network's prediction at ``x_t`` (computed in
        float32 at least, returned in the inputs' dtype)."""
        abar = self.at(self.alphas_cumprod, t_B, x_t)
        sqrt_abar, sqrt_one_minus = abar.sqrt(), (1 - abar).sqrt()
        if self.cfg.prediction == "eps":
            eps = prediction
            x0 = (x_t - sqrt_one_minus * eps) / sqrt_abar
        elif self.cfg.prediction == "x0":
            x0 = prediction
            eps = (x_t - sqrt_abar * x0) / sqrt_one_minus
        else:
            x0 = sqrt_abar * x_t - sqrt_one_minus * prediction
            eps = sqrt_one_minus * x_t + sqrt_abar * prediction
        dtype = torch.promote_types(x_t.dtype, prediction.dtype)
        return x0.to(dtype), eps.to(dtype)

    def sample_timesteps(
        self, batch: int, generator: torch.Generator | None, like: Tensor
    ) -> Tensor:
        """Uniform ``t ~ U{0, ..., num_timesteps - 1}``, ``(B,)`` int64 on ``like``'s device."""
        device = generator.device if generator is not None else like.device
        t_B = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device)
        return t_B.to(like.device)

    def loss_weights(self, t_B: Tensor) -> Tensor:
        """Per-sample loss weights ``(B,)`` float32 of ``cfg.loss_weighting`` for timesteps
        ``t_B``, relative to the loss of ``cfg.prediction``: all ones for ``"uniform"``; for
        ``"min_snr"``, ``min(SNR, gamma)`` divided by the x0-error weight that the target already
        carries (``SNR`` for eps, ``SNR + 1`` for v, 1 for x0) and by ``loss_weight_scale``."""
        return self.loss_weight_table.to(t_B.device)[t_B]

    @staticmethod
    def loss(
        prediction: Tensor,
        target: Tensor,
        padding_mask: Tensor | None = None,
        weight_B: Tensor | None = None,
    ) -> Tensor:
        """Mean squared error over non-padded tokens (``padding_mask`` ``(B, T)`` bool, True at
        pad), each sample's squared errors scaled by ``weight_B`` ``(B,)`` when given. Zero, not
        NaN, when there is nothing to average (no samples, no tokens, or all padding)."""
        if prediction.shape != target.shape:
            raise ValueError(
                f"prediction shape {tuple(prediction.shape)} != target {tuple(target.shape)}"
            )
        sq = (prediction.float() - target.float()).square()
        if weight_B is not None:
            if weight_B.shape != sq.shape[:1]:
                raise ValueError(
                    f"weight_B: expected shape ({sq.shape[0]},), got {tuple(weight_B.shape)}"
                )
            sq = sq * weight_B.to(sq).view(-1, *([1] * (sq.dim() - 1)))
        if padding_mask is None:
            return sq.mean() if sq.numel() else sq.sum()
        if padding_mask.shape != sq.shape[:2] or padding_mask.dtype != torch.bool:
            raise ValueError(
                f"padding_mask: expected bool of shape {tuple(sq.shape[:2])}, "
                f"got {padding_mask.dtype} of shape {tuple(padding_mask.shape)}"
            )
        keep = (~padding_mask).view(*padding_mask.shape, *([1] * (sq.dim() - 2))).to(sq.dtype)
        per_token = math.prod(sq.shape[2:])
        return (sq * keep).sum() / (keep.sum() * per_token).clamp_min(1)

    def training_loss(
        self,
        model: Denoiser,
        x0: Tensor,
        cond: Any = None,
        padding_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """One denoising loss: draw ``t`` and noise, form ``x_t``, regress the target (weighted
        over timesteps by ``cfg.loss_weighting``).

        ``padding_mask`` ``(B, T)`` (True at padding) leaves the padded tokens out of the loss and
        is passed on to the model as ``model(x_t, t, cond, padding_mask=padding_mask)``
        (:class:`Denoiser`): masking the loss alone would let the noised padding reach the real
        tokens through attention and routing. Without it the model is called as
        ``model(x_t, t, cond)``.
        """
        t_B = self.sample_timesteps(x0.shape[0], generator, x0)
        noise = randn(tuple(x0.shape), generator, x0)
        x_t = self.q_sample(x0, t_B, noise)
        if padding_mask is None:
            prediction = model(x_t, t_B, cond)
        else:
            prediction = model(x_t, t_B, cond, padding_mask=padding_mask)
        weight_B = None if self.cfg.loss_weighting == "uniform" else self.loss_weights(t_B)
        return self.loss(prediction, self.target(x0, noise, t_B), padding_mask, weight_B)
