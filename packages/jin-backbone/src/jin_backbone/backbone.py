"""The DiT-MoE backbone (paper §3.4): a stack of DiT blocks with MoE every n-th layer.

Shapes: B batch, T tokens, D width.

``Backbone(cfg)(x, padding_mask, timestep, cond)``: without a timestep it is a plain transformer
(z-JEPA representation learning); with one it is a diffusion denoiser conditioned through
adaLN-Zero (or the paper's additive embedding). ``moe_every=0`` gives the dense baseline of the
paper's Table 6.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from jin_backbone._config import StrictConfig
from jin_backbone.dit import Conditioning, DiTBlock, TimestepEmbedder, attention_mask, modulate
from jin_backbone.experts import Activation, FeedForward
from jin_backbone.moe import DispatchKind, MoE, MoEConfig
from jin_backbone.router import RouterStats

__all__ = ["Backbone", "BackboneConfig", "BackboneOutput"]


class BackboneConfig(StrictConfig):
    """The backbone's few dials; head width and hidden sizes are derived.

    ``moe_every=n`` makes layers ``n-1, 2n-1, ...`` MoE (``n=1``: every layer, ``n=2``: every
    other layer as in GShard/Switch, ``0``: dense). Experts use ``expert_hidden_dim`` (default: the
    dense hidden size ``mlp_ratio * dim``). The router and expert fields mean what they do in
    :class:`MoEConfig`; ``renormalize`` applies only for ``top_k > 1`` (a top-1 gate is the router
    probability, so the router learns from the task loss).
    """

    dim: int = Field(default=256, gt=0)
    depth: int = Field(default=4, gt=0)
    num_heads: int = Field(default=4, gt=0)
    mlp_ratio: float = Field(default=4.0, gt=0.0)
    activation: Activation = "swiglu"
    moe_every: int = Field(default=2, ge=0)
    num_experts: int = Field(default=8, gt=0)
    top_k: int = Field(default=2, gt=0)
    expert_hidden_dim: int | None = Field(default=None, gt=0)
    capacity_factor: float | None = Field(default=None, gt=0.0)
    max_padding: float = Field(default=1.5, ge=1.0)
    renormalize: bool = True
    router_jitter: float = Field(default=0.0, ge=0.0, lt=1.0)
    router_noise_std: float = Field(default=0.0, ge=0.0)
    load_balancing_weight: float = Field(default=0.01, ge=0.0)
    z_loss_weight: float = Field(default=1e-3, ge=0.0)
    dispatch: DispatchKind = "auto"
    grouped_gemm: bool | None = None
    conditioning: Conditioning = "adaln_zero"
    qkv_bias: bool = True
    frequency_dim: int = Field(default=256, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> BackboneConfig:
        if self.dim % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} does not divide dim={self.dim}")
        if self.moe_every > self.depth:
            raise ValueError(
                f"moe_every={self.moe_every} exceeds depth={self.depth}: no layer would be MoE "
                "(use moe_every=0 for the dense baseline)"
            )
        if self.moe_every and self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        return self

    @property
    def hidden_dim(self) -> int:
        """Dense FFN hidden size ``round(mlp_ratio * dim)``."""
        return round(self.mlp_ratio * self.dim)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block ``layer`` (0-based) has an MoE FFN."""
        return self.moe_every > 0 and (layer + 1) % self.moe_every == 0

    def moe_config(self) -> MoEConfig:
        """The :class:`MoEConfig` of every MoE layer."""
        return MoEConfig(
            dim=self.dim,
            hidden_dim=self.expert_hidden_dim or self.hidden_dim,
            num_experts=self.num_experts,
            top_k=self.top_k,
            activation=self.activation,
            renormalize=self.renormalize,
            router_jitter=self.router_jitter,
            router_noise_std=self.router_noise_std,
            capacity_factor=self.capacity_factor,
            max_padding=self.max_padding,
            load_balancing_weight=self.load_balancing_weight,
            z_loss_weight=self.z_loss_weight,
            dispatch=self.dispatch,
            grouped_gemm=self.grouped_gemm,
        )


@dataclass(frozen=True)
class BackboneOutput:
    """What the backbone returns.

    Attributes:
        hidden: ``(B, T, D)`` final hidden states (values at padded positions are finite and
            meaningless).
        aux_loss: ``()`` weighted sum over MoE layers of load-balancing and z-losses; add it to
            the training loss (zero for the dense baseline).
        load_balancing_loss: ``()`` unweighted sum over MoE layers, for logging.
        z_loss: ``()`` unweighted sum over MoE layers, for logging.
        router_stats: one :class:`RouterStats` per MoE layer, bottom to top.
    """

    hidden: Tensor
    aux_loss: Tensor
    load_balancing_loss: Tensor
    z_loss: Tensor
    router_stats: list[RouterStats]


class Backbone(nn.Module):
    """Stack of :class:`DiTBlock` s with a timestep embedder and a final (modulated) norm."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.t_embedder = TimestepEmbedder(cfg.dim, cfg.frequency_dim)
        moe_cfg = cfg.moe_config() if cfg.moe_every else None
        self.blocks = nn.ModuleList(
            DiTBlock(
                cfg.dim,
                cfg.num_heads,
                MoE(moe_cfg)
                if moe_cfg is not None and cfg.is_moe_layer(i)
                else FeedForward(cfg.dim, cfg.hidden_dim, cfg.activation),
                cfg.conditioning,
                cfg.qkv_bias,
            )
            for i in range(cfg.depth)
        )
        self.norm_final = nn.LayerNorm(cfg.dim, eps=1e-6)
        # DiT's final layer: shift/scale of the last norm regressed from c, zero-initialised.
        self.final_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 2 * cfg.dim))
        nn.init.zeros_(self.final_adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_adaLN_modulation[-1].bias)

    def condition(self, batch: int, timestep: Tensor | None, cond: Tensor | None) -> Tensor | None:
        """``c = t_embedder(timestep) + cond`` (either may be absent), ``(B, D)`` or ``None``."""
        c_BD = None
        if timestep is not None:
            t_B = timestep.expand(batch) if timestep.dim() == 0 else timestep
            if t_B.shape != (batch,):
                raise ValueError(
                    f"timestep: expected shape () or ({batch},), got {tuple(timestep.shape)}"
                )
            c_BD = self.t_embedder(t_B)
        if cond is not None:
            if cond.shape != (batch, self.cfg.dim):
                raise ValueError(
                    f"cond: expected shape ({batch}, {self.cfg.dim}), got {tuple(cond.shape)}"
                )
            c_BD = cond if c_BD is None else c_BD + cond
        return c_BD

    def forward(
        self,
        x_BTD: Tensor,
        padding_mask: Tensor | None = None,
        timestep: Tensor | None = None,
        cond: Tensor | None = None,
    ) -> BackboneOutput:
        """Run the stack on ``(B, T, D)`` tokens.

        Args:
            x_BTD: tokens in the joint embedding space.
            padding_mask: ``(B, T)`` bool, True at padding (not attended to, not routed).
            timestep: ``(B,)`` or scalar diffusion timestep; ``None`` for a plain transformer.
            cond: ``(B, D)`` condition (class or pooled embedding) added to the timestep embedding.
        """
        if x_BTD.dim() != 3 or x_BTD.shape[-1] != self.cfg.dim:
            raise ValueError(
                f"Backbone input: expected (B, T, {self.cfg.dim}), got {tuple(x_BTD.shape)}"
            )
        batch, tokens, _ = x_BTD.shape
        if padding_mask is not None and (
            padding_mask.shape != (batch, tokens) or padding_mask.dtype != torch.bool
        ):
            raise ValueError(
                f"padding_mask: expected bool of shape ({batch}, {tokens}), got "
                f"{padding_mask.dtype} of shape {tuple(padding_mask.shape)}"
            )
        c_BD = self.condition(batch, timestep, cond)
        attn_mask = attention_mask(padding_mask)
        zero = x_BTD.new_zeros((), dtype=torch.float32)
        load_balancing, z_loss, aux_loss = zero, zero, zero
        router_stats: list[RouterStats] = []
        for block in self.blocks:
            x_BTD, aux = block(x_BTD, c_BD, padding_mask, attn_mask)
            if aux is not None:
                load_balancing = load_balancing + aux.load_balancing_loss
                z_loss = z_loss + aux.z_loss
                aux_loss = aux_loss + aux.weighted(block.ffn.cfg)
                router_stats.append(aux.stats)
        hidden = self.norm_final(x_BTD)
        if c_BD is not None and self.cfg.conditioning == "adaln_zero":
            shift, scale = self.final_adaLN_modulation(c_BD).chunk(2, dim=-1)
            hidden = modulate(hidden, shift, scale)
        return BackboneOutput(hidden, aux_loss, load_balancing, z_loss, router_stats)
