"""Text encoder (paper §3.3): byte token embedding plus learned positional embeddings.

Accepts strings, token ids, or the raw UTF-8 bytes of jin-data's collate (``text_bytes`` uint8 with
``text_padding_mask``); uint8 input is always read as raw bytes, int64 input as token ids.

Shape legend: B batch, T tokens, D width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from jin_encoders._config import StrictConfig
from jin_encoders.base import EncoderOutput, ModalityEncoder
from jin_encoders.tokenizer import ByteTokenizer

__all__ = ["TextEncoder", "TextEncoderConfig"]


class TextEncoderConfig(StrictConfig):
    """Text encoder: width, longest sequence, and what to do with longer input."""

    dim: int = Field(gt=0)
    max_len: int = Field(default=512, ge=3)
    truncation: Literal["truncate", "error"] = "truncate"
    add_bos: bool = True
    add_eos: bool = True


class TextEncoder(ModalityEncoder):
    """Byte-level token embedding plus a learned positional table of ``max_len`` rows."""

    modality = "text"

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.dim = config.dim
        self.tokenizer = ByteTokenizer(
            max_len=config.max_len,
            truncation=config.truncation,
            add_bos=config.add_bos,
            add_eos=config.add_eos,
        )
        self.token_embed = nn.Embedding(self.tokenizer.vocab_size, config.dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.max_len, config.dim))
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    @property
    def vocab_size(self) -> int:
        """Number of token ids (the LM head's output size)."""
        return self.tokenizer.vocab_size

    def tokenize(
        self, x: Tensor | Sequence[str], padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Strings or raw uint8 bytes to ``(ids (B,T), padding_mask)``; int64 ids pass through."""
        self.tokenizer.modality = self.modality
        if not isinstance(x, Tensor):
            # A lone str is refused by the tokenizer; list() would split it into characters.
            ids, mask = self.tokenizer.encode(x if isinstance(x, str) else list(x))
            device = self.token_embed.weight.device
            return ids.to(device), mask.to(device)
        if x.dtype == torch.uint8:
            return self.tokenizer.from_bytes(x, padding_mask)
        if x.dtype != torch.long or x.ndim != 2:
            raise self._error(
                "input",
                "(B,T) int64 ids, (B,T) uint8 bytes or a list of str",
                f"{x.dtype} of shape {tuple(x.shape)}",
            )
        return x, padding_mask

    def forward(
        self,
        x: Tensor | Sequence[str],
        padding_mask: Tensor | None = None,
        present: Tensor | None = None,
    ) -> EncoderOutput:
        """Encode text.

        Args:
            x: ``(B,T)`` int64 ids, ``(B,T)`` uint8 UTF-8 bytes (right-padded), or ``list[str]``.
            padding_mask: ``(B,T)`` bool, True at padding.
            present: ``(B,)`` bool; absent samples become all padding and may be empty.
        """
        ids, padding_mask = self.tokenize(x, padding_mask)
        batch, length = ids.shape
        self._check_mask(padding_mask, (batch, length), "padding_mask")
        if length > self.config.max_len:
            raise self._error("sequence length", f"at most max_len={self.config.max_len}", length)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise self._error(
                "token ids",
                f"values in [0, {self.vocab_size})",
                f"range [{int(ids.min())}, {int(ids.max())}]",
            )
        lengths = torch.full((batch,), length, device=ids.device)
        if padding_mask is not None:
            lengths = (~padding_mask).sum(dim=1)
        self._check_not_empty(lengths, present, "token")
        if length == 0:  # every row absent and no BOS/EOS: one padded token a row
            ids = ids.new_full((batch, 1), ByteTokenizer.PAD)
            padding_mask = torch.ones(batch, 1, dtype=torch.bool, device=ids.device)
            length = 1
        pos = self.pos_embed[:, :length].expand(batch, -1, -1)
        return self._finish(self.token_embed(ids) + pos, pos, padding_mask, present)

    def batch_inputs(self, batch: Mapping[str, Any], name: str) -> dict[str, Any]:
        """Read ``<name>_bytes`` and ``<name>_padding_mask`` (falling back to ``batch[name]``)."""
        if f"{name}_bytes" in batch:
            inputs: dict[str, Any] = {"x": batch[f"{name}_bytes"]}
            if f"{name}_padding_mask" in batch:
                inputs["padding_mask"] = batch[f"{name}_padding_mask"]
            return inputs
        return super().batch_inputs(batch, name)
