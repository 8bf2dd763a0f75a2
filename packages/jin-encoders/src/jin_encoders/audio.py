"""Audio encoder (paper §3.3, ZIP-0408 "Whisper-derived encoder"): log-mel, conv stem, positions.

Waveforms ``(B,S)`` at 16 kHz with ``lengths`` (jin-data's ``audio_lengths``) go through the
per-sample log-mel of ``mel.py``; precomputed mels ``(B,T,80)`` with a frame padding mask are taken
as they are, as in the paper's listing. Whisper's stem follows: two 1-D convolutions of kernel 3,
the second with stride 2, each followed by GELU, then fixed sinusoidal positions so any duration
has positions. Between the convolutions the outputs at padded frames are zeroed again: GELU(bias)
is not zero, and the second convolution at a sample's last frame would otherwise read it instead
of the zero padding it sees when the sample is alone.

Shape legend: B batch, S samples, T frames or tokens, M mel bins, D width.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from jin_encoders._config import StrictConfig
from jin_encoders.base import EncoderOutput, ModalityEncoder, sinusoidal_positions
from jin_encoders.mel import LogMelSpectrogram
from jin_encoders.resample import resample

__all__ = ["AudioEncoder", "AudioEncoderConfig"]


class AudioEncoderConfig(StrictConfig):
    """Audio encoder: width and the log-mel front-end (defaults are Whisper's)."""

    dim: int = Field(gt=0)
    sample_rate: int = Field(default=16000, gt=0)
    n_fft: int = Field(default=400, gt=0)
    hop_length: int = Field(default=160, gt=0)
    n_mels: int = Field(default=80, gt=0)


class AudioEncoder(ModalityEncoder):
    """Log-mel front-end, Whisper's two-convolution stem (second stride 2), sinusoidal positions."""

    modality = "audio"

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.dim = config.dim
        self.n_mels = config.n_mels
        self.log_mel = LogMelSpectrogram(
            config.sample_rate, config.n_fft, config.hop_length, config.n_mels
        )
        self.conv1 = nn.Conv1d(config.n_mels, config.dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(config.dim, config.dim, kernel_size=3, stride=2, padding=1)

    @property
    def target_dim(self) -> int:
        """Each token covers two mel frames (the stride-2 stem): ``2 * n_mels`` targets."""
        return 2 * self.n_mels

    def mel_frames(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        lengths: Tensor | None = None,
        sample_rate: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Waveforms or precomputed mels to ``(mel (B,T,M), frame padding_mask (B,T))``.

        Args:
            x: ``(B,S)`` float waveform, ``(B,S)`` int16 PCM (full scale 32768, as jin-data's
                ``audio_dtype="int16"``), or ``(B,T,M)`` float log-mel frames.
            padding_mask: ``(B,S)`` or ``(B,T)`` bool, True at padding (alternative to lengths).
            lengths: ``(B,)`` valid samples (waveform) or frames (mels) per row.
            sample_rate: the waveform's rate; resampled to the config's when it differs.
        """
        if isinstance(x, Tensor) and x.ndim == 2 and x.dtype == torch.int16:
            x = x.float() / 32768.0
        if not isinstance(x, Tensor) or x.ndim not in (2, 3) or not x.is_floating_point():
            received = type(x).__name__
            if isinstance(x, Tensor):
                received = f"{x.dtype} of shape {tuple(x.shape)}"
            raise self._error(
                "input",
                f"(B,S) float or int16 waveform or (B,T,{self.n_mels}) float mel frames",
                received,
            )
        if x.ndim == 3 and x.shape[-1] != self.n_mels:
            raise self._error("mel frames", f"(B,T,{self.n_mels})", tuple(x.shape))
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise self._error("input", "at least one row and one sample/frame", tuple(x.shape))
        self._check_finite(x)
        self._check_mask(padding_mask, tuple(x.shape[:2]), "padding_mask")
        batch, steps = x.shape[:2]
        if lengths is None:
            lengths = (
                (~padding_mask).sum(dim=1)
                if padding_mask is not None
                else torch.full((batch,), steps, device=x.device)
            )
        if tuple(lengths.shape) != (batch,) or bool(((lengths < 0) | (lengths > steps)).any()):
            raise self._error(
                "lengths", f"shape ({batch},) with values in [0, {steps}]", lengths.tolist()
            )
        lengths = lengths.to(device=x.device, dtype=torch.long)
        if x.ndim == 3:
            frame_mask = torch.arange(steps, device=x.device)[None, :] >= lengths[:, None]
            return x.masked_fill(frame_mask[..., None], 0.0), frame_mask
        rate = self.config.sample_rate if sample_rate is None else int(sample_rate)
        if rate != self.config.sample_rate:
            x, lengths = resample(x, rate, self.config.sample_rate, lengths)
        return self.log_mel(x, lengths)

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        lengths: Tensor | None = None,
        sample_rate: int | None = None,
        present: Tensor | None = None,
    ) -> EncoderOutput:
        """Encode audio; arguments as ``mel_frames``, plus ``present (B,)`` for absent samples
        (with none present ``x`` may be ``(B, 0)``, giving one padded token a row)."""
        if (empty := self._empty_absent(x, present)) is not None:
            return empty  # no row has audio: (B, 0) from jin-data's collate
        mel, frame_mask = self.mel_frames(x, padding_mask, lengths, sample_rate)
        frames = (~frame_mask).sum(dim=1)
        # One hop at the config's rate; at another rate the shortest input resampling to it.
        rate, own_rate = int(sample_rate or self.config.sample_rate), self.config.sample_rate
        shortest = (self.config.hop_length - 1) * rate // own_rate + 1
        why = f" (a waveform of >= {shortest} samples at {rate} Hz)"
        self._check_not_empty(frames, present, "mel frame", why)
        if mel.shape[1] == 0:  # every row absent: one padded frame keeps the stem's shapes valid
            mel, frame_mask = F.pad(mel, (0, 0, 0, 1)), F.pad(frame_mask, (0, 1), value=True)
        mel = mel.to(self.conv1.weight.dtype)
        keep = (~frame_mask)[:, None, :].to(mel.dtype)  # (B, 1, T)
        hidden = F.gelu(self.conv1(mel.transpose(1, 2) * keep)) * keep
        hidden = F.gelu(self.conv2(hidden)).transpose(1, 2)  # (B, ceil(T/2), D)
        length = hidden.shape[1]
        token_mask = torch.arange(length, device=x.device)[None, :] >= (frames[:, None] + 1) // 2
        pos = sinusoidal_positions(length, self.dim, x.device).to(hidden.dtype)
        pos = pos[None].expand(hidden.shape[0], -1, -1)
        return self._finish(hidden + pos, pos, token_mask, present)

    def regression_targets(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        lengths: Tensor | None = None,
        sample_rate: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Per-token targets ``(B,T,2*M)``: the two mel frames each token covers (zero-padded)."""
        mel, frame_mask = self.mel_frames(x, padding_mask, lengths, sample_rate)
        batch, steps, mels = mel.shape
        mel = F.pad(mel, (0, 0, 0, steps % 2))
        frames = (~frame_mask).sum(dim=1)
        targets = mel.reshape(batch, -1, 2 * mels)
        token_mask = (
            torch.arange(targets.shape[1], device=mel.device)[None, :] >= (frames[:, None] + 1) // 2
        )
        return targets, (token_mask if bool(token_mask.any()) else None)

    def batch_inputs(self, batch: Mapping[str, Any], name: str) -> dict[str, Any]:
        """Read ``batch[name]``, ``<name>_lengths`` and ``<name>_sample_rate`` when present."""
        inputs = super().batch_inputs(batch, name)
        if f"{name}_lengths" in batch:
            inputs["lengths"] = batch[f"{name}_lengths"]
        if f"{name}_sample_rate" in batch:
            inputs["sample_rate"] = int(batch[f"{name}_sample_rate"])
        return inputs
