"""Audio encoder: padding invariance through log-mel and the conv stem, mels in, any duration."""

import pytest
import torch
from _encoder_helpers import DIM, assert_row_matches

from jin_encoders import AudioEncoder, AudioEncoderConfig, EncoderInputError, resample


@pytest.fixture
def encoder() -> AudioEncoder:
    torch.manual_seed(0)
    return AudioEncoder(AudioEncoderConfig(dim=DIM))


def _batch(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    waves = torch.randn(len(lengths), max(lengths), generator=gen) * 0.2
    return waves, torch.tensor(lengths)


def test_padding_invariance_of_waveforms(encoder):
    # Odd and even frame counts: the stride-2 stem's last token reads one frame past the end.
    waves, lengths = _batch([16000, 3200, 3360, 1000])
    waves[1:, 3360:] = 5.0  # junk in the padding
    batched = encoder(waves, lengths=lengths)
    assert batched.tokens.shape == (4, 50, DIM)
    for row, n in enumerate(lengths.tolist()):
        frames = n // 160
        alone = encoder(waves[row : row + 1, :n].clone())
        assert alone.tokens.shape[1] == (frames + 1) // 2
        assert_row_matches(batched, row, alone)


def test_padding_mask_and_lengths_are_equivalent(encoder):
    waves, lengths = _batch([4000, 2000])
    mask = torch.arange(4000)[None] >= lengths[:, None]
    torch.testing.assert_close(encoder(waves, mask).tokens, encoder(waves, lengths=lengths).tokens)


def test_precomputed_mels_give_the_waveform_tokens(encoder):
    waves, lengths = _batch([4000, 2400])
    mel, frame_mask = encoder.log_mel(waves, lengths)
    from_mel = encoder(mel, frame_mask)
    from_wave = encoder(waves, lengths=lengths)
    torch.testing.assert_close(from_mel.tokens, from_wave.tokens)
    torch.testing.assert_close(from_mel.padding_mask, from_wave.padding_mask)
    # Mel batches are padding-invariant too (padded frames zeroed before the stem).
    junk = mel.clone()
    junk[1, 15:] = 3.0
    torch.testing.assert_close(encoder(junk, frame_mask).tokens, from_mel.tokens)


def test_other_sample_rates_are_resampled_to_16k(encoder):
    waves, lengths = _batch([8000, 4000])
    at_16k, new_lengths = resample(waves, 8000, 16000, lengths)
    direct = encoder(waves, lengths=lengths, sample_rate=8000)
    torch.testing.assert_close(direct.tokens, encoder(at_16k, lengths=new_lengths).tokens)
    assert new_lengths.tolist() == [16000, 8000]


def test_any_duration_gets_positions(encoder):
    long = torch.randn(1, 16000 * 40) * 0.1  # 40 s, longer than Whisper's 30 s window
    out = encoder(long)
    assert out.tokens.shape[1] == 2000 and bool(torch.isfinite(out.tokens).all())
    assert not torch.equal(out.pos[0, 0], out.pos[0, 1999])


def test_regression_targets_pair_mel_frames(encoder):
    waves, lengths = _batch([1600, 960])
    mel, _ = encoder.log_mel(waves, lengths)
    targets, mask = encoder.regression_targets(waves, lengths=lengths)
    assert targets.shape == (2, 5, 160) and encoder.target_dim == 160
    torch.testing.assert_close(targets[0, 2], torch.cat([mel[0, 4], mel[0, 5]]))
    assert mask[1].tolist() == [False, False, False, True, True]


def test_absent_samples_may_be_empty(encoder):
    waves, _ = _batch([3200, 3200])
    out = encoder(waves, lengths=torch.tensor([3200, 0]), present=torch.tensor([True, False]))
    assert bool(out.padding_mask[1].all()) and not bool(out.padding_mask[0].any())
    # Every row absent (and empty): all padding, no error.
    out = encoder(waves, lengths=torch.tensor([0, 0]), present=torch.tensor([False, False]))
    assert bool(out.padding_mask.all()) and not bool(out.tokens.any())


def test_bad_input_names_modality_expected_and_received(encoder):
    with pytest.raises(
        EncoderInputError, match=r"audio: mel frames: expected \(B,T,80\), received \(1, 10, 64\)"
    ):
        encoder(torch.zeros(1, 10, 64))
    with pytest.raises(
        EncoderInputError, match=r"audio: input: expected \(B,S\) float or int16 waveform"
    ):
        encoder(torch.zeros(4000))
    with pytest.raises(EncoderInputError, match=r"received torch.int32 of shape \(1, 4000\)"):
        encoder(torch.zeros(1, 4000, dtype=torch.int32))  # the dtype is what is wrong
    with pytest.raises(EncoderInputError, match="audio: input: expected finite values"):
        encoder(torch.tensor([[0.0, float("inf")] * 200]))
    with pytest.raises(
        EncoderInputError, match=r"audio: batch rows \[1\]: expected at least one mel frame"
    ):
        encoder(torch.zeros(2, 1000), lengths=torch.tensor([1000, 100]))
    # Every row shorter than one hop: no frame at all (the FFT used to fail inside MKL).
    with pytest.raises(
        EncoderInputError,
        match=r"audio: batch rows \[0, 1\]: expected at least one mel frame \(a waveform of >= "
        r"160 samples at 16000 Hz\), received 0 mel frames",
    ):
        encoder(torch.zeros(2, 100))
    # At another rate the shortest waveform is counted at that rate: 439 samples at 44.1 kHz
    # resample to 160 (one frame), 438 to 159. The message used to say 160 for any rate.
    with pytest.raises(EncoderInputError, match=r"\(a waveform of >= 439 samples at 44100 Hz\)"):
        encoder(torch.zeros(1, 438), sample_rate=44100)
    assert encoder(torch.zeros(1, 439), sample_rate=44100).tokens.shape[1] == 1
    with pytest.raises(
        EncoderInputError, match=r"audio: lengths: expected shape \(2,\) with values in \[0, 1000\]"
    ):
        encoder(torch.zeros(2, 1000), lengths=torch.tensor([1000, 2000]))
