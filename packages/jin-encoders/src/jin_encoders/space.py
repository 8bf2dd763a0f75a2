"""The joint embedding space (paper §3.2, §3.6): encoders, modality embeddings, fusion, projections.

Fixes to the paper's listing:

- The modality embedding is indexed by a stable id assigned at registration (``add_modality``), not
  by the position of a modality in the input dict, so ids never depend on a batch's key order. The
  name -> id registry is a uint8 buffer (one UTF-8 name per row), so it survives ``state_dict``
  save/load, safetensors included, and loading a checkpoint whose registry differs fails loudly.
- The table is one ``(D,)`` parameter per modality (``modality_embed[i]``, a ParameterList):
  adding a modality appends a row and leaves existing rows, their optimizer state and every existing
  output bitwise unchanged, and "train only the new modality" can freeze the old rows one by one.
- Fusion is masked self-attention over the interleaved sequence (padding never attended), with
  0 or more layers: in JinModel the backbone does the deep fusion.

Shape legend: B batch, T tokens, D width, R retrieval width.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from jin_encoders._config import StrictConfig
from jin_encoders.audio import AudioEncoder, AudioEncoderConfig
from jin_encoders.base import EncoderInputError, EncoderOutput, ModalityEncoder, to_device
from jin_encoders.custom import CustomEncoderConfig, CustomModalityEncoder
from jin_encoders.fusion import FusedSequence, FusionLayer, concat_modalities
from jin_encoders.heads import RegressionHead, TextLMHead
from jin_encoders.points import PointCloudEncoder, PointCloudEncoderConfig
from jin_encoders.text import TextEncoder, TextEncoderConfig
from jin_encoders.vision import VisionEncoder, VisionEncoderConfig

__all__ = ["MAX_NAME_BYTES", "JointEmbeddingSpace", "JointEmbeddingSpaceConfig"]

MAX_NAME_BYTES = 64
_BUILTIN = {
    "text": TextEncoder,
    "image": VisionEncoder,
    "audio": AudioEncoder,
    "points": PointCloudEncoder,
    "custom": CustomModalityEncoder,
}


def _device_of(module: nn.Module) -> torch.device | None:
    """Where a module's first parameter (or buffer) lives; None for a module with neither."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return None


class JointEmbeddingSpaceConfig(StrictConfig):
    """Width, the built-in encoders to build (None = absent), fusion depth, heads, retrieval width.

    Sub-configs given as dicts inherit ``dim`` when they do not set it.
    """

    dim: int = Field(gt=0)
    text: TextEncoderConfig | None = None
    image: VisionEncoderConfig | None = None
    audio: AudioEncoderConfig | None = None
    points: PointCloudEncoderConfig | None = None
    custom: CustomEncoderConfig | None = None
    fusion_layers: int = Field(default=0, ge=0)
    fusion_heads: int = Field(default=4, gt=0)
    retrieval_dim: int | None = Field(default=None, gt=0)
    output_heads: bool = True
    tie_text_head: bool = True

    @model_validator(mode="before")
    @classmethod
    def _inherit_dim(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "dim" in data:
            data = dict(data)
            for key in _BUILTIN:
                sub = data.get(key)
                if isinstance(sub, Mapping) and "dim" not in sub:
                    data[key] = {**sub, "dim": data["dim"]}
        return data

    @model_validator(mode="after")
    def _check_widths(self) -> JointEmbeddingSpaceConfig:
        for key in _BUILTIN:
            sub = getattr(self, key)
            if sub is not None and sub.dim != self.dim:
                raise ValueError(f"{key}.dim: expected {self.dim} (the space's dim), got {sub.dim}")
        if self.fusion_layers and self.dim % self.fusion_heads:
            raise ValueError(
                f"fusion_heads: expected a divisor of dim={self.dim}, got {self.fusion_heads}"
            )
        return self


class JointEmbeddingSpace(nn.Module):
    """Encoders keyed by modality name in one D-wide space, with stable modality ids.

    Args:
        config: the space's config; its non-None built-in sub-configs are built and registered
            in the order text, image, audio, points, custom.
        encoders: further encoders to register after the built-ins, in the given order.
    """

    def __init__(
        self,
        config: JointEmbeddingSpaceConfig,
        encoders: Mapping[str, ModalityEncoder] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.dim = config.dim
        self.retrieval_dim = config.retrieval_dim or config.dim
        self.encoders = nn.ModuleDict()
        self.modality_embed = nn.ParameterList()
        self.projections = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        self.fusion = nn.ModuleList(
            FusionLayer(config.dim, config.fusion_heads) for _ in range(config.fusion_layers)
        )
        self.register_buffer("modality_registry", torch.zeros(0, MAX_NAME_BYTES, dtype=torch.uint8))
        self._names: list[str] = []
        for name, build in _BUILTIN.items():
            sub = getattr(config, name)
            if sub is not None:
                self.add_modality(name, build(sub))
        for name, encoder in (encoders or {}).items():
            self.add_modality(name, encoder)

    # -- registry ----------------------------------------------------------------------------

    @property
    def modalities(self) -> list[str]:
        """Registered modality names in id order."""
        return list(self._names)

    @property
    def modality_ids(self) -> dict[str, int]:
        """Name -> id (the row of the modality embedding table)."""
        return {name: i for i, name in enumerate(self._names)}

    @property
    def modality_table(self) -> Tensor:
        """The modality embedding table ``(num_modalities, D)`` (a stacked view of the rows)."""
        return torch.stack(list(self.modality_embed))

    def add_modality(
        self, name: str, encoder: ModalityEncoder, head: nn.Module | None = None
    ) -> int:
        """Register ``encoder`` under ``name`` and return its new id.

        Appends a modality embedding row, a retrieval projection and (with ``output_heads``) an
        output head: ``head`` when given, else a tied/untied LM head for a ``TextEncoder`` or a
        regression head of the encoder's ``target_dim``. Nothing existing is touched, so outputs
        for existing modalities stay bitwise identical. The new parameters (encoder included) take
        the space's device and the dtype of its existing modality rows, or of its fusion layers
        while it has none (a space cast to bfloat16 gets bfloat16 ones). Optimizers built before
        must be given the new parameters (``modality_parameters(name)``).
        """
        self._check_new_name(name)
        if not isinstance(encoder, ModalityEncoder):
            raise ValueError(
                f"add_modality({name!r}): expected a ModalityEncoder, received "
                f"{type(encoder).__name__}"
            )
        if encoder.dim != self.dim:
            raise ValueError(
                f"add_modality({name!r}): expected an encoder of width {self.dim}, "
                f"received width {encoder.dim}"
            )
        device = self.modality_registry.device
        # The new parameters take the dtype of the existing rows (a space cast with .to(dtype)),
        # or of the fusion layers while no modality is registered.
        existing = list(self.modality_embed) or list(self.fusion.parameters())
        dtype = existing[0].dtype if existing else None
        encoder.modality = name
        self.encoders[name] = encoder.to(device, dtype)
        row = nn.Parameter(torch.empty(self.dim, device=device, dtype=dtype))
        nn.init.normal_(row, std=0.02)
        self.modality_embed.append(row)
        self.projections[name] = nn.Linear(
            self.dim, self.retrieval_dim, bias=False, device=device, dtype=dtype
        )
        if head is None and self.config.output_heads:
            head = self._default_head(encoder)
        if head is not None:
            self.heads[name] = head.to(device, dtype)
        encoded = torch.zeros(1, MAX_NAME_BYTES, dtype=torch.uint8, device=device)
        raw = name.encode("utf-8")
        encoded[0, : len(raw)] = torch.tensor(list(raw), dtype=torch.uint8, device=device)
        self.modality_registry = torch.cat([self.modality_registry, encoded])
        self._names.append(name)
        return len(self._names) - 1

    @staticmethod
    def registry_from_state_dict(state_dict: Mapping[str, Tensor], prefix: str = "") -> list[str]:
        """Modality names, in id order, stored in a state_dict saved from a space."""
        key = f"{prefix}modality_registry"
        if key not in state_dict:
            raise KeyError(f"state_dict has no {key!r}: not saved from a JointEmbeddingSpace")
        return [bytes(row.tolist()).rstrip(b"\0").decode("utf-8") for row in state_dict[key].cpu()]

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        if f"{prefix}modality_registry" in state_dict:
            saved = self.registry_from_state_dict(state_dict, prefix)
            if saved != self._names:
                raise ValueError(
                    f"load_state_dict: modality registry mismatch: expected {self._names} "
                    f"(this model, in id order), received {saved} (the state_dict); register "
                    "the missing modalities with add_modality in the saved order, then load"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- encoding and fusion -----------------------------------------------------------------

    def encode(self, inputs: Mapping[str, Any]) -> dict[str, EncoderOutput]:
        """Encode each modality and add its modality embedding to every token.

        ``inputs`` maps a registered name to the encoder's input: a tensor (or list of str for
        text), or a mapping of ``forward`` keyword arguments (``{"x": ..., "sizes": ...}``).
        Input tensors are moved to the device of their encoder's parameters (a CPU batch from a
        data loader feeds a model on a GPU). The result is in registry order whatever the order
        of ``inputs``.
        """
        self._check_known(inputs)
        outputs = {}
        for name in self._names:
            if name not in inputs:
                continue
            encoder = self.encoders[name]
            device = _device_of(encoder)
            value = inputs[name] if device is None else to_device(inputs[name], device)
            out = encoder(**value) if isinstance(value, Mapping) else encoder(value)
            outputs[name] = self._add_modality_embedding(name, out)
        return outputs

    def encode_batch(self, batch: Mapping[str, Any]) -> dict[str, EncoderOutput]:
        """Encode every registered modality found in a jin-data collate batch.

        Reads each encoder's keys (``text_bytes``/``text_padding_mask``, ``image``/``image_sizes``,
        ``audio``/``audio_lengths``, ``points``/``points_padding_mask``, ``custom``, ...) and
        ``<name>_present`` (absent samples become all padding). Other keys are ignored.
        """
        inputs = {}
        for name in self._names:
            encoder = self.encoders[name]
            if name not in batch and f"{name}_bytes" not in batch:
                continue
            kwargs = encoder.batch_inputs(batch, name)
            if f"{name}_present" in batch:
                kwargs["present"] = batch[f"{name}_present"]
            inputs[name] = kwargs
        return self.encode(inputs)

    def fuse(self, outputs: Mapping[str, EncoderOutput]) -> FusedSequence:
        """Concatenate modalities (registry order) into one sequence and apply the fusion layers."""
        self._check_known(outputs)
        fused = concat_modalities(dict(outputs), self.modality_ids)
        tokens = fused.tokens
        for layer in self.fusion:
            tokens = layer(tokens, fused.padding_mask)
        return FusedSequence(
            tokens=tokens,
            padding_mask=fused.padding_mask,
            modality_ids=fused.modality_ids,
            pos=fused.pos,
            segments=fused.segments,
            grids=fused.grids,
        )

    def forward(self, inputs: Mapping[str, Any]) -> FusedSequence:
        """``fuse(encode(inputs))``."""
        return self.fuse(self.encode(inputs))

    # -- retrieval ---------------------------------------------------------------------------

    def project(self, name: str, tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Masked-mean-pool ``tokens (B,T,D)``, project for ``name``, L2-normalise -> ``(B,R)``."""
        self._check_known({name: None})
        if tokens.ndim != 3 or tokens.shape[-1] != self.dim:
            raise EncoderInputError(
                f"{name}: project: expected tokens (B,T,{self.dim}), received {tuple(tokens.shape)}"
            )
        if padding_mask is None:
            pooled = tokens.mean(dim=1)
        else:
            if (
                tuple(padding_mask.shape) != tuple(tokens.shape[:2])
                or padding_mask.dtype != torch.bool
            ):
                raise EncoderInputError(
                    f"{name}: project: padding_mask: expected bool of shape "
                    f"{tuple(tokens.shape[:2])}, received {padding_mask.dtype} of shape "
                    f"{tuple(padding_mask.shape)}"
                )
            # Filled, not multiplied: a padded token's value (even NaN) never reaches the mean.
            summed = tokens.masked_fill(padding_mask[..., None], 0.0).sum(dim=1)
            count = (~padding_mask).sum(dim=1, keepdim=True).clamp(min=1).to(tokens.dtype)
            pooled = summed / count
        return F.normalize(self.projections[name](pooled), dim=-1)

    def embed(self, inputs: Mapping[str, Any]) -> dict[str, Tensor]:
        """Pooled, L2-normalised retrieval embeddings ``(B,R)`` per modality (no fusion)."""
        return {
            name: self.project(name, out.tokens, out.padding_mask)
            for name, out in self.encode(inputs).items()
        }

    # -- freezing ----------------------------------------------------------------------------

    def modality_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """Parameters owned by one modality: encoder, embedding row, projection, head."""
        self._check_known({name: None})
        yield from self.encoders[name].parameters()
        yield self.modality_embed[self._names.index(name)]
        yield from self.projections[name].parameters()
        if name in self.heads:
            yield from self.heads[name].parameters()

    def freeze_all_but(self, names: str | Sequence[str], train_fusion: bool = False) -> None:
        """Freeze every parameter except those of ``names`` (and the fusion layers if asked)."""
        names = [names] if isinstance(names, str) else list(names)
        self._check_known(dict.fromkeys(names))
        self.requires_grad_(False)
        for name in names:
            for param in self.modality_parameters(name):
                param.requires_grad_(True)
        if train_fusion:
            self.fusion.requires_grad_(True)

    def unfreeze_all(self) -> None:
        """Make every parameter trainable again."""
        self.requires_grad_(True)

    # -- helpers -----------------------------------------------------------------------------

    def _default_head(self, encoder: ModalityEncoder) -> nn.Module | None:
        if isinstance(encoder, TextEncoder):
            tied = encoder.token_embed if self.config.tie_text_head else None
            return TextLMHead(self.dim, encoder.vocab_size, tied_embedding=tied)
        if encoder.target_dim:
            return RegressionHead(self.dim, encoder.target_dim)
        return None

    def _add_modality_embedding(self, name: str, out: EncoderOutput) -> EncoderOutput:
        tokens = out.tokens + self.modality_embed[self._names.index(name)]
        if out.padding_mask is not None:
            tokens = tokens * (~out.padding_mask)[..., None].to(tokens.dtype)
        return out.replace(tokens=tokens)

    def _check_known(self, inputs: Mapping[str, Any]) -> None:
        unknown = [name for name in inputs if name not in self.encoders]
        if unknown:
            raise EncoderInputError(
                f"unknown modality {', '.join(map(repr, unknown))}: expected one of the "
                f"registered modalities {self._names}"
            )

    def _check_new_name(self, name: str) -> None:
        # '.' would split a state_dict key; NUL pads the name in the stored registry.
        if not isinstance(name, str) or not name or "." in name or "\0" in name:
            raise ValueError(
                f"add_modality: expected a non-empty name without '.' or NUL, got {name!r}"
            )
        if len(name.encode("utf-8")) > MAX_NAME_BYTES:
            raise ValueError(
                f"add_modality: expected a name of at most {MAX_NAME_BYTES} UTF-8 bytes, "
                f"got {len(name.encode('utf-8'))} ({name!r})"
            )
        if name in self._names:
            raise ValueError(
                f"add_modality: modality {name!r} is already registered: {self._names}"
            )
