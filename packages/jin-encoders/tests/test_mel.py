"""Log-mel against a float64 numpy reference written independently here (Whisper's recipe)."""

import numpy as np
import torch

from jin_encoders import LogMelSpectrogram, mel_filterbank

SR, N_FFT, HOP, N_MELS = 16000, 400, 160, 80


def _reference_filters() -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangles (librosa.filters.mel defaults), in float64."""

    def hz_to_mel(hz):
        hz = np.asarray(hz, dtype=np.float64)
        safe = np.maximum(hz, 1e-12)
        return np.where(hz < 1000, hz / (200.0 / 3), 15.0 + np.log(safe / 1000) * 27 / np.log(6.4))

    def mel_to_hz(mel):
        return np.where(mel < 15.0, mel * 200.0 / 3, 1000 * np.exp((mel - 15.0) * np.log(6.4) / 27))

    freqs = np.fft.rfftfreq(N_FFT, 1.0 / SR)
    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(SR / 2), N_MELS + 2))
    filters = np.zeros((N_MELS, freqs.size))
    for i in range(N_MELS):
        up = (freqs - edges[i]) / (edges[i + 1] - edges[i])
        down = (edges[i + 2] - freqs) / (edges[i + 2] - edges[i + 1])
        filters[i] = np.maximum(0.0, np.minimum(up, down)) * 2.0 / (edges[i + 2] - edges[i])
    return filters


def _reference_log_mel(wave: np.ndarray) -> np.ndarray:
    """Whisper's log_mel_spectrogram for one waveform, frame by frame in float64 numpy."""
    padded = np.pad(wave.astype(np.float64), N_FFT // 2, mode="reflect")
    frames = 1 + (padded.size - N_FFT) // HOP
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
    stacked = np.stack([padded[i * HOP : i * HOP + N_FFT] for i in range(frames)]) * window
    power = np.abs(np.fft.rfft(stacked, axis=-1)) ** 2
    power = power[:-1]  # Whisper drops the last frame
    log_spec = np.log10(np.maximum(power @ _reference_filters().T, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def _speechlike(length: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(length) / SR
    f0 = 120 + 40 * np.sin(2 * np.pi * 3 * t)
    voiced = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / SR) / k for k in range(1, 12))
    return 0.3 * voiced * (0.5 + 0.5 * np.sin(2 * np.pi * 2 * t)) + 0.01 * rng.standard_normal(
        length
    )


def test_filterbank_matches_reference():
    np.testing.assert_allclose(
        mel_filterbank(SR, N_FFT, N_MELS).numpy(), _reference_filters(), atol=1e-12
    )


def test_log_mel_matches_float64_reference_to_1e_4_per_sample_in_a_padded_batch():
    lengths = [16000, 4321, 9999, 401]
    waves = [_speechlike(n, seed) for seed, n in enumerate(lengths)]
    batch = torch.zeros(len(waves), max(lengths))
    for row, wave in enumerate(waves):
        batch[row, : wave.size] = torch.from_numpy(wave).float()
    # Junk in the padding must not matter: each sample is reflected at its own end.
    batch[1, lengths[1] :] = 0.7
    mel, mask = LogMelSpectrogram()(batch, torch.tensor(lengths))
    for row, wave in enumerate(waves):
        reference = _reference_log_mel(wave)
        frames = reference.shape[0]
        assert frames == lengths[row] // HOP
        assert int((~mask[row]).sum()) == frames
        np.testing.assert_allclose(mel[row, :frames].double().numpy(), reference, atol=1e-4, rtol=0)
        assert bool((mel[row, frames:] == 0).all())


def test_log_mel_equals_torch_stft_for_an_unpadded_waveform():
    wave = torch.from_numpy(_speechlike(8000, 7)).float()
    spec = torch.stft(wave, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True)
    power = spec[..., :-1].abs() ** 2
    log_spec = (mel_filterbank(SR, N_FFT, N_MELS).float() @ power).clamp(min=1e-10).log10()
    log_spec = (torch.maximum(log_spec, log_spec.max() - 8.0) + 4.0) / 4.0
    mel, _ = LogMelSpectrogram()(wave[None])
    torch.testing.assert_close(mel[0], log_spec.T, atol=1e-4, rtol=0)
