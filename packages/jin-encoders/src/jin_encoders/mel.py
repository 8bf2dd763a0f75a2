"""Whisper's log-mel spectrogram in pure PyTorch, per sample, for padded batches.

Parameters as Whisper (Radford et al. 2022): 16 kHz, 25 ms Hann window (n_fft 400), 10 ms hop
(160), 80 Slaney-normalised mel bins, log10 clamped to 8 decades below the maximum, then
``(x + 4) / 4``. Two things differ from calling ``torch.stft`` on the padded batch, both so a
sample's frames do not depend on what it is batched with:

- ``center=True`` reflect padding is applied at each sample's *own* end (frames are gathered with
  per-sample reflected indices), not at the end of the padded batch;
- the dynamic-range clamp uses each sample's own maximum over its valid frames, where Whisper's
  reference code takes the maximum of the whole tensor.

A sample of ``L`` samples gives ``L // hop`` frames (``torch.stft``'s ``1 + L // hop`` minus the
last, which Whisper drops). Frames past a sample's length are zero, which is what the convolutional
stem's zero padding would see if the sample were alone.

Shape legend: B batch, S samples, T frames, M mel bins.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["LogMelSpectrogram", "mel_filterbank"]


def _hz_to_mel(hz: Tensor) -> Tensor:
    # Slaney's scale: linear below 1 kHz, logarithmic above (librosa's default, used by Whisper).
    log_step = math.log(6.4) / 27.0
    return torch.where(hz < 1000.0, 3.0 * hz / 200.0, 15.0 + torch.log(hz / 1000.0) / log_step)


def _mel_to_hz(mel: Tensor) -> Tensor:
    log_step = math.log(6.4) / 27.0
    return torch.where(mel < 15.0, 200.0 * mel / 3.0, 1000.0 * torch.exp(log_step * (mel - 15.0)))


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None
) -> Tensor:
    """``(n_mels, n_fft // 2 + 1)`` float64 Slaney-scale triangular filters, area-normalised."""
    f_max = sample_rate / 2.0 if f_max is None else f_max
    fft_freqs = torch.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1, dtype=torch.float64)
    mel_edges = torch.linspace(
        float(_hz_to_mel(torch.tensor(f_min, dtype=torch.float64))),
        float(_hz_to_mel(torch.tensor(f_max, dtype=torch.float64))),
        n_mels + 2,
        dtype=torch.float64,
    )
    hz_edges = _mel_to_hz(mel_edges)
    lower, centre, upper = hz_edges[:-2, None], hz_edges[1:-1, None], hz_edges[2:, None]
    rising = (fft_freqs[None, :] - lower) / (centre - lower)
    falling = (upper - fft_freqs[None, :]) / (upper - centre)
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return weights * (2.0 / (upper - lower))


class LogMelSpectrogram(nn.Module):
    """Waveforms ``(B,S)`` with ``lengths (B,)`` to log-mel frames ``(B,T,M)`` and a frame mask."""

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 400,
        hop_length: int = 160,
        n_mels: int = 80,
    ) -> None:
        super().__init__()
        self.sample_rate = sample_rate
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.n_mels = n_mels
        # Constants, not buffers: out of the state_dict, and never cast by ``module.to(bfloat16)``
        # (the spectrogram is always float32; the stem after it runs in the model's dtype).
        self._constants: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _window_and_filters(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._constants:
            window = torch.hann_window(self.n_fft, periodic=True, device=device)
            filters = mel_filterbank(self.sample_rate, self.n_fft, self.n_mels)
            self._constants[device] = (window, filters.to(device=device, dtype=torch.float32))
        return self._constants[device]

    def num_frames(self, lengths: Tensor) -> Tensor:
        """Frames produced for waveforms of ``lengths`` samples."""
        return torch.div(lengths, self.hop_length, rounding_mode="floor")

    def forward(self, waveform: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Return ``(log_mel (B,T,M) float32, padding_mask (B,T) bool True at padding)``."""
        batch, samples = waveform.shape
        device = waveform.device
        if lengths is None:
            lengths = torch.full((batch,), samples, device=device, dtype=torch.long)
        lengths = lengths.to(device=device, dtype=torch.long)
        frames_per_sample = self.num_frames(lengths)
        num_frames = int(frames_per_sample.max()) if batch else 0
        if num_frames == 0:  # every waveform shorter than one hop: no frame (and no FFT to run)
            empty = torch.zeros(batch, 0, self.n_mels, device=device)
            return empty, torch.ones(batch, 0, dtype=torch.bool, device=device)
        starts = torch.arange(num_frames, device=device) * self.hop_length - self.n_fft // 2
        index = starts[:, None] + torch.arange(self.n_fft, device=device)[None, :]  # (T, n_fft)
        index = self._reflect(index[None], lengths.clamp(min=1)[:, None, None])
        frames = waveform.float().gather(1, index.reshape(batch, -1))
        window, filters = self._window_and_filters(device)
        frames = frames.reshape(batch, num_frames, self.n_fft) * window
        power = torch.fft.rfft(frames, dim=-1).abs().square()
        mel = power @ filters.T
        log_mel = torch.clamp(mel, min=1e-10).log10()
        padding_mask = (
            torch.arange(num_frames, device=device)[None, :] >= frames_per_sample[:, None]
        )
        # Whisper clamps to 8 decades (80 dB) below the peak; the peak is each sample's own.
        peak = log_mel.masked_fill(padding_mask[..., None], float("-inf")).amax(dim=(1, 2))
        log_mel = torch.maximum(log_mel, peak[:, None, None] - 8.0)
        log_mel = (log_mel + 4.0) / 4.0
        return log_mel.masked_fill(padding_mask[..., None], 0.0), padding_mask

    @staticmethod
    def _reflect(index: Tensor, length: Tensor) -> Tensor:
        """Reflect indices into ``[0, length)`` without repeating the edge (numpy's "reflect")."""
        period = torch.clamp(2 * (length - 1), min=1)
        folded = torch.remainder(index, period)
        return torch.where(folded < length, folded, period - folded)
