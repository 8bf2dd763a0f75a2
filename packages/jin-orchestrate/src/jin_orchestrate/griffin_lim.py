"""Log-mel frames back to a waveform: inverse mel filterbank, then Griffin-Lim phase recovery.

# B batch, T frames, M mel bins, F frequency bins (n_fft // 2 + 1), S samples

The audio generator produces the normalised Whisper log-mel of `jin_encoders.LogMelSpectrogram`
(``(log10(mel) + 4) / 4``, power spectrogram, Hann window, ``center=True``), so inversion undoes
each step: the normalisation, the mel projection (least squares through the filterbank's
pseudo-inverse, clamped at zero: the filterbank has fewer rows than columns, so this is the
minimum-norm power spectrum with those mel energies), the power (a square root), and finally the
phase, which the mel never had, by Griffin & Lim (1984) with the momentum of Perraudin et al.
(2013, "fast Griffin-Lim"): alternate between the target magnitude and a consistent STFT.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from jin_encoders.mel import mel_filterbank

__all__ = [
    "griffin_lim",
    "log_mel_ceiling",
    "mel_to_magnitude",
    "mel_to_waveform",
    "spectral_convergence",
]


def mel_to_magnitude(log_mel_BTM: Tensor, sample_rate: int = 16000, n_fft: int = 400) -> Tensor:
    """Normalised log-mel ``(B, T, M)`` to an STFT magnitude estimate ``(B, F, T)``.

    Values above `log_mel_ceiling` (what no waveform in [-1, 1] reaches; a diffusion sample can
    stray there) are clamped to it, so the magnitude stays finite instead of overflowing float32
    into an inf/NaN waveform.
    """
    filters_MF = mel_filterbank(sample_rate, n_fft, log_mel_BTM.shape[-1])
    ceiling = log_mel_ceiling(filters_MF, n_fft)
    mel_power = torch.pow(10.0, log_mel_BTM.double().clamp(max=ceiling) * 4.0 - 4.0)
    filters_MF = filters_MF.to(mel_power.device)
    power_BTF = (mel_power @ torch.linalg.pinv(filters_MF).T).clamp(min=0.0)
    return power_BTF.sqrt().transpose(1, 2).float()


def log_mel_ceiling(filters_MF: Tensor, n_fft: int) -> float:
    """The largest normalised log-mel a waveform in [-1, 1] can have: a Hann-windowed STFT bin
    has power at most ``(n_fft / 2) ** 2`` (the window's sum, squared), so no mel energy exceeds
    that times the filterbank's largest row sum."""
    peak = float(filters_MF.sum(dim=1).max()) * (n_fft / 2) ** 2
    return (math.log10(peak) + 4.0) / 4.0


def griffin_lim(
    magnitude_BFT: Tensor,
    *,
    n_fft: int = 400,
    hop_length: int = 160,
    iterations: int = 64,
    momentum: float = 0.99,
    length: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A waveform ``(B, S)`` whose STFT magnitude approximates ``magnitude_BFT``.

    Starts from random phase drawn from ``generator`` (so a seed fixes the result) and runs
    ``iterations`` fast Griffin-Lim updates; ``momentum=0`` is the original algorithm.
    """
    if magnitude_BFT.dim() != 3 or magnitude_BFT.shape[1] != n_fft // 2 + 1:
        raise ValueError(
            f"magnitude: expected (B, {n_fft // 2 + 1}, T) for n_fft={n_fft}, "
            f"got {tuple(magnitude_BFT.shape)}"
        )
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum: expected a value in [0, 1), got {momentum}")
    window = torch.hann_window(n_fft, periodic=True, device=magnitude_BFT.device)
    frames = magnitude_BFT.shape[-1]
    length = length or (frames - 1) * hop_length

    def stft(wave_BS: Tensor) -> Tensor:
        return torch.stft(
            wave_BS, n_fft, hop_length, window=window, center=True, return_complex=True
        )

    def istft(spec_BFT: Tensor) -> Tensor:
        return torch.istft(spec_BFT, n_fft, hop_length, window=window, center=True, length=length)

    angles = torch.rand(magnitude_BFT.shape, generator=generator, dtype=torch.float32)
    phase = torch.polar(torch.ones_like(angles), 2 * torch.pi * angles).to(magnitude_BFT.device)
    previous = torch.zeros_like(phase)
    for _ in range(iterations):
        rebuilt = stft(istft(magnitude_BFT * phase))
        accelerated = rebuilt - (momentum / (1 + momentum)) * previous
        previous = rebuilt
        phase = accelerated / accelerated.abs().clamp(min=1e-8)
    return istft(magnitude_BFT * phase)


def mel_to_waveform(
    log_mel_BTM: Tensor,
    *,
    sample_rate: int = 16000,
    n_fft: int = 400,
    hop_length: int = 160,
    iterations: int = 64,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Normalised log-mel frames ``(B, T, M)`` to waveforms ``(B, T * hop_length)`` in [-1, 1].

    `LogMelSpectrogram` drops the STFT's last frame, so ``T`` frames come from ``T * hop``
    samples; the missing frame is repeated from its neighbour before phase recovery.
    """
    magnitude = mel_to_magnitude(log_mel_BTM, sample_rate, n_fft)
    magnitude = torch.cat([magnitude, magnitude[..., -1:]], dim=-1)
    wave = griffin_lim(
        magnitude,
        n_fft=n_fft,
        hop_length=hop_length,
        iterations=iterations,
        length=log_mel_BTM.shape[1] * hop_length,
        generator=generator,
    )
    peak = wave.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8)
    return wave / peak.clamp(min=1.0)


def spectral_convergence(estimate_BFT: Tensor, reference_BFT: Tensor) -> Tensor:
    """``||ref - est||_F / ||ref||_F`` per sample ``(B,)``: 0 is a perfect magnitude match."""
    diff = (reference_BFT - estimate_BFT).flatten(1).norm(dim=-1)
    return diff / reference_BFT.flatten(1).norm(dim=-1).clamp(min=1e-12)
