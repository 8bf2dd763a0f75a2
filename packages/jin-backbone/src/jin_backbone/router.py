"""Top-k token router with the Switch load-balancing loss and the ST-MoE router z-loss.

Shapes: N tokens (flattened, padding already removed), D width, E experts, K top-k.

The routing rule is the paper's listing in §3.4 (logits -> softmax -> top-k, Eq. 2); the auxiliary
losses are Switch Transformer's (Fedus et al. 2021, Eq. 4) and ST-MoE's (Zoph et al. 2022, Eq. 5).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Router", "RouterOutput", "RouterStats", "load_balancing_loss", "router_z_loss"]


@dataclass(frozen=True)
class RouterStats:
    """Per-call routing statistics for logging (detached; no host synchronisation).

    Attributes:
        tokens_per_expert: ``(E,)`` int64, (token, expert) assignments each expert received from
            the router, before any capacity drop. Sums to ``K * N``.
        dropped_tokens: ``()`` int64, assignments dropped by the capacity limit (0 when dropless).
        router_entropy: ``()`` float32, mean entropy (nats) of the router's softmax over tokens;
            ``log(E)`` is uniform routing, 0 is a one-hot router.
    """

    tokens_per_expert: Tensor
    dropped_tokens: Tensor
    router_entropy: Tensor


@dataclass(frozen=True)
class RouterOutput:
    """What the router hands to dispatch: weights ``(N,K)`` and experts ``(N,K)``,
    the fp32 ``logits`` and ``probs`` ``(N,E)`` the auxiliary losses are computed from."""

    weights: Tensor
    experts: Tensor
    logits: Tensor
    probs: Tensor


def load_balancing_loss(probs_NE: Tensor, experts_NK: Tensor) -> Tensor:
    """Switch Transformer's auxiliary loss ``E * sum_i f_i * P_i`` (Fedus et al. 2021, Eq. 4).

    ``f_i`` is the fraction of the ``N*K`` assignments that went to expert ``i`` and ``P_i`` the
    mean router probability of expert ``i``. Equals 1 under perfectly uniform routing. Only ``P``
    carries gradient (``f`` comes from an argmax). Zero, not NaN, for zero tokens.
    """
    num_tokens, num_experts = probs_NE.shape
    assignments = torch.bincount(experts_NK.reshape(-1), minlength=num_experts)
    denominator = max(experts_NK.numel(), 1)
    fraction_E = assignments.to(probs_NE.dtype) / denominator
    mean_prob_E = probs_NE.sum(0) / max(num_tokens, 1)
    return num_experts * torch.dot(fraction_E, mean_prob_E)


def router_z_loss(logits_NE: Tensor) -> Tensor:
    """ST-MoE's router z-loss ``mean_n logsumexp(logits_n)^2`` (Zoph et al. 2022, Eq. 5).

    Keeps router logits small so the fp32 softmax stays well conditioned. Zero for zero tokens.
    """
    return torch.logsumexp(logits_NE, dim=-1).square().sum() / max(logits_NE.shape[0], 1)


class Router(nn.Module):
    """Linear router: ``softmax(x W)`` then top-k, as in the paper's §3.4 listing.

    Args:
        dim: token width ``D``.
        num_experts: ``E``.
        top_k: ``K`` experts per token.
        renormalize: rescale the ``K`` selected probabilities to sum to 1 (Mixtral, DeepSeek-MoE);
            off, the weights are the raw softmax probabilities (Switch, the paper's listing).
            Ignored for ``K=1``, where the gate stays the raw probability (see `forward`).
        jitter: Switch's multiplicative input jitter ``x * U(1-eps, 1+eps)`` in training.
        noise_std: Shazeer et al.'s additive Gaussian noise on the logits in training.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        renormalize: bool = True,
        jitter: float = 0.0,
        noise_std: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.jitter = jitter
        self.noise_std = noise_std
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Small logits at init: near-uniform routing, so every expert receives gradient early.
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x_ND: Tensor) -> RouterOutput:
        """Route ``(N,D)`` tokens; the router itself runs in fp32 for stable softmax (ST-MoE §3).

        Autocast is turned off for it: ``F.linear`` is on autocast's lower-precision list, so
        casting the operands to fp32 alone would still give bf16 logits under autocast, and
        with them other expert choices and bf16 auxiliary losses.
        """
        with _autocast_off(x_ND.device):
            x_ND = x_ND.float()
            if self.training and self.jitter > 0:
                x_ND = x_ND * torch.empty_like(x_ND).uniform_(1 - self.jitter, 1 + self.jitter)
            logits_NE = F.linear(x_ND, self.weight.float())
            if self.training and self.noise_std > 0:
                logits_NE = logits_NE + torch.randn_like(logits_NE) * self.noise_std
            probs_NE = logits_NE.softmax(dim=-1)
            weights_NK, experts_NK = torch.topk(probs_NE, self.top_k, dim=-1)
            # With K=1 renormalising would make every gate exactly 1, and the task loss would
            # send the router no gradient: Switch (top-1) and Eq. 2 gate with the probability.
            if self.renormalize and self.top_k > 1:
                weights_NK = weights_NK / weights_NK.sum(-1, keepdim=True)
        return RouterOutput(weights_NK, experts_NK, logits_NE, probs_NE)

    @staticmethod
    def entropy(probs_NE: Tensor) -> Tensor:
        """Mean entropy of the routing distribution, in nats (0 for zero tokens)."""
        return torch.special.entr(probs_NE).sum() / max(probs_NE.shape[0], 1)


def _autocast_off(device: torch.device) -> AbstractContextManager[Any]:
    """Autocast disabled on ``device``; nothing to disable where it has none (the meta device)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()
