"""The Mixture-of-Experts layer (paper §2.2 Eq. 2, §3.4): router, dispatch, experts, combine.

Shapes: B batch, T tokens, N flattened non-padded tokens, D width, H expert hidden, E experts,
K top-k, M expert-sorted rows (``K*N`` when dropless).

``y = sum_k g_k(x) E_k(x)`` is computed dropless by default: the ``K*N`` (token, expert)
assignments are sorted by expert, each expert runs once on its contiguous slice, and a gather
combines the results with the router weights. No ``(N, E, D)`` tensor is ever built. The seed's
double loop over k and experts is kept as ``dispatch="naive"``, the reference the tests and the
benchmark compare against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from jin_backbone import dispatch
from jin_backbone._config import StrictConfig
from jin_backbone.experts import Activation, Experts, compute_dtype, feed_forward
from jin_backbone.router import (
    Router,
    RouterOutput,
    RouterStats,
    load_balancing_loss,
    router_z_loss,
)

__all__ = ["MoE", "MoEAux", "MoEConfig", "MoEOutput"]

DispatchKind = Literal["auto", "torch", "cupy", "naive"]


class MoEConfig(StrictConfig):
    """Configuration of one MoE layer.

    ``capacity_factor=None`` is dropless (the default); a number caps each expert at
    ``ceil(capacity_factor * K * N / E)`` rows and drops the overflow, second choices first.
    ``max_padding``: run all experts as one batched matmul on rows padded to the busiest expert
    when that computes at most this many times the real rows (1.0: only when perfectly balanced);
    otherwise one matmul per expert on its exact rows. Both are dropless and give equal results.
    ``dispatch``: ``auto`` (CuPy kernels on CUDA when cupy is installed and the experts compute
    in float32 or bfloat16, not under float16 autocast; PyTorch otherwise),
    ``torch``, ``cupy``, or ``naive`` (the seed's loop; a reference, slow).
    ``grouped_gemm``: run the experts as two ``torch.nn.functional.grouped_mm`` calls (one
    grouped-GEMM kernel each on the exact rows: no per-expert matmuls, no padding, and in the
    dropless layout no host sync) instead of the two layouts above. ``None`` (the default) does
    where PyTorch has a grouped-GEMM kernel for the computation: on the CPU in float32 or
    bfloat16, on CUDA with compute capability 8.x or 9.x in bfloat16 (the input's dtype, or
    autocast's), with ``dim`` and ``hidden_dim`` giving 16-byte rows (multiples of 4 in float32,
    8 in bfloat16); elsewhere the layouts above. ``True`` requires it (a ValueError where torch
    cannot), ``False`` never. (Booleans, not words: YAML overrides read ``off`` as false.) Under
    ``torch.compile`` ``None`` takes it in bfloat16 only: the fake-tensor kernel compilation
    traces ``grouped_mm`` with accepts bfloat16 alone (torch 2.13), so float32 layers compile
    with the layouts above; with ``True`` their two grouped GEMMs run eagerly, outside the
    compiled graph (a graph break each, so ``fullgraph=True`` cannot compile them).
    ``renormalize``: rescale the ``top_k`` gates to sum to 1 (Mixtral, DeepSeek-MoE). Only for
    ``top_k > 1``: with one expert it would make every gate exactly 1 and leave the router no
    gradient from the task loss, so ``top_k=1`` always gates with the router probability
    (Switch Transformer, the paper's Eq. 2).
    """

    dim: int = Field(gt=0)
    hidden_dim: int = Field(gt=0)
    num_experts: int = Field(default=8, gt=0)
    top_k: int = Field(default=2, gt=0)
    activation: Activation = "swiglu"
    renormalize: bool = True
    router_jitter: float = Field(default=0.0, ge=0.0, lt=1.0)
    router_noise_std: float = Field(default=0.0, ge=0.0)
    capacity_factor: float | None = Field(default=None, gt=0.0)
    max_padding: float = Field(default=1.5, ge=1.0)
    load_balancing_weight: float = Field(default=0.01, ge=0.0)
    z_loss_weight: float = Field(default=1e-3, ge=0.0)
    dispatch: DispatchKind = "auto"
    grouped_gemm: bool | None = None

    @model_validator(mode="after")
    def _top_k_within_experts(self) -> MoEConfig:
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k={self.top_k} exceeds num_experts={self.num_experts}: "
                "each token needs top_k distinct experts"
            )
        return self


@dataclass(frozen=True)
class MoEAux:
    """Auxiliary outputs of one MoE call.

    Attributes:
        load_balancing_loss: ``()`` Switch loss (1.0 when balanced), unweighted, differentiable.
        z_loss: ``()`` ST-MoE router z-loss, unweighted, differentiable.
        stats: detached :class:`RouterStats` for logging (padding excluded).
    """

    load_balancing_loss: Tensor
    z_loss: Tensor
    stats: RouterStats

    def weighted(self, cfg: MoEConfig) -> Tensor:
        """``load_balancing_weight * lb + z_loss_weight * z``: the term to add to the loss."""
        return (
            cfg.load_balancing_weight * self.load_balancing_loss + cfg.z_loss_weight * self.z_loss
        )


class MoEOutput(NamedTuple):
    """``(output, aux)``: output has the input's shape; padded positions are zero."""

    output: Tensor
    aux: MoEAux


class MoE(nn.Module):
    """Top-k Mixture-of-Experts FFN on ``(N, D)`` or ``(B, T, D)`` tokens.

    Example:
        >>> moe = MoE(MoEConfig(dim=64, hidden_dim=128, num_experts=8, top_k=2))
        >>> y, aux = moe(torch.randn(2, 10, 64), padding_mask=torch.zeros(2, 10, dtype=torch.bool))
        >>> y.shape, aux.stats.tokens_per_expert.sum().item()
        (torch.Size([2, 10, 64]), 40)
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = Router(
            cfg.dim,
            cfg.num_experts,
            cfg.top_k,
            renormalize=cfg.renormalize,
            jitter=cfg.router_jitter,
            noise_std=cfg.router_noise_std,
        )
        self.experts = Experts(cfg.num_experts, cfg.dim, cfg.hidden_dim, cfg.activation)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> MoEOutput:
        """Route, run and combine. ``padding_mask`` (True at padding) has ``x``'s leading shape;
        padded tokens are not routed, get zero output and are left out of the losses and stats."""
        dim = x.shape[-1]
        if x.dim() not in (2, 3) or dim != self.cfg.dim:
            raise ValueError(
                f"MoE input: expected (N, {self.cfg.dim}) or (B, T, {self.cfg.dim}), "
                f"got {tuple(x.shape)}"
            )
        x_ND = x.reshape(-1, dim)
        keep_N: Tensor | None = None
        if padding_mask is not None:
            if padding_mask.shape != x.shape[:-1] or padding_mask.dtype != torch.bool:
                raise ValueError(
                    f"padding_mask: expected bool of shape {tuple(x.shape[:-1])}, got "
                    f"{padding_mask.dtype} of shape {tuple(padding_mask.shape)}"
                )
            keep_N = ~padding_mask.reshape(-1)
            x_ND = x_ND[keep_N]

        routing = self.router(x_ND)
        if self.cfg.dispatch == "naive":
            y_ND, tokens_per_expert, dropped = self._naive(x_ND, routing)
        else:
            y_ND, tokens_per_expert, dropped = self._dropless(x_ND, routing)

        if keep_N is not None:
            y_ND = y_ND.new_zeros(keep_N.shape[0], dim).index_put((keep_N,), y_ND)
        aux = MoEAux(
            load_balancing_loss=load_balancing_loss(routing.probs, routing.experts),
            z_loss=router_z_loss(routing.logits),
            stats=RouterStats(
                tokens_per_expert=tokens_per_expert.detach(),
                dropped_tokens=dropped.detach(),
                router_entropy=Router.entropy(routing.probs.detach()),
            ),
        )
        return MoEOutput(y_ND.view(x.shape), aux)

    def _dropless(self, x_ND: Tensor, routing: RouterOutput) -> tuple[Tensor, Tensor, Tensor]:
        backend = dispatch.resolve_backend(self.cfg.dispatch, x_ND)  # type: ignore[arg-type]
        grouped = self.uses_grouped_gemm(x_ND)
        plan = dispatch.make_plan(
            routing.experts,
            self.cfg.num_experts,
            self.cfg.capacity_factor,
            self.cfg.max_padding,
            host_counts=not grouped,
        )
        x_MD = dispatch.permute(x_ND, plan, backend)
        if grouped:
            y_MD = self.experts.grouped(x_MD, plan.offsets)
        else:
            assert plan.counts is not None
            y_MD = self.experts(x_MD, plan.counts, plan.padded_rows)
        weights_NK = routing.weights.to(x_ND.dtype)
        y_ND = dispatch.unpermute_combine(y_MD, weights_NK, plan, backend)
        return y_ND, plan.tokens_per_expert, plan.dropped

    def uses_grouped_gemm(self, x: Tensor) -> bool:
        """Whether the experts run as grouped GEMMs on ``x`` (``grouped_gemm``, see `MoEConfig`);
        ``True`` where torch cannot raises a ValueError saying why."""
        mode = self.cfg.grouped_gemm
        if mode is False or self.cfg.dispatch == "naive":
            return False
        dtype = compute_dtype(x)
        itemsize = dtype.itemsize
        # Grouped-GEMM kernels read rows with 16-byte aligned strides (TMA loads on CUDA).
        aligned = all(width * itemsize % 16 == 0 for width in (self.cfg.dim, self.cfg.hidden_dim))
        available = hasattr(F, "grouped_mm")
        if mode is None:
            if not (available and aligned):
                return False
            if x.device.type == "cpu":
                if torch.compiler.is_compiling():
                    return dtype == torch.bfloat16  # the only dtype grouped_mm's fake kernel takes
                return dtype in (torch.float32, torch.bfloat16)
            # Ampere and Hopper. Blackwell (10.x) only on request: there torch's kernel has
            # given non-zero weight gradients to empty groups, masked at a cost (`Experts.grouped`).
            return (
                x.is_cuda
                and dtype == torch.bfloat16
                and (8, 0) <= torch.cuda.get_device_capability(x.device) < (10, 0)
            )
        if not available:
            raise ValueError(
                f"grouped_gemm=True: torch {torch.__version__} has no "
                "torch.nn.functional.grouped_mm"
            )
        if not aligned:
            raise ValueError(
                f"grouped_gemm=True: dim={self.cfg.dim} and hidden_dim={self.cfg.hidden_dim} "
                f"must be multiples of {16 // itemsize} for {dtype} (16-byte aligned rows)"
            )
        if x.device.type == "cpu" and dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(
                f"grouped_gemm=True: PyTorch's CPU grouped GEMM computes in float32, bfloat16 or "
                f"float16, not {dtype}"
            )
        if x.is_cuda and dtype != torch.bfloat16:
            raise ValueError(
                f"grouped_gemm=True: PyTorch's CUDA grouped GEMM computes in bfloat16, not {dtype} "
                "(pass bfloat16 inputs or run under autocast)"
            )
        return True

    def _naive(self, x_ND: Tensor, routing: RouterOutput) -> tuple[Tensor, Tensor, Tensor]:
        """The paper's §3.4 listing, verbatim in structure: a loop over k and over experts."""
        if self.cfg.capacity_factor is not None:
            raise ValueError("dispatch='naive' is the dropless reference; set capacity_factor=None")
        weights_NK = routing.weights.to(x_ND.dtype)
        y_ND = torch.zeros_like(x_ND)
        experts = self.experts.per_expert()  # the seed's self.experts[e]
        for i in range(self.cfg.top_k):
            expert_idx = routing.experts[:, i]
            expert_weight = weights_NK[:, i].unsqueeze(-1)
            for e in range(self.cfg.num_experts):
                mask = expert_idx == e
                if mask.any():
                    w_in, w_out = experts[e]
                    expert_out = feed_forward(x_ND[mask], w_in, w_out, self.cfg.activation)
                    y_ND[mask] += expert_weight[mask] * expert_out
        tokens_per_expert = torch.bincount(
            routing.experts.reshape(-1), minlength=self.cfg.num_experts
        )
        return y_ND, tokens_per_expert, tokens_per_expert.new_zeros(())
