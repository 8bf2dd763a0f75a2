"""The JEPA predictor g_φ of Eq. 1: a narrow transformer from context tokens to target embeddings.

I-JEPA §3: the predictor takes the context encoder's output plus one *mask token* per target,
each carrying the positional embedding of the token it stands for, and predicts the target
encoder's embedding at that position. It is narrower than the encoder (I-JEPA: 384 wide for a
ViT-H) so the representation, not the predictor, has to do the work; it projects into its own
width and back out to the encoder width ``D``.

Shapes: B batch, Nc context tokens, Nt target tokens, D encoder width, P predictor width.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from jin_zjepa._config import StrictConfig

__all__ = ["Predictor", "PredictorConfig"]


class PredictorConfig(StrictConfig):
    """Size of a predictor; ``embed_dim`` is the width ``D`` of the tokens it reads and predicts."""

    embed_dim: int = Field(..., ge=1)
    predictor_dim: int = Field(384, ge=1)
    depth: int = Field(6, ge=1)
    num_heads: int = Field(6, ge=1)
    mlp_ratio: float = Field(4.0, gt=0.0)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> PredictorConfig:
        if self.predictor_dim % self.num_heads:
            raise ValueError(
                f"predictor_dim ({self.predictor_dim}) must be divisible by num_heads "
                f"({self.num_heads})"
            )
        return self


class Predictor(nn.Module):
    """Predicts target embeddings ``(B, Nt, D)`` from context tokens and target positions."""

    def __init__(self, config: PredictorConfig) -> None:
        super().__init__()
        self.config = config
        d, p = config.embed_dim, config.predictor_dim
        self.context_embed = nn.Linear(d, p)
        # Positions live in the encoder's width D (EncoderOutput.pos); one projection serves the
        # context positions and the mask tokens' positions so both land in the same space.
        self.pos_embed = nn.Linear(d, p)
        self.mask_token = nn.Parameter(torch.zeros(p))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=p,
                nhead=config.num_heads,
                dim_feedforward=round(p * config.mlp_ratio),
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(p)
        self.proj_out = nn.Linear(p, d)
        self._init_weights()

    def _init_weights(self) -> None:
        # I-JEPA / ViT initialisation: truncated normal (std 0.02) weights, zero biases.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(
        self,
        context: Tensor,
        context_padding_mask: Tensor | None,
        target_pos: Tensor,
        target_padding_mask: Tensor | None = None,
        context_pos: Tensor | None = None,
    ) -> Tensor:
        """Predict the target embeddings.

        Args:
            context: ``(B, Nc, D)`` online hidden states of the context tokens.
            context_padding_mask: ``(B, Nc)`` bool, True at padding, or None.
            target_pos: ``(B, Nt, D)`` positional embeddings of the targets (gathered from the
                encoder's ``pos`` at ``target_idx``).
            target_padding_mask: ``(B, Nt)`` bool, True at padding, or None. Padded targets are
                not attended to; their outputs are meaningless and must be masked in the loss.
            context_pos: ``(B, Nc, D)`` positions of the context tokens, re-added as I-JEPA's
                predictor does, since deep backbones may wash positions out; None to skip.

        Returns:
            ``(B, Nt, D)`` predicted target embeddings.
        """
        b, nc, d = self._check(context, "context", None, None)
        _, nt, _ = self._check(target_pos, "target_pos", b, d)
        if context_pos is not None:
            self._check(context_pos, "context_pos", b, d, length=nc)
        x_ctx = self.context_embed(context)
        if context_pos is not None:
            x_ctx = x_ctx + self.pos_embed(context_pos)
        x_tgt = self.mask_token + self.pos_embed(target_pos)
        x = torch.cat([x_ctx, x_tgt], dim=1)
        padding = self._joint_padding(context_padding_mask, target_padding_mask, b, nc, nt, x)
        for block in self.blocks:
            x = block(x, src_key_padding_mask=padding)
        return self.proj_out(self.norm(x[:, nc:]))

    @staticmethod
    def _check(
        x: Tensor, name: str, batch: int | None, width: int | None, length: int | None = None
    ) -> tuple[int, int, int]:
        ok = x.dim() == 3 and (batch is None or x.shape[0] == batch)
        ok = (
            ok
            and (width is None or x.shape[2] == width)
            and (length is None or x.shape[1] == length)
        )
        if not ok:
            raise ValueError(
                f"Predictor: {name} must be (B={batch or 'B'}, {length or 'N'}, D={width or 'D'}); "
                f"got {tuple(x.shape)}"
            )
        return x.shape[0], x.shape[1], x.shape[2]

    @staticmethod
    def _joint_padding(
        context_mask: Tensor | None, target_mask: Tensor | None, b: int, nc: int, nt: int, x: Tensor
    ) -> Tensor | None:
        if context_mask is None and target_mask is None:
            return None
        masks = []
        for mask, n, name in ((context_mask, nc, "context"), (target_mask, nt, "target")):
            if mask is None:
                mask = torch.zeros(b, n, dtype=torch.bool, device=x.device)
            elif mask.shape != (b, n) or mask.dtype != torch.bool:
                raise ValueError(
                    f"Predictor: {name}_padding_mask must be bool ({b}, {n}); got "
                    f"{mask.dtype} {tuple(mask.shape)}"
                )
            masks.append(mask)
        return torch.cat(masks, dim=1)
