"""Embedding with a trained Jin: a checkpoint loaded once, decoded Arrow tables in, vectors out.

# N rows, R retrieval width, F feature size

Serving (`jin_orchestrate.serving`) and the offline job (`jin_orchestrate.embed`) both embed
through :meth:`EmbeddingModel.embed_table`, on tables in jin-data's decoded layout (its `Decoder`'s
output) collated by `jin_data.collate`: the path every training batch takes, so a vector served
for a PNG is the vector the same PNG gets in a training shard.

Each modality is embedded on the rows that carry it, alone (a request mixing text and images runs
the text encoder on the texts only). A sample's embedding does not depend on what it is batched
with: padding is masked everywhere (tested to 1e-5 against embedding each row alone). Rows the
model rejects (an encoder's ``ValueError``, or a vector that is not finite) are reported per row
and do not fail their neighbours: a failed batch is retried row by row.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from pydantic import BaseModel, ConfigDict, Field

from jin_data import Decoder, collate
from jin_orchestrate.checkpoint import CONFIG, WEIGHTS, verify_checkpoint
from jin_orchestrate.evaluate import load_model
from jin_orchestrate.model import JinModel, JinModelConfig
from jin_orchestrate.tracking import local_checkpoint

__all__ = ["EmbeddingModel", "ModalitySpec", "ModelCard", "TableEmbeddings", "card_decoder"]

# Decoded columns whose name differs from the modality's (see jin_data.decode).
_DECODED_COLUMN = {"image": "image_pixels", "audio": "audio_wave"}


class ModalitySpec(BaseModel):
    """What one modality takes: ``shape`` of one decoded item, ``None`` where any size goes."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Literal["text", "image", "audio", "points", "vector"]
    shape: list[int | None]
    sample_rate: int | None = None
    min_length: int = 1
    column: str | None = Field(
        None, description="the jin-data column it reads where that is not its name"
    )


def _modality_specs(
    cfg: JinModelConfig, columns: dict[str, str] | None = None
) -> list[ModalitySpec]:
    space = cfg.space
    specs = []
    if space.text is not None:
        specs.append(ModalitySpec(name="text", kind="text", shape=[None]))
    if space.image is not None:
        specs.append(
            ModalitySpec(name="image", kind="image", shape=[space.image.in_channels, None, None])
        )
    if space.audio is not None:
        # Fewer samples than one hop give no mel frame: nothing to encode.
        specs.append(
            ModalitySpec(
                name="audio",
                kind="audio",
                shape=[None],
                sample_rate=space.audio.sample_rate,
                min_length=space.audio.hop_length,
            )
        )
    if space.points is not None:
        specs.append(
            ModalitySpec(name="points", kind="points", shape=[None, space.points.in_features])
        )
    if space.custom is not None:
        specs.append(ModalitySpec(name="custom", kind="vector", shape=[space.custom.input_dim]))
    for name, sub in cfg.extra_modalities.items():
        column = (columns or {}).get(name)
        specs.append(ModalitySpec(name=name, kind="vector", shape=[sub.input_dim], column=column))
    return specs


class ModelCard(BaseModel):
    """Identity and inputs of a loaded checkpoint; ``version`` is its weights' sha256 prefix."""

    model_config = ConfigDict(extra="forbid")

    version: str
    checkpoint: str
    preset: str
    dim: int
    modalities: list[ModalitySpec]

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], source: str | None = None) -> ModelCard:
        """The card of a verified local checkpoint, read from its files without loading weights."""
        manifest = verify_checkpoint(path)
        config = json.loads((Path(path) / CONFIG).read_text())
        cfg = JinModelConfig.model_validate(config["model"])
        return cls(
            version=manifest[WEIGHTS]["sha256"][:12],
            checkpoint=str(source if source is not None else path),
            preset=str(config.get("preset", "custom")),
            dim=cfg.space.retrieval_dim or cfg.dim,
            modalities=_modality_specs(cfg, config.get("data", {}).get("columns")),
        )

    def spec(self, name: str) -> ModalitySpec | None:
        """The modality called ``name``, or None."""
        return next((m for m in self.modalities if m.name == name), None)


@dataclass
class TableEmbeddings:
    """Per modality, ``(N, R)`` vectors (zeros where absent) and an ``(N,)`` presence mask.

    ``errors`` maps a row to why the model rejected it; such a row is absent from every modality.
    """

    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    present: dict[str, np.ndarray] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)


class EmbeddingModel:
    """A JinModel in eval mode on one device, with its :class:`ModelCard`."""

    def __init__(
        self, model: JinModel, card: ModelCard, device: str | torch.device = "cpu"
    ) -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.card = card

    @classmethod
    def from_checkpoint(
        cls,
        source: str | os.PathLike[str],
        *,
        tracking_uri: str | None = None,
        device: str | torch.device | None = None,
    ) -> EmbeddingModel:
        """Load a checkpoint directory or MLflow URI (see `local_checkpoint`); CUDA if present."""
        path = local_checkpoint(source, tracking_uri=tracking_uri)
        card = ModelCard.from_checkpoint(path, str(source))
        return cls(
            load_model(path), card, device or ("cuda" if torch.cuda.is_available() else "cpu")
        )

    @property
    def modalities(self) -> list[str]:
        return [m.name for m in self.card.modalities]

    @torch.inference_mode()
    def embed_table(self, table: pa.Table, modalities: list[str] | None = None) -> TableEmbeddings:
        """Embed every modality of a decoded table (or of ``modalities``) on its present rows."""
        out = TableEmbeddings()
        n = table.num_rows
        for name in modalities or self.modalities:
            column = _DECODED_COLUMN.get(name, name)
            if column not in table.column_names:
                continue
            present = np.asarray(pc.is_valid(table[column]).to_numpy(zero_copy_only=False), bool)
            vectors = np.zeros((n, self.card.dim), np.float32)
            rows = np.flatnonzero(present)
            if rows.size:
                embedded, errors = self._embed_rows(table.take(pa.array(rows)), name)
                vectors[rows] = embedded
                for i, message in errors.items():
                    present[rows[i]] = False
                    where = "" if message.startswith(f"{name}:") else f"{name}: "
                    previous = out.errors.get(int(rows[i]))
                    out.errors[int(rows[i])] = "; ".join(filter(None, [previous, where + message]))
            out.vectors[name], out.present[name] = vectors, present
        for row in out.errors:  # a rejected row is absent from its other modalities too
            for name in out.present:
                out.present[name][row] = False
                out.vectors[name][row] = 0.0
        return out

    def _embed_rows(self, table: pa.Table, name: str) -> tuple[np.ndarray, dict[int, str]]:
        """Vectors ``(N, R)`` of rows all carrying ``name``; rows the model rejects, by index."""
        try:
            vectors = self._forward(table, name)
        except ValueError as exc:
            if table.num_rows == 1:
                return np.zeros((1, self.card.dim), np.float32), {0: str(exc)}
            vectors = np.zeros((table.num_rows, self.card.dim), np.float32)
            errors: dict[int, str] = {}
            for i in range(table.num_rows):
                one, bad = self._embed_rows(table.slice(i, 1), name)
                vectors[i] = one[0]
                if bad:
                    errors[i] = bad[0]
            return vectors, errors
        finite = np.isfinite(vectors).all(axis=1)
        errors = {
            int(i): "the embedding is not finite (input values too large for float32?)"
            for i in np.flatnonzero(~finite)
        }
        vectors[~finite] = 0.0
        return vectors, errors

    def _forward(self, table: pa.Table, name: str) -> np.ndarray:
        batch = collate(table, [name]) if name in _BUILTIN else {name: _vectors(table[name], name)}
        return self.model.embed(batch)[name].float().cpu().numpy()  # moves the batch


_BUILTIN = ("text", "image", "audio", "points", "custom")


def card_decoder(card: ModelCard, on_error: Literal["raise", "skip"] = "raise") -> Decoder:
    """jin-data's decoder for a model card: its image channels and its audio sample rate."""
    image, audio = card.spec("image"), card.spec("audio")
    return Decoder(
        audio_sample_rate=audio.sample_rate if audio and audio.sample_rate else 16000,
        image_mode="L" if image is not None and image.shape[0] == 1 else "RGB",
        on_error=on_error,
    )


def _vectors(column: pa.ChunkedArray, name: str) -> torch.Tensor:
    """A ``list<float32>`` column of equal-length rows as a ``(N, F)`` float32 tensor."""
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if len(set(lengths.tolist())) > 1:
        raise ValueError(
            f"{name}: expected vectors of one length, received lengths {sorted(set(lengths))}"
        )
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float32)
    return torch.from_numpy(flat.reshape(len(column), -1))
