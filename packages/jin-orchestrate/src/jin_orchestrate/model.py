"""JinModel: joint embedding space -> DiT-MoE backbone -> heads, trained with the z-JEPA objectives.

# B batch, T tokens, D width, R retrieval width, L zoom levels, Nc/Nt context/target tokens

The online *representation* of a modality is ``backbone(encoder(x) + modality_embedding)`` with no
timestep (paper §3.1: encode, then process). One :class:`JinEncoder` holds both parts, so the EMA
target network (I-JEPA's ``f_θ̄``) is a single frozen copy of exactly that path.

Objectives per training step (paper §4.1, weighted by the stage as in Eq. 7):

- ``alpha`` · within-modality JEPA (Eq. 1): for every modality, a context (I-JEPA multi-block mask
  on the image grid, span masks on sequences) goes through the online path; the predictor places
  mask tokens at the targets' positions (plus the modality's embedding) and regresses the EMA
  target's layer-normed hidden states there.
- ``beta`` · cross-modal JEPA (Eq. 5): the same targets of modality B predicted from modality A's
  whole online sequence, for A, B in (text, x) and (x, text): captions are the hub that pairs
  every modality, as images are in ImageBind.
- ``gamma`` · alignment (Eq. 6): symmetric InfoNCE, with a learnable clamped temperature, between
  the pooled, projected embeddings of every pair of modalities present.
- ``zjepa`` · z-JEPA on images (§3.5, Eq. 4): a zoom pyramid (adaptive or random crops), Eq. 1 on
  every level and the cross-scale predictions between neighbouring levels.
- the MoE router's load-balancing and z-losses, as the backbone weights them.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from jin_backbone import Backbone, BackboneConfig, BackboneOutput
from jin_backbone import count_parameters as count_backbone
from jin_encoders import (
    CustomEncoderConfig,
    CustomModalityEncoder,
    EncoderOutput,
    JointEmbeddingSpace,
    JointEmbeddingSpaceConfig,
    PixelDiffusionHead,
    to_device,
)
from jin_orchestrate._config import StrictConfig
from jin_orchestrate.generation import GenerationConfig, GenerationHeads, Target, image_grid
from jin_zjepa import (
    AdaptiveZoom,
    CrossScalePredictor,
    EMAConfig,
    EMATarget,
    LogitScale,
    MultiBlockMaskConfig,
    MultiBlockMaskGenerator,
    Predictor,
    PredictorConfig,
    SpanMaskConfig,
    SpanMaskGenerator,
    ZJEPAConfig,
    content_std,
    cross_modal_jepa_loss,
    embedding_std,
    gather_tokens,
    info_nce,
    random_roi_centers,
    zjepa_loss,
    zoom_boxes,
    zoom_pyramid,
)

if TYPE_CHECKING:
    from jin_orchestrate.config import StageConfig

__all__ = [
    "JinEncoder",
    "JinModel",
    "JinModelConfig",
    "ParameterCounts",
    "alignment_losses",
    "count_parameters",
]

HUB = "text"


class JinModelConfig(StrictConfig):
    """The model: width ``dim`` is given once and inherited by every part that has one."""

    dim: int = Field(gt=0)
    space: JointEmbeddingSpaceConfig
    backbone: BackboneConfig
    predictor: PredictorConfig
    zjepa: ZJEPAConfig = ZJEPAConfig(
        num_z_levels=3, zoom_factors=(1.0, 0.5, 0.25), roi_max_scale_change=1.25
    )
    zoom_crop_size: int | None = Field(
        None,
        gt=0,
        description="side in pixels every zoom level is resampled to (None: the image's size); "
        "equal token budgets per level, coarse whole image to fine crop, as z-JEPA zooms",
    )
    image_mask: MultiBlockMaskConfig = MultiBlockMaskConfig()
    span_mask: SpanMaskConfig = SpanMaskConfig()
    ema_momentum: tuple[float, float] = Field(
        (0.996, 1.0),
        description="(start, end) momentum of the EMA target (jin_zjepa's EMAConfig), rising "
        "from start to end: 0 <= start <= end <= 1",
    )
    extra_modalities: dict[str, CustomEncoderConfig] = Field(
        default_factory=dict, description="modalities added at run time (add_modality), in order"
    )
    generation: GenerationConfig | None = Field(
        None, description="cross-modal generation heads (a generation stage trains them)"
    )

    @model_validator(mode="before")
    @classmethod
    def _inherit_dim(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "dim" in data:
            data = dict(data)
            for key, field in (("space", "dim"), ("backbone", "dim"), ("predictor", "embed_dim")):
                sub = data.get(key)
                if isinstance(sub, Mapping) and field not in sub:
                    data[key] = {**sub, field: data["dim"]}
            extra = data.get("extra_modalities")
            if isinstance(extra, Mapping):
                data["extra_modalities"] = {
                    k: {**v, "dim": data["dim"]} if isinstance(v, Mapping) and "dim" not in v else v
                    for k, v in extra.items()
                }
        return data

    @field_validator("ema_momentum")
    @classmethod
    def _check_ema_momentum(cls, momentum: tuple[float, float]) -> tuple[float, float]:
        # EMAConfig's rules, checked here so a bad value fails with the config, not in JinModel
        # inside every Ray worker.
        start, end = momentum
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(
                f"model.ema_momentum: expected (start, end) with 0 <= start <= end <= 1 (the EMA "
                f"target slows down, never speeds up), got {list(momentum)}"
            )
        return momentum

    @model_validator(mode="after")
    def _check_widths(self) -> JinModelConfig:
        for key, width in (
            ("space.dim", self.space.dim),
            ("backbone.dim", self.backbone.dim),
            ("predictor.embed_dim", self.predictor.embed_dim),
            *((f"extra_modalities.{k}.dim", v.dim) for k, v in self.extra_modalities.items()),
        ):
            if width != self.dim:
                raise ValueError(f"{key}: expected {self.dim} (model.dim), got {width}")
        clash = [k for k in self.extra_modalities if k in self.builtin_modalities]
        if clash:
            raise ValueError(f"extra_modalities: {clash} are built-in modality names")
        if self.generation is not None:
            self._check_generation(self.generation)
        return self

    def _check_generation(self, gen: GenerationConfig) -> None:
        for target in gen.targets:
            for name in (target, *gen.conditions(target)):
                if name not in ("text", "image", "audio") or name not in self.builtin_modalities:
                    raise ValueError(
                        f"generation.{target}_from: {name!r} must be one of the model's text, "
                        f"image and audio encoders (has {self.builtin_modalities})"
                    )
        if gen.image_from and self.space.image is not None:
            # GenerationHeads' rules (the same functions), checked here so a bad value fails with
            # the config, not in JinModel inside every Ray worker.
            patch = self.space.image.patch_size
            image_grid(gen.image_size, patch)
            if gen.image_head == "conv":
                try:
                    PixelDiffusionHead.stage_widths(
                        patch,
                        gen.image_head_channels,
                        patch_name="space.image.patch_size",
                        channels_name="generation.image_head_channels",
                    )
                except ValueError as exc:
                    raise ValueError(
                        f"generation.image_head=conv: {exc}; image_head=patch has no such rule"
                    ) from None
        if gen.text_from and self.space.text is not None:
            room = self.space.text.max_len - 2
            if gen.caption_max_bytes > room:
                raise ValueError(
                    f"generation.caption_max_bytes: at most space.text.max_len - 2 = {room}, got "
                    f"{gen.caption_max_bytes}"
                )

    @property
    def builtin_modalities(self) -> list[str]:
        names = ("text", "image", "audio", "points", "custom")
        return [n for n in names if getattr(self.space, n) is not None]

    @property
    def modalities(self) -> list[str]:
        return [*self.builtin_modalities, *self.extra_modalities]

    @property
    def audio_sample_rate(self) -> int:
        """The rate the audio encoder reads (what its batches must be decoded at); 16 kHz, the
        conventions', for a model without audio."""
        return self.space.audio.sample_rate if self.space.audio is not None else 16000


@dataclass(frozen=True)
class Representation:
    """One modality's online or target hidden states and its token bookkeeping."""

    hidden: Tensor  # (B, T, D)
    encoded: EncoderOutput
    aux_loss: Tensor


class JinEncoder(nn.Module):
    """The representation path ``f_θ``: joint embedding space, then the backbone (no timestep)."""

    def __init__(self, cfg: JinModelConfig) -> None:
        super().__init__()
        self.space = JointEmbeddingSpace(cfg.space)
        for name, sub in cfg.extra_modalities.items():
            self.space.add_modality(name, CustomModalityEncoder(sub))
        self.backbone = Backbone(cfg.backbone)
        self.router_log: list[BackboneOutput] | None = None

    def process(self, tokens_BTD: Tensor, padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Backbone hidden states and its weighted router losses; routing is tallied for logging."""
        out = self.backbone(tokens_BTD, padding_mask=padding_mask)
        if self.router_log is not None:
            self.router_log.append(out)
        return out.hidden, out.aux_loss

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Representation]:
        """Every modality of a jin-data batch, encoded and processed alone."""
        reps = {}
        for name, enc in self.space.encode_batch(batch).items():
            hidden, aux = self.process(enc.tokens, enc.padding_mask)
            reps[name] = Representation(hidden, enc, aux)
        return reps


def _present(batch: Mapping[str, Any], name: str, like: Tensor) -> Tensor:
    present = batch.get(f"{name}_present")
    if present is None:
        return torch.ones(like.shape[0], dtype=torch.bool, device=like.device)
    return present.to(like.device)


class JinModel(nn.Module):
    """Jin for training (``forward`` returns loss terms) and for embedding (``embed``)."""

    def __init__(self, cfg: JinModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = JinEncoder(cfg)
        self.predictor = Predictor(cfg.predictor)
        self.logit_scale = LogitScale()
        z = cfg.zjepa
        self.zoom = AdaptiveZoom(z, cfg.dim) if z.adaptive_zoom and z.num_z_levels > 1 else None
        self.cross_scale = (
            CrossScalePredictor(z, cfg.predictor) if z.num_z_levels > 1 and z.cross_scale else None
        )
        start, end = cfg.ema_momentum
        ema = EMAConfig(momentum_start=start, momentum_end=end, total_steps=1)
        self.target = EMATarget(self.encoder, ema)
        self.image_masks = MultiBlockMaskGenerator(cfg.image_mask)
        self.span_masks = SpanMaskGenerator(cfg.span_mask)
        # Modalities an extension stage trains (freeze_except); empty: everything trains.
        self.trainable: tuple[str, ...] = ()
        self.generation = (
            None if cfg.generation is None else GenerationHeads(cfg.generation, self.space, cfg.dim)
        )

    @property
    def space(self) -> JointEmbeddingSpace:
        return self.encoder.space

    @property
    def modalities(self) -> list[str]:
        return self.space.modalities

    @property
    def audio_sample_rate(self) -> int:
        """See :attr:`JinModelConfig.audio_sample_rate`."""
        return self.cfg.audio_sample_rate

    def add_modality(self, name: str, encoder: CustomModalityEncoder) -> int:
        """Register a runtime modality (paper §3.6) in the online and EMA target spaces.

        The modality-embedding table grows by one row; every existing parameter and every output
        for an existing modality stays bitwise the same. ``cfg.extra_modalities`` records it, so
        a checkpoint written afterwards rebuilds the same model.
        """
        if not isinstance(encoder, CustomModalityEncoder):
            raise ValueError(
                f"add_modality({name!r}): checkpoints rebuild CustomModalityEncoder modalities; "
                f"got {type(encoder).__name__}"
            )
        new_id = self.space.add_modality(name, encoder)
        self.target.module.space.add_modality(name, copy.deepcopy(encoder))
        self._copy_to_target(name)  # the target starts as a copy of the new online parameters
        extra = {**self.cfg.extra_modalities, name: encoder.config}
        self.cfg = self.cfg.model_copy(update={"extra_modalities": extra})
        return new_id

    def add_generation(self, cfg: GenerationConfig) -> None:
        """Add freshly initialised generation heads (a generation fine-tune of a trained model);
        ``cfg.generation`` records them, so a checkpoint written afterwards rebuilds them."""
        if self.generation is not None:
            raise ValueError("add_generation: the model already has generation heads")
        model_cfg = JinModelConfig.model_validate(
            {**self.cfg.model_dump(), "generation": cfg.model_dump()}
        )
        heads = GenerationHeads(cfg, self.space, self.cfg.dim)
        self.generation = heads.to(self.space.modality_embed[0].device)
        self.cfg = model_cfg

    @torch.no_grad()
    def _copy_to_target(self, name: str) -> None:
        target = self.target.module.space
        for t, o in zip(
            target.modality_parameters(name), self.space.modality_parameters(name), strict=True
        ):
            t.copy_(o)
            t.requires_grad_(False)

    def freeze_except(self, names: Sequence[str]) -> None:
        """Train only ``names``' encoders, modality-embedding rows and retrieval projections.

        Everything else stops requiring gradients and runs in eval mode even under ``train()``
        (no router jitter), so its outputs do not change: runtime modality extension, §3.6.
        Output heads stay frozen too: no objective of an extension stage reaches them.
        """
        unknown = [n for n in names if n not in self.modalities]
        if unknown:
            raise ValueError(f"freeze_except: {unknown} are not modalities of {self.modalities}")
        self.trainable = tuple(names)
        self.requires_grad_(False)
        space = self.space
        for name in names:
            space.encoders[name].requires_grad_(True)
            space.projections[name].requires_grad_(True)
            space.modality_embed[space.modality_ids[name]].requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> JinModel:
        """``nn.Module.train``; with :meth:`freeze_except`, only the trainable encoders train."""
        super().train(mode)
        if mode and self.trainable:
            super().train(False)
            for name in self.trainable:
                self.space.encoders[name].train(True)
        return self

    # -- embedding ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are; batches given to it are moved there."""
        return self.space.modality_registry.device

    def embed(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """L2-normalised retrieval embeddings ``(B, R)`` of every modality in a jin-data batch."""
        return {
            name: self.space.project(name, rep.hidden, rep.encoded.padding_mask)
            for name, rep in self.encoder(to_device(batch, self.device)).items()
        }

    # -- generation --------------------------------------------------------------------------

    def generate(
        self,
        target: Target,
        condition: Mapping[str, Any] | None = None,
        *,
        steps: int = 50,
        guidance: float = 3.0,
        seed: int = 0,
        **options: Any,
    ) -> Tensor | list[str]:
        """Cross-modal generation (paper §3.1 decoding); see `jin_orchestrate.generation.generate`.

        ``model.generate("image", {"text": ["the number 42"]}, steps=50, guidance=3.0, seed=0)``
        """
        from jin_orchestrate.generation import generate

        return generate(
            self, target, condition, steps=steps, guidance=guidance, seed=seed, **options
        )

    # -- training ----------------------------------------------------------------------------

    @torch.no_grad()
    def update_target(self, step: int, total_steps: int) -> float:
        """EMA update after optimiser step ``step`` of ``total_steps`` (momentum schedule).

        Under :meth:`freeze_except` the frozen targets stay as they are and the trainable
        modalities' targets follow their online parameters exactly (momentum 0).
        """
        if self.trainable:
            for name in self.trainable:
                self._copy_to_target(name)
            return 0.0
        if self.target.config.total_steps != total_steps:
            self.target.config = self.target.config.model_copy(update={"total_steps": total_steps})
        return self.target.update(self.encoder, step)

    def _masks(
        self,
        name: str,
        enc: EncoderOutput,
        generator: torch.Generator | None,
        present: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """Context and target indices (and padding masks) for one modality's tokens.

        A sample without the modality (``present`` False) is all padding, and a mask needs tokens:
        it is masked as a sample of the full length, whose loss terms ``present`` leaves out.
        """
        b, t = enc.tokens.shape[:2]
        if enc.grid is not None and enc.padding_mask is None:
            m = self.image_masks(b, enc.grid, generator=generator)
        else:
            valid = enc.valid_mask
            if present is not None:
                valid = valid | ~present[:, None]
            lengths = valid.sum(dim=1).clamp(min=1)
            m = self.span_masks(lengths.cpu(), t, generator=generator)
        dev = enc.tokens.device
        to = lambda x: None if x is None else x.to(dev)  # noqa: E731
        return (
            to(m.context_idx),
            to(m.context_padding_mask),
            to(m.target_idx),
            to(m.target_padding_mask),
        )

    def forward(
        self,
        batch: Mapping[str, Any],
        *,
        stage: StageConfig,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Loss terms of one step; ``loss`` is their Eq. 7 sum with the stage's weights.

        ``batch`` may be on the host: its tensors are moved to the model's device first (Ray
        Train leaves a batch with string columns, as jin-data's, on the host)."""
        batch = to_device(batch, self.device)
        if tuple(stage.trainable) != self.trainable:
            raise ValueError(
                f"stage {stage.name!r} trains {list(stage.trainable) or 'everything'} but the "
                f"model is set to train {list(self.trainable) or 'everything'}; call "
                "freeze_except(stage.trainable) first"
            )
        self.encoder.router_log = []
        try:
            if stage.generation > 0:
                from jin_orchestrate.generation import generation_losses

                return generation_losses(self, batch, stage, generator)
            if stage.trainable:
                from jin_orchestrate.extension import extension_losses

                return extension_losses(self, batch, stage, generator)
            return self._losses(batch, stage, generator)
        finally:
            self.encoder.router_log = None

    def _losses(
        self, batch: Mapping[str, Any], stage: StageConfig, generator: torch.Generator | None
    ) -> dict[str, Tensor]:
        encoded = self.space.encode_batch(batch)
        if not encoded:
            raise ValueError(
                f"batch has none of the model's modalities {self.modalities}; keys: {sorted(batch)}"
            )
        zero = next(iter(encoded.values())).tokens.new_zeros(())
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            targets = {n: r.hidden for n, r in self.target(batch).items()}
        present = {n: _present(batch, n, e.tokens) for n, e in encoded.items()}
        # Collapse watch (logged, not optimised): spread of the EMA targets' pooled embeddings
        # across the samples that have the modality (0 when collapsed; NaN for fewer than two)
        # and across them at each token position, padding left out.
        for name, hidden in targets.items():
            pad, rows = encoded[name].padding_mask, present[name]
            std = content = zero.new_full((), float("nan"))
            if bool(rows.any()):
                std = embedding_std(_masked_mean(hidden, pad)[rows])
                content = content_std(hidden[rows], None if pad is None else pad[rows])
            out[f"collapse/{name}_std"] = std
            out[f"collapse/{name}_content_std"] = content
        aux_terms: list[Tensor] = []
        # A modality no sample of the batch has gives no JEPA term (a mask needs tokens); it stays
        # in `encoded` for alignment, whose all-gathers every data-parallel rank must make alike.
        masks = {
            n: self._masks(n, e, generator, present[n])
            for n, e in encoded.items()
            if bool(present[n].any())
        }

        # Eq. 1, per modality, from its own context.
        jepa_terms = []
        if stage.alpha > 0:
            for name, (ctx_idx, ctx_pad, tgt_idx, tgt_pad) in masks.items():
                enc = encoded[name]
                ctx = gather_tokens(enc.tokens, ctx_idx)
                hidden, aux = self.encoder.process(ctx, ctx_pad)
                aux_terms.append(aux)
                pred = self.predictor(
                    hidden,
                    ctx_pad,
                    gather_tokens(enc.pos, tgt_idx) + self._row(name),
                    tgt_pad,
                    context_pos=gather_tokens(enc.pos, ctx_idx),
                )
                loss, _ = cross_modal_jepa_loss(
                    pred, gather_tokens(targets[name], tgt_idx), tgt_pad, present[name]
                )
                out[f"jepa/{name}"] = loss.detach()
                jepa_terms.append(loss)
        out["jepa"] = torch.stack(jepa_terms).mean() if jepa_terms else zero

        full: dict[str, Tensor] = {}
        if stage.beta > 0 or stage.gamma > 0 or stage.zjepa > 0:
            for name, enc in encoded.items():
                full[name], aux = self.encoder.process(enc.tokens, enc.padding_mask)
                aux_terms.append(aux)

        # Eq. 5: modality B's targets from modality A's whole sequence, through the text hub.
        cross_terms = []
        if stage.beta > 0 and HUB in masks:
            for a, b in self._hub_pairs(masks):
                _, _, tgt_idx, tgt_pad = masks[b]
                pred = self.predictor(
                    full[a],
                    encoded[a].padding_mask,
                    gather_tokens(encoded[b].pos, tgt_idx) + self._row(b),
                    tgt_pad,
                    context_pos=encoded[a].pos,
                )
                loss, _ = cross_modal_jepa_loss(
                    pred, gather_tokens(targets[b], tgt_idx), tgt_pad, present[a] & present[b]
                )
                out[f"cross_modal/{a}_to_{b}"] = loss.detach()
                cross_terms.append(loss)
        out["cross_modal"] = torch.stack(cross_terms).mean() if cross_terms else zero

        # Eq. 6: symmetric InfoNCE between every pair of modalities present.
        out["align"] = zero
        if stage.gamma > 0:
            out["align"] = self.alignment(full, encoded, present, out)

        # Eq. 4 and Eq. 1 on the levels of the zoom pyramid (images only).
        out["zjepa"] = zero
        if stage.zjepa > 0 and "image" in masks and self.cfg.zjepa.num_z_levels > 1:
            image_present = present["image"]
            out["zjepa"], z_aux = self._zjepa(
                batch, full["image"], encoded["image"].padding_mask, image_present, generator, out
            )
            aux_terms.append(z_aux)

        out["router_aux"] = torch.stack(aux_terms).mean() if aux_terms else zero
        out.update(_router_metrics(self.encoder.router_log or []))
        out["loss"] = (
            stage.alpha * out["jepa"]
            + stage.beta * out["cross_modal"]
            + stage.gamma * out["align"]
            + stage.zjepa * out["zjepa"]
            + out["router_aux"]
        )
        out["tokens"] = torch.tensor(sum(int(e.valid_mask.sum()) for e in encoded.values()))
        return out

    def _row(self, name: str) -> Tensor:
        return self.space.modality_embed[self.space.modality_ids[name]]

    @staticmethod
    def _hub_pairs(names: Iterable[str]) -> list[tuple[str, str]]:
        others = [n for n in names if n != HUB]
        return [(HUB, n) for n in others] + [(n, HUB) for n in others]

    def _images(self, batch: Mapping[str, Any]) -> Tensor:
        """The batch's images as normalised float ``(B, C, H, W)``, as the encoder sees them."""
        vision = self.space.encoders["image"]
        mean, std = vision.config.channel_stats()
        x = batch["image"].float() / 255.0
        m = torch.tensor(mean, device=x.device)[:, None, None]
        s = torch.tensor(std, device=x.device)[:, None, None]
        return (x - m) / s

    def alignment(
        self,
        hidden: Mapping[str, Tensor],
        encoded: Mapping[str, Any],
        present: Mapping[str, Tensor],
        out: dict[str, Tensor],
        involving: Sequence[str] | None = None,
    ) -> Tensor:
        """Eq. 6: the mean symmetric InfoNCE over pairs of modalities (those with a modality of
        ``involving`` in them, when given), each pair's loss logged in ``out``."""
        z = {n: _gather(self.space.project(n, hidden[n], encoded[n].padding_mask)) for n in encoded}
        scale = self.logit_scale()
        pairs = alignment_losses(
            z, {n: _gather(p) for n, p in present.items()}, scale, involving=involving
        )
        out.update({k: v.detach() for k, v in pairs.items()})
        out["logit_scale"] = scale.detach()
        terms = list(pairs.values())
        return torch.stack(terms).mean() if terms else scale.new_zeros(())

    def _zjepa(
        self,
        batch: Mapping[str, Any],
        image_hidden: Tensor,
        padding_mask: Tensor | None,
        present: Tensor,
        generator: torch.Generator | None,
        out: dict[str, Tensor],
    ) -> tuple[Tensor, Tensor]:
        z = self.cfg.zjepa
        images = self._images(batch)
        if not bool(present.all()):  # the samples that have an image (at least one has)
            images, image_hidden = images[present], image_hidden[present]
            padding_mask = None if padding_mask is None else padding_mask[present]
        b = images.shape[0]
        side = self.cfg.zoom_crop_size
        size = None if side is None else (side, side)
        if self.zoom is not None:
            # Pooled without the padding of smaller images (a batch of several sizes).
            zoomed = self.zoom(
                images, global_features=image_hidden, size=size, padding_mask=padding_mask
            )
            crops, boxes = zoomed.crops, zoomed.boxes
        else:
            centers = random_roi_centers(b, generator).to(images.device)
            boxes = zoom_boxes(centers, z.zoom_factors)
            crops = zoom_pyramid(images, boxes, size)
        levels = crops.shape[1]
        flat = crops.flatten(0, 1)  # (B*L, C, H, W)
        enc = self.space.encode({"image": flat})["image"]
        with torch.no_grad():
            t_enc = self.target.module.space.encode({"image": flat})["image"]
            t_hidden, _ = self.target.module.process(t_enc.tokens, None)
        online, aux = self.encoder.process(enc.tokens, None)
        # Eq. 1 on every level (masked context -> targets), then Eq. 4 between levels.
        ctx_idx, ctx_pad, tgt_idx, tgt_pad = self._masks("image", enc, generator)
        ctx_hidden, aux_ctx = self.encoder.process(gather_tokens(enc.tokens, ctx_idx), ctx_pad)
        pred = self.predictor(
            ctx_hidden,
            ctx_pad,
            gather_tokens(enc.pos, tgt_idx) + self._row("image"),
            tgt_pad,
            context_pos=gather_tokens(enc.pos, ctx_idx),
        )
        err = _per_sample_mse(pred, gather_tokens(t_hidden, tgt_idx), tgt_pad).view(b, levels)
        level_losses = list(err.mean(dim=0).unbind())
        cross = None
        if self.cross_scale is not None:
            t = t_hidden.shape[1]
            cross, metrics = self.cross_scale(
                online.view(b, levels, t, -1), t_hidden.view(b, levels, t, -1), boxes, enc.grid
            )
            out["zjepa/cross_scale"] = metrics["cross_scale/loss"]
        loss, _ = zjepa_loss(level_losses, cross)
        for i, level in enumerate(level_losses):
            out[f"zjepa/level{i}"] = level.detach()
        return loss, (aux + aux_ctx) / 2


def alignment_losses(
    z: Mapping[str, Tensor],
    present: Mapping[str, Tensor],
    logit_scale: Tensor,
    involving: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Eq. 6 for every pair of modalities: symmetric InfoNCE, keyed ``align/a-b`` (sorted names).

    ``z`` maps a modality to its pooled embeddings ``(B, R)`` and ``present`` to ``(B,)`` bools;
    a pair only counts the rows where both are present. With ``involving``, only the pairs with
    one of those modalities in them (runtime extension aligns the new modality alone).
    """
    losses = {}
    for a, b in itertools.combinations(sorted(z), 2):
        if involving is None or a in involving or b in involving:
            losses[f"align/{a}-{b}"], _ = info_nce(z[a], z[b], logit_scale, present[a] & present[b])
    return losses


def _router_metrics(outputs: list[BackboneOutput]) -> dict[str, Tensor]:
    """Routing of this step, over every backbone call and MoE layer (detached, for logging).

    ``router/max_load`` is the busiest expert's share of assignments times E (1.0 is perfectly
    balanced); the losses are the unweighted Switch load-balancing and ST-MoE z-losses.
    """
    stats = [s for o in outputs for s in o.router_stats]
    if not stats:
        return {}
    load = torch.stack([s.tokens_per_expert for s in stats]).sum(dim=0).float()
    return {
        "router/load_balancing_loss": torch.stack([o.load_balancing_loss for o in outputs])
        .mean()
        .detach(),
        "router/z_loss": torch.stack([o.z_loss for o in outputs]).mean().detach(),
        "router/max_load": load.max() * load.numel() / load.sum().clamp(min=1.0),
        "router/entropy": torch.stack([s.router_entropy for s in stats]).mean(),
        "router/dropped_tokens": torch.stack([s.dropped_tokens for s in stats]).sum().float(),
    }


def _gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` over data-parallel ranks, keeping this rank's gradient (CLIP-style).

    InfoNCE's negatives then come from the global batch, not just this rank's share of it.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    if x.dtype == torch.bool:  # gloo has no bool collectives
        parts = [
            x.new_empty(x.shape, dtype=torch.uint8)
            for _ in range(torch.distributed.get_world_size())
        ]
        torch.distributed.all_gather(parts, x.to(torch.uint8))
        return torch.cat(parts).bool()
    return _AllGather.apply(x)


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0; the backward gives each rank the sum, over ranks, of the gradient
    for its own rows (the semantics of ``torch.distributed.nn.functional.all_gather``, which
    torch 2.13 deprecates with a warning on every call)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.rank, ctx.rows = torch.distributed.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


# Both select the kept tokens, not multiply by a keep mask (as jin_zjepa's masked_mse): 0 * NaN
# is NaN, and a padded token's value (or its gradient through pow) must never reach the result.
def _masked_mean(x_BTD: Tensor, padding_mask: Tensor | None) -> Tensor:
    if padding_mask is None:
        return x_BTD.mean(dim=1)
    keep = (~padding_mask)[..., None]
    total = torch.where(keep, x_BTD, 0).sum(dim=1)
    return total / keep.sum(dim=1).clamp(min=1).to(x_BTD.dtype)


def _per_sample_mse(pred: Tensor, target: Tensor, padding_mask: Tensor | None) -> Tensor:
    """Eq. 1's error per sample ``(B,)``, with I-JEPA's layer-normed targets."""
    target = F.layer_norm(target.detach(), (target.shape[-1],))
    if padding_mask is None:
        err = (pred - target).pow(2).mean(dim=-1)
        return err.sum(dim=1) / max(err.shape[1], 1)
    keep = ~padding_mask
    pred, target = (torch.where(keep[..., None], t, 0) for t in (pred, target))
    err = (pred - target).pow(2).mean(dim=-1)
    return err.sum(dim=1) / keep.sum(dim=1).clamp(min=1).to(err.dtype)


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of the model without its EMA copy: all of them, and those active per token."""

    total: int
    active: int


def count_parameters(cfg: JinModelConfig) -> ParameterCounts:
    """Count on the meta device (nothing is allocated, so the 480B preset counts in a second).

    Active per token: everything but the experts a token is not routed to (``E - k`` of ``E`` in
    every MoE layer), as the backbone counts them. The EMA target copy is excluded.
    """
    with torch.device("meta"):
        model = JinModel(cfg)
    total = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("target."))
    backbone = count_backbone(model.encoder.backbone)
    return ParameterCounts(total=total, active=total - backbone.total + backbone.active)
