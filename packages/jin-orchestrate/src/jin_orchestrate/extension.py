"""Runtime modality extension (paper §3.6): one new modality trained against the frozen rest.

# B batch, T tokens, D width, R retrieval width

A modality added to a trained model with `JinModel.add_modality` starts with a random encoder,
modality-embedding row and retrieval projection. An extension stage (``StageConfig.trainable``)
trains only those: every parameter that existed is frozen (``requires_grad`` off, never given to
the optimiser) and the frozen parts run in eval mode (no router jitter), so every pre-existing
modality's embeddings stay bitwise what they were. The paper's Limitations say a new modality
needs fine-tuning; this is that fine-tuning, with the trained model as a fixed teacher through
two of its own pretraining objectives:

- Eq. 6 (``gamma``): symmetric InfoNCE between the new modality's pooled embedding and each
  anchor modality of the batch (``StageConfig.align_with``; all of them when empty), at the
  model's learned temperature;
- Eq. 5 (``beta``): the frozen predictor, fed the new modality's backbone states, predicts the EMA
  targets of masked spans of the text hub.

Gradients pass through the frozen backbone and predictor into the new encoder only; the EMA target
of the new modality is kept equal to its online parameters (nothing else in the target moves).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from jin_encoders import CustomModalityEncoder
from jin_orchestrate.checkpoint import CheckpointError, load_checkpoint, read_config
from jin_orchestrate.ema import apply_ema
from jin_orchestrate.generation import GenerationConfig
from jin_orchestrate.model import HUB, JinModel, JinModelConfig, _present, _router_metrics
from jin_zjepa import cross_modal_jepa_loss, gather_tokens

if TYPE_CHECKING:
    from jin_orchestrate.config import StageConfig

__all__ = ["extension_losses", "model_from_checkpoint"]


def model_from_checkpoint(path: str | Path, cfg: JinModelConfig) -> tuple[JinModel, dict[str, Any]]:
    """The model of ``cfg`` holding the weights at ``path``, and the checkpoint's state.

    The checkpoint may lack runtime-added modalities of ``cfg`` (an extension starting from a
    pretrained model) and its generation heads (a generation fine-tune): those are added after
    loading, freshly initialised from torch's global RNG, in ``cfg``'s order. A generation
    checkpoint may be fine-tuned with other loss weights (`GenerationConfig.TRAINING_FIELDS`).
    Any other difference between the two configs is an error.

    An extension freezes everything that exists, so it starts from the weights the checkpoint
    serves: its average (``train.weight_ema``) where it kept one, as `load_model` loads it, so
    the new modality is aligned with the embeddings already served and those stay as they were.
    A generation fine-tune trains everything and continues from the last step's weights.
    """
    saved = JinModelConfig.model_validate(read_config(path)["model"])
    if cfg.generation is not None and saved.generation is not None:
        tuned = {k: getattr(cfg.generation, k) for k in GenerationConfig.TRAINING_FIELDS}
        saved = saved.model_copy(update={"generation": saved.generation.model_copy(update=tuned)})
    missing = [n for n in cfg.extra_modalities if n not in saved.extra_modalities]
    add_generation = cfg.generation is not None and saved.generation is None
    base = cfg.model_copy(
        update={
            "extra_modalities": {
                k: v for k, v in cfg.extra_modalities.items() if k in saved.extra_modalities
            },
            "generation": None if add_generation else cfg.generation,
        }
    )
    if base.model_dump() != saved.model_dump():
        differ = sorted(k for k, v in base.model_dump().items() if saved.model_dump().get(k) != v)
        raise CheckpointError(
            f"{path}: its model config differs from this job's in {differ} (beyond the "
            f"modalities added here, {missing}); start from a checkpoint of this model"
        )
    model = JinModel(base)
    loaded = load_checkpoint(path, model, load_optimizer=False)
    if missing and loaded.ema is not None:
        apply_ema(model, loaded.ema)
    for name in missing:
        model.add_modality(name, CustomModalityEncoder(cfg.extra_modalities[name]))
    if add_generation:
        assert cfg.generation is not None
        model.add_generation(cfg.generation)
    return model, loaded.state


def _only(batch: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The keys of ``batch`` that belong to modality ``name`` (``text_bytes``, ...)."""
    return {k: v for k, v in batch.items() if k == name or k.startswith(f"{name}_")}


def extension_losses(
    model: JinModel,
    batch: Mapping[str, Any],
    stage: StageConfig,
    generator: torch.Generator | None,
) -> dict[str, Tensor]:
    """Loss terms of one extension step; ``loss = beta·cross_modal + gamma·align + router``."""
    new = list(stage.trainable)
    encoded = model.space.encode_batch(batch)
    lacking = [n for n in new if n not in encoded]
    if lacking:
        raise ValueError(
            f"stage {stage.name!r}: the batch has no {lacking} (keys: {sorted(batch)}); "
            "map the modality to its column with data.columns"
        )
    if stage.align_with:
        # Only the anchors (and the text hub, Eq. 5's target) run through the frozen model.
        keep = {*new, *stage.align_with, *((HUB,) if stage.beta > 0 else ())}
        encoded = {n: e for n, e in encoded.items() if n in keep}
    zero = encoded[new[0]].tokens.new_zeros(())
    present = {n: _present(batch, n, e.tokens) for n, e in encoded.items()}
    hidden: dict[str, Tensor] = {}
    aux_terms = []
    for name, enc in encoded.items():
        # The frozen modalities are inputs here: no graph is kept for them.
        with torch.set_grad_enabled(torch.is_grad_enabled() and name in new):
            hidden[name], aux = model.encoder.process(enc.tokens, enc.padding_mask)
        if name in new:
            aux_terms.append(aux)
    out: dict[str, Tensor] = {}

    # Eq. 5: the text hub's masked targets from the new modality's whole sequence.
    cross_terms = []
    # A batch without any text has no targets for it (a mask needs tokens).
    if stage.beta > 0 and HUB in encoded and HUB not in new and bool(present[HUB].any()):
        text = encoded[HUB]
        with torch.no_grad():
            target = model.target.module
            t_enc = target.space.encode_batch(_only(batch, HUB))[HUB]
            t_hidden, _ = target.process(t_enc.tokens, t_enc.padding_mask)
        _, _, tgt_idx, tgt_pad = model._masks(HUB, text, generator, present[HUB])
        for a in new:
            pred = model.predictor(
                hidden[a],
                encoded[a].padding_mask,
                gather_tokens(text.pos, tgt_idx) + model._row(HUB),
                tgt_pad,
                context_pos=encoded[a].pos,
            )
            loss, _ = cross_modal_jepa_loss(
                pred, gather_tokens(t_hidden, tgt_idx), tgt_pad, present[a] & present[HUB]
            )
            out[f"cross_modal/{a}_to_{HUB}"] = loss.detach()
            cross_terms.append(loss)
    out["cross_modal"] = torch.stack(cross_terms).mean() if cross_terms else zero

    # Eq. 6: InfoNCE of every pair with a new modality in it.
    out["align"] = zero
    if stage.gamma > 0:
        out["align"] = model.alignment(hidden, encoded, present, out, involving=new)

    out["router_aux"] = torch.stack(aux_terms).mean() if aux_terms else zero
    out.update(_router_metrics(model.encoder.router_log or []))
    out["loss"] = stage.beta * out["cross_modal"] + stage.gamma * out["align"] + out["router_aux"]
    out["tokens"] = torch.tensor(sum(int(e.valid_mask.sum()) for e in encoded.values()))
    return out
