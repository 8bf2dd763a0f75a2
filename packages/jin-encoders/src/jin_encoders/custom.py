"""The paper's ``CustomModalityEncoder`` (§3.6): a linear projection from any feature size.

A ``(B,F)`` vector becomes one token; a ``(B,T,F)`` sequence becomes ``T`` tokens with fixed
sinusoidal positions (no learned table, so a runtime-added modality trains only its projection and
any sequence length works). This is how new modalities (proprioception, sensor vectors) are added
with ``JointEmbeddingSpace.add_modality``.

Shape legend: B batch, T tokens, F features, D width.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from jin_encoders._config import StrictConfig
from jin_encoders.base import EncoderOutput, ModalityEncoder, sinusoidal_positions

__all__ = ["CustomEncoderConfig", "CustomModalityEncoder"]


class CustomEncoderConfig(StrictConfig):
    """Projection from ``input_dim`` features per token to width ``dim``."""

    dim: int = Field(gt=0)
    input_dim: int = Field(gt=0)


class CustomModalityEncoder(ModalityEncoder):
    """``nn.Linear(input_dim, dim)`` per token, plus sinusoidal positions for sequences."""

    modality = "custom"

    def __init__(self, config: CustomEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.dim = config.dim
        self.proj = nn.Linear(config.input_dim, config.dim)

    @property
    def target_dim(self) -> int:
        """A regression head reconstructs the ``input_dim`` features of each token."""
        return self.config.input_dim

    def forward(
        self, x: Tensor, padding_mask: Tensor | None = None, present: Tensor | None = None
    ) -> EncoderOutput:
        """Encode ``(B,F)`` vectors (one token each) or ``(B,T,F)`` sequences (``(B,T)`` mask)."""
        features = self.config.input_dim
        if (
            not isinstance(x, Tensor)
            or x.ndim not in (2, 3)
            or x.shape[-1] != features
            or not x.is_floating_point()
        ):
            received = (
                f"{x.dtype} of shape {tuple(x.shape)}"
                if isinstance(x, Tensor)
                else type(x).__name__
            )
            raise self._error(
                "features", f"(B,{features}) or (B,T,{features}) float tensor", received
            )
        if x.ndim == 2:
            if padding_mask is not None:
                raise self._error("padding_mask", "None for (B,F) input", "a tensor")
            x = x[:, None]
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise self._error("features", "at least one row and one token", tuple(x.shape))
        self._check_finite(x, "features")
        self._check_mask(padding_mask, tuple(x.shape[:2]), "padding_mask")
        if padding_mask is not None:
            self._check_not_empty((~padding_mask).sum(dim=1), present, "token")
        tokens = self.proj(x.to(self.proj.weight.dtype))
        pos = sinusoidal_positions(x.shape[1], self.dim, x.device).to(tokens.dtype)
        pos = pos[None].expand(x.shape[0], -1, -1)
        return self._finish(tokens + pos, pos, padding_mask, present)
