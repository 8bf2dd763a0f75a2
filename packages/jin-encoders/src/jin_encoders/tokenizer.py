"""Byte-level tokenizer: UTF-8 bytes plus a few special tokens, so any Unicode string round-trips.

No vocabulary file, no merges: a token is a byte shifted past the special ids. It has two entry
points, ``encode(list[str])`` for users and ``from_bytes(bytes_BT, padding_mask)`` for jin-data's
collate output (``text_bytes`` uint8 plus ``text_padding_mask``), which maps a whole padded batch of
raw bytes to ids without a Python loop.

Shape legend: B batch, T tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from jin_encoders.base import EncoderInputError

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    """UTF-8 bytes offset by ``NUM_SPECIAL`` special ids (pad, bos, eos, mask).

    Args:
        max_len: longest id sequence produced, special tokens included.
        truncation: ``"truncate"`` cuts over-long input (at a byte, so a multi-byte character at the
            cut decodes to U+FFFD); ``"error"`` raises ``EncoderInputError`` naming the row.
        add_bos: prepend ``BOS``.
        add_eos: append ``EOS``.
        modality: name used in error messages.
    """

    PAD = 0
    BOS = 1
    EOS = 2
    MASK = 3
    NUM_SPECIAL = 4
    VOCAB_SIZE = NUM_SPECIAL + 256

    def __init__(
        self,
        max_len: int = 512,
        truncation: Literal["truncate", "error"] = "truncate",
        add_bos: bool = True,
        add_eos: bool = True,
        modality: str = "text",
    ) -> None:
        if max_len < 1 + int(add_bos) + int(add_eos):
            raise ValueError(f"max_len: expected room for one byte and the specials, got {max_len}")
        if truncation not in ("truncate", "error"):
            raise ValueError(f"truncation: expected 'truncate' or 'error', got {truncation!r}")
        self.max_len = max_len
        self.truncation = truncation
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.modality = modality

    @property
    def vocab_size(self) -> int:
        """Number of ids (specials plus 256 bytes)."""
        return self.VOCAB_SIZE

    @property
    def max_content(self) -> int:
        """Most bytes per sequence once the special tokens are counted."""
        return self.max_len - int(self.add_bos) - int(self.add_eos)

    def encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Encode strings to ``(ids (B,T) int64, padding_mask (B,T) bool True at padding)``."""
        if isinstance(texts, str):
            raise EncoderInputError(f"{self.modality}: texts: expected a list of str, received str")
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise EncoderInputError(
                    f"{self.modality}: texts: expected a list of str, received "
                    f"{type(text).__name__} at index {row}"
                )
        if len(texts) == 0:
            raise EncoderInputError(f"{self.modality}: texts: expected at least one string, got 0")
        encoded = [t.encode("utf-8") for t in texts]
        width = max(1, max(len(b) for b in encoded))
        bytes_BT = torch.zeros(len(encoded), width, dtype=torch.uint8)
        padding_mask = torch.ones(len(encoded), width, dtype=torch.bool)
        for row, raw in enumerate(encoded):
            if raw:
                bytes_BT[row, : len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
                padding_mask[row, : len(raw)] = False
        return self.from_bytes(bytes_BT, padding_mask)

    def from_bytes(
        self, bytes_BT: Tensor, padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Map a padded batch of raw UTF-8 bytes (uint8, valid bytes first) to ids and a mask.

        Returns ``(ids (B,T') int64, padding_mask (B,T') bool)`` with ``T' <= max_len``: the
        special tokens are inserted and over-long rows truncated (or rejected) as configured.
        """
        if bytes_BT.ndim != 2 or bytes_BT.dtype != torch.uint8:
            raise EncoderInputError(
                f"{self.modality}: bytes: expected uint8 tensor of shape (B,T), received "
                f"{bytes_BT.dtype} of shape {tuple(bytes_BT.shape)}"
            )
        batch, width = bytes_BT.shape
        device = bytes_BT.device
        if padding_mask is None:
            padding_mask = torch.zeros(batch, width, dtype=torch.bool, device=device)
        if tuple(padding_mask.shape) != (batch, width) or padding_mask.dtype != torch.bool:
            raise EncoderInputError(
                f"{self.modality}: padding_mask: expected bool tensor of shape {(batch, width)}, "
                f"received {padding_mask.dtype} of shape {tuple(padding_mask.shape)}"
            )
        if width > 1 and bool((padding_mask[:, :-1] & ~padding_mask[:, 1:]).any()):
            raise EncoderInputError(
                f"{self.modality}: padding_mask: expected padding only after the valid bytes "
                "(right padding), received a row with a valid byte after padding"
            )
        lengths = (~padding_mask).sum(dim=1)
        too_long = lengths > self.max_content
        if self.truncation == "error" and bool(too_long.any()):
            rows = too_long.nonzero().flatten().tolist()
            raise EncoderInputError(
                f"{self.modality}: rows {rows}: expected at most {self.max_content} bytes "
                f"(max_len {self.max_len} with special tokens), received "
                f"{lengths[too_long].tolist()}"
            )
        lengths = lengths.clamp(max=self.max_content)
        content = min(width, self.max_content)
        start = int(self.add_bos)
        out_len = start + int(lengths.max()) + int(self.add_eos) if batch else start
        ids = torch.full((batch, out_len), self.PAD, dtype=torch.long, device=device)
        positions = torch.arange(content, device=device)
        body = torch.where(
            positions[None, :] < lengths[:, None],
            bytes_BT[:, :content].long() + self.NUM_SPECIAL,
            torch.full_like(positions, self.PAD)[None, :],
        )
        span = min(content, out_len - start)
        ids[:, start : start + span] = body[:, :span]
        if self.add_bos:
            ids[:, 0] = self.BOS
        if self.add_eos:
            ids.scatter_(1, (lengths + start)[:, None], self.EOS)
        total = lengths + start + int(self.add_eos)
        out_mask = torch.arange(out_len, device=device)[None, :] >= total[:, None]
        return ids, out_mask

    def decode(self, ids: Tensor, padding_mask: Tensor | None = None) -> list[str]:
        """Ids ``(B,T)`` back to strings; special tokens and padding are dropped."""
        if ids.ndim == 1:
            ids = ids[None]
            padding_mask = None if padding_mask is None else padding_mask[None]
        texts = []
        for row in range(ids.shape[0]):
            keep = ids[row] >= self.NUM_SPECIAL
            if padding_mask is not None:
                keep &= ~padding_mask[row]
            raw = (ids[row][keep] - self.NUM_SPECIAL).to(torch.uint8).cpu().numpy().tobytes()
            texts.append(raw.decode("utf-8", errors="replace"))
        return texts
