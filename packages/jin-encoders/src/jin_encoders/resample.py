"""Band-limited resampling of padded waveform batches in PyTorch (windowed-sinc, polyphase).

The ratio is reduced by the gcd to ``new/orig``; each of the ``new`` output phases is one FIR filter
(a Hann-windowed sinc with cut-off ``rolloff * min(orig, new) / 2``), applied to the whole batch as
one strided ``conv1d``. Samples past each waveform's length are zeroed first, so a waveform
resamples the same alone or batched with longer ones.

Shape legend: B batch, S samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["resample", "resampled_length"]


def resampled_length(lengths: Tensor, orig_sr: int, new_sr: int) -> Tensor:
    """Output lengths ``ceil(L * new / orig)`` for input lengths ``L``."""
    return torch.div(lengths * new_sr + orig_sr - 1, orig_sr, rounding_mode="floor")


def _sinc_kernels(
    orig: int, new: int, zero_crossings: int, rolloff: float, dtype: torch.dtype
) -> tuple[Tensor, int]:
    cutoff = min(orig, new) * rolloff
    half_width = math.ceil(zero_crossings * orig / cutoff)
    taps = torch.arange(-half_width, half_width + orig, dtype=torch.float64) / orig
    phases = -torch.arange(new, dtype=torch.float64)[:, None] / new
    t = (phases + taps[None, :]) * cutoff
    t = t.clamp(-zero_crossings, zero_crossings)
    window = torch.cos(t * math.pi / zero_crossings / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, 1.0, t))
    kernels = sinc * window * (cutoff / orig)
    return kernels.to(dtype)[:, None, :], half_width


def resample(
    waveform: Tensor,
    orig_sr: int,
    new_sr: int,
    lengths: Tensor | None = None,
    zero_crossings: int = 6,
    rolloff: float = 0.99,
) -> tuple[Tensor, Tensor]:
    """Resample ``(B,S)`` or ``(S,)`` waveforms from ``orig_sr`` to ``new_sr`` Hz.

    Returns ``(waveform (B,S'), lengths (B,))`` (a 1-D input gives a 1-D output); ``S'`` is the
    longest resampled length and samples past each new length are zero.
    """
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates: expected positive values, received {orig_sr}, {new_sr}")
    squeeze = waveform.ndim == 1
    batch_BS = waveform[None] if squeeze else waveform
    batch, samples = batch_BS.shape
    if lengths is None:
        lengths = torch.full((batch,), samples, dtype=torch.long, device=waveform.device)
    lengths = lengths.to(device=waveform.device, dtype=torch.long)
    valid = torch.arange(samples, device=waveform.device)[None, :] < lengths[:, None]
    batch_BS = batch_BS.float().masked_fill(~valid, 0.0)  # not `* valid`: 0 * NaN is NaN
    if orig_sr == new_sr:
        out, new_lengths = batch_BS, lengths
    else:
        gcd = math.gcd(orig_sr, new_sr)
        orig, new = orig_sr // gcd, new_sr // gcd
        kernels, half_width = _sinc_kernels(orig, new, zero_crossings, rolloff, batch_BS.dtype)
        padded = F.pad(batch_BS, (half_width, half_width + orig))[:, None]
        phases = F.conv1d(padded, kernels.to(padded.device), stride=orig)  # (B, new, frames)
        out = phases.transpose(1, 2).reshape(batch, -1)
        new_lengths = resampled_length(lengths, orig_sr, new_sr)
        width = int(resampled_length(torch.tensor(samples), orig_sr, new_sr))
        out = out[:, :width]
        out = out * (torch.arange(width, device=out.device)[None, :] < new_lengths[:, None])
    return (out[0], new_lengths) if squeeze else (out, new_lengths)
