"""The one encoder interface every modality implements, and the checks that guard its inputs.

An encoder is a shallow tokenizer (patch embedding, convolutional stem, mini-PointNet, projection)
plus positions: raw-ish input in, ``EncoderOutput`` out. The deep transformer is the backbone in
another package; the z-JEPA context/target selection drops tokens *after* the encoder, so each token
already carries its position and the positional embedding is returned on its own as ``pos``.

Shape legend: B batch, T tokens, D width.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "EncoderInputError",
    "EncoderOutput",
    "ModalityEncoder",
    "sinusoidal_positions",
    "to_device",
]


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with its tensors on ``device``: a tensor, or the tensor values of a mapping (an
    encoder's keyword arguments, a jin-data batch); anything else (a list of str) as it is. No
    copy where a tensor is there already; host-to-accelerator copies may overlap compute."""
    blocking = device.type == "cpu"  # a copy back to the host must finish before it is read

    def move(x: Any) -> Any:
        return x.to(device, non_blocking=not blocking) if isinstance(x, Tensor) else x

    if isinstance(value, Mapping):
        return {k: move(v) for k, v in value.items()}
    return move(value)


class EncoderInputError(ValueError):
    """Bad input to an encoder or front-end; names the modality, expected and received."""


@dataclass(frozen=True)
class EncoderOutput:
    """What every encoder returns (docs/CONVENTIONS.md, "Encoder output").

    Attributes:
        tokens: ``(B,T,D)`` token embeddings, positions already added; zero at padding.
        padding_mask: ``(B,T)`` bool, True at padding; None when no sample is padded.
        pos: ``(B,T,D)`` the positional embedding that was added to each token; zero at padding.
        grid: ``(h, w)`` token grid of a 2-D modality when every sample shares it, else None.
    """

    tokens: Tensor
    padding_mask: Tensor | None
    pos: Tensor | None
    grid: tuple[int, int] | None = None

    @property
    def valid_mask(self) -> Tensor:
        """``(B,T)`` bool, True at real tokens (the complement of ``padding_mask``)."""
        if self.padding_mask is None:
            return torch.ones(self.tokens.shape[:2], dtype=torch.bool, device=self.tokens.device)
        return ~self.padding_mask

    def replace(self, **changes: Any) -> EncoderOutput:
        """A copy with some fields replaced."""
        return dataclasses.replace(self, **changes)


class ModalityEncoder(nn.Module):
    """Base class of every encoder: ``forward(x, padding_mask=None, ...) -> EncoderOutput``.

    Subclasses set ``dim`` and a default ``modality`` name (the joint embedding space renames an
    encoder to the key it is registered under, so errors name the modality the user knows).
    """

    modality: str = "custom"
    dim: int

    def forward(self, x: Any, padding_mask: Tensor | None = None, **kwargs: Any) -> EncoderOutput:
        raise NotImplementedError

    @property
    def target_dim(self) -> int | None:
        """Size of the continuous per-token regression target (None for discrete modalities)."""
        return None

    def batch_inputs(self, batch: Mapping[str, Any], name: str) -> dict[str, Any]:
        """Keyword arguments of ``forward`` read from a jin-data collate batch for ``name``.

        The default reads ``batch[name]`` and ``batch[f"{name}_padding_mask"]`` when present;
        encoders whose batch layout differs (sizes, lengths, raw bytes) override this.
        """
        inputs: dict[str, Any] = {"x": batch[name]}
        if f"{name}_padding_mask" in batch:
            inputs["padding_mask"] = batch[f"{name}_padding_mask"]
        return inputs

    # -- shared tails and checks ------------------------------------------------------------

    def _error(self, what: str, expected: str, received: object) -> EncoderInputError:
        return EncoderInputError(
            f"{self.modality}: {what}: expected {expected}, received {received}"
        )

    def _check_finite(self, x: Tensor, what: str = "input") -> None:
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            bad = (~torch.isfinite(x)).nonzero()[0].tolist()
            raise self._error(what, "finite values", f"NaN/Inf at index {tuple(bad)}")

    def _check_mask(self, mask: Tensor | None, shape: tuple[int, ...], what: str) -> None:
        if mask is None:
            return
        if tuple(mask.shape) != shape or mask.dtype != torch.bool:
            raise self._error(
                what, f"bool tensor of shape {shape}", f"{mask.dtype} of shape {tuple(mask.shape)}"
            )

    def _check_not_empty(
        self, lengths: Tensor, present: Tensor | None, unit: str, why: str = ""
    ) -> None:
        empty = lengths <= 0
        if present is not None:
            empty = empty & present
        if bool(empty.any()):
            rows = empty.nonzero().flatten().tolist()
            raise self._error(f"batch rows {rows}", f"at least one {unit}{why}", f"0 {unit}s")

    def _empty_absent(self, x: Any, present: Tensor | None) -> EncoderOutput | None:
        """All padding, one token per row, for a batch in which no row has this modality and the
        input holds nothing: jin-data's collate then gives the modality empty columns (``(B,C,0,0)``
        images, ``(B,0)`` audio, ``(B,0,F)`` points), which no stem can read. None otherwise."""
        if (
            present is None
            or not isinstance(x, Tensor)
            or x.ndim < 2
            or x.shape[0] == 0
            or x.numel()
            or tuple(present.shape) != (x.shape[0],)
            or bool(present.to(torch.bool).any())
        ):
            return None
        weight = next(self.parameters(), None)
        dtype = torch.get_default_dtype() if weight is None else weight.dtype
        tokens = torch.zeros(x.shape[0], 1, self.dim, dtype=dtype, device=x.device)
        return self._finish(tokens, tokens, None, present.to(x.device))

    def _finish(
        self,
        tokens: Tensor,
        pos: Tensor,
        padding_mask: Tensor | None,
        present: Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> EncoderOutput:
        """Mark absent samples as padding, zero padded tokens and positions, drop an empty mask."""
        if present is not None:
            absent = ~present.to(torch.bool)[:, None].expand(tokens.shape[:2])
            padding_mask = absent if padding_mask is None else padding_mask | absent
        if padding_mask is not None:
            if not bool(padding_mask.any()):
                padding_mask = None
            else:
                keep = (~padding_mask)[..., None].to(tokens.dtype)
                tokens, pos = tokens * keep, pos * keep
        return EncoderOutput(tokens=tokens, padding_mask=padding_mask, pos=pos, grid=grid)


def sinusoidal_positions(length: int, dim: int, device: torch.device | None = None) -> Tensor:
    """``(length, dim)`` fixed sine/cosine positions (Vaswani et al. 2017), for any length.

    Used where a sequence has no maximum length (audio of any duration, custom sequences), as
    Whisper's encoder does, so no learned table has to be extrapolated.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float32) / max(half, 1)
    )
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * freqs[None, :]
    table = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if dim % 2:
        table = torch.cat([table, torch.zeros(length, 1, device=device)], dim=-1)
    return table
