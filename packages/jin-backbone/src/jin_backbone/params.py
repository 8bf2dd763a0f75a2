"""Total and active (per token) parameter counts, on the meta device without allocation.

An MoE layer holds ``E`` experts but runs only ``K`` per token, so its active parameters are the
router plus ``K/E`` of the experts (paper §2.2: "parameter scaling without proportional compute").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from jin_backbone.backbone import Backbone, BackboneConfig
from jin_backbone.moe import MoE

__all__ = ["ParameterCount", "count_parameters"]


@dataclass(frozen=True)
class ParameterCount:
    """``total`` parameters and ``active`` parameters per token (``active <= total``)."""

    total: int
    active: int


def count_parameters(model: nn.Module | BackboneConfig) -> ParameterCount:
    """Count any module's parameters, treating every :class:`MoE` inside as top-k of E active.

    A :class:`BackboneConfig` is built on the meta device first, so a 480B-parameter
    configuration is counted in about a second without allocating its weights. The same works for
    any model built under ``with torch.device("meta"):``. Shared (tied) parameters count once.

    Example:
        >>> count_parameters(BackboneConfig(dim=64, depth=2, num_heads=2)).total > 0
        True
    """
    if isinstance(model, BackboneConfig):
        with torch.device("meta"):
            model = Backbone(model)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for module in model.modules():
        if isinstance(module, MoE):
            experts = sum(p.numel() for p in module.experts.parameters())
            num_experts, top_k = module.cfg.num_experts, module.cfg.top_k
            inactive += experts // num_experts * (num_experts - top_k)
    return ParameterCount(total=total, active=total - inactive)
