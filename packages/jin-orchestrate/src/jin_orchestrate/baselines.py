"""The models Jin is compared with in the paper's tables, built from Jin's own parts and configs.

# B batch, T tokens, D width, R retrieval width

- :class:`TwoTowerModel` — CLIP / CLAP: one tower per modality (that modality's encoder and a
  backbone of its own, not shared), trained with the symmetric InfoNCE of Eq. 6 only: no JEPA, no
  cross-modal prediction, no z-JEPA. Tables 2 and 3 compare Jin with it.
- :func:`dense_config` — Jin with every backbone layer a dense FFN (Table 6's "dense" row).
- :func:`zjepa_ablation` — the five z-JEPA configurations of Table 5 at a given model's zoom depth.
- :func:`single_modality_config`, :func:`image_jepa_stage` — Jin trained on fewer modalities: the
  paper's "single-modality baselines" (what they mean at our scale: ``benchmarks/paper_tables.py``).

Every baseline has what training and evaluation use of :class:`~jin_orchestrate.model.JinModel`:
``cfg``, ``forward(batch, stage=...)`` returning loss terms with ``loss``, ``embed(batch)``,
``update_target(step, total)``, so :class:`~jin_orchestrate.train.StageTrainer` and
:func:`~jin_orchestrate.evaluate.evaluate_model` run them unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from jin_backbone import Backbone
from jin_encoders import JointEmbeddingSpace
from jin_orchestrate.config import JinConfig, StageConfig
from jin_orchestrate.model import JinModelConfig, _present, alignment_losses
from jin_zjepa import TABLE5_ABLATIONS, LogitScale, ZJEPAConfig

__all__ = [
    "TwoTowerModel",
    "dense_config",
    "image_jepa_stage",
    "single_modality_config",
    "zjepa_ablation",
]


class TwoTowerModel(nn.Module):
    """CLIP/CLAP-style baseline: a separate encoder and backbone per modality, InfoNCE only.

    Each tower is the modality's Jin encoder followed by a :class:`~jin_backbone.Backbone` of the
    same config as Jin's (same width, depth, experts), owned by that modality alone; the pooled,
    projected output is the embedding. The stage's ``gamma`` weights the loss; other weights are
    ignored, since this model has no other objective.
    """

    def __init__(self, cfg: JinModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.space = JointEmbeddingSpace(cfg.space)
        self.towers = nn.ModuleDict({m: Backbone(cfg.backbone) for m in cfg.builtin_modalities})
        self.logit_scale = LogitScale()

    @property
    def modalities(self) -> list[str]:
        return self.space.modalities

    def _embed_with_aux(self, batch: Mapping[str, Any]) -> tuple[dict[str, Tensor], Tensor]:
        z, aux = {}, []
        for name, enc in self.space.encode_batch(batch).items():
            out = self.towers[name](enc.tokens, padding_mask=enc.padding_mask)
            z[name] = self.space.project(name, out.hidden, enc.padding_mask)
            aux.append(out.aux_loss)
        return z, torch.stack(aux).mean() if aux else torch.zeros(())

    def embed(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """L2-normalised retrieval embeddings ``(B, R)`` of every modality in a jin-data batch."""
        return self._embed_with_aux(batch)[0]

    def forward(
        self,
        batch: Mapping[str, Any],
        *,
        stage: StageConfig,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Eq. 6 between every pair of modalities present, plus the towers' router losses."""
        del generator  # nothing is masked
        z, router_aux = self._embed_with_aux(batch)
        if len(z) < 2:
            raise ValueError(f"two-tower model: need two modalities in the batch, got {sorted(z)}")
        present = {n: _present(batch, n, e) for n, e in z.items()}
        scale = self.logit_scale()
        pairs = alignment_losses(z, present, scale)
        align = torch.stack(list(pairs.values())).mean()
        out = {k: v.detach() for k, v in pairs.items()}
        tokens = sum(int(_present(batch, n, e).sum()) for n, e in z.items())
        out.update(
            align=align,
            router_aux=router_aux,
            logit_scale=scale.detach(),
            loss=stage.gamma * align + router_aux,
            tokens=torch.tensor(tokens),
        )
        return out

    def update_target(self, step: int, total_steps: int) -> float:
        """No EMA target in a two-tower model; returns momentum 1 (nothing moves)."""
        del step, total_steps
        return 1.0


def dense_config(cfg: JinModelConfig) -> JinModelConfig:
    """``cfg`` with every backbone FFN dense (``moe_every=0``): same width, depth and FFN size.

    The dense layer has the hidden size of one expert, so the dense model has fewer parameters
    than the MoE one and, with top-2 routing, half the FFN compute per token in the layers that
    were MoE.
    """
    backbone = cfg.backbone.model_copy(update={"moe_every": 0})
    return JinModelConfig.model_validate({**cfg.model_dump(), "backbone": backbone.model_dump()})


def zjepa_ablation(cfg: JinModelConfig, row: str) -> JinModelConfig:
    """``cfg`` with Table 5's configuration ``row`` (a key of ``jin_zjepa.TABLE5_ABLATIONS``).

    Rows keep the model's own zoom levels and factors (the paper's four levels cost too much on a
    CPU); ``single_scale`` has one level, so no zoom pyramid and no Eq. 4 term.
    """
    if row not in TABLE5_ABLATIONS:
        raise ValueError(f"zjepa row {row!r}: expected one of {list(TABLE5_ABLATIONS)}")
    base = TABLE5_ABLATIONS[row]().model_dump()
    if row != "single_scale":
        base.update(
            num_z_levels=cfg.zjepa.num_z_levels,
            zoom_factors=cfg.zjepa.zoom_factors,
            roi_max_scale_change=cfg.zjepa.roi_max_scale_change,
        )
    zjepa = ZJEPAConfig.model_validate(base)
    return JinModelConfig.model_validate({**cfg.model_dump(), "zjepa": zjepa.model_dump()})


def single_modality_config(cfg: JinConfig, modalities: tuple[str, ...]) -> JinConfig:
    """``cfg`` with the model and data restricted to ``modalities`` (encoders of others dropped)."""
    unknown = [m for m in modalities if m not in cfg.model.builtin_modalities]
    if not modalities or unknown:
        raise ValueError(
            f"modalities {list(modalities)}: expected a non-empty subset of "
            f"{cfg.model.builtin_modalities}"
        )
    data = cfg.model_dump()
    for name in cfg.model.builtin_modalities:
        if name not in modalities:
            data["model"]["space"][name] = None
    data["data"]["modalities"] = tuple(modalities)
    return type(cfg).model_validate(data)


def image_jepa_stage(steps: int) -> StageConfig:
    """The one stage of image-only pretraining (Table 5): Eq. 1, and z-JEPA on the zoom levels."""
    return StageConfig(name="image_jepa", steps=steps, alpha=1.0, zjepa=1.0)
