"""The paper's CustomModalityEncoder: vectors and sequences from any feature size."""

import pytest
import torch
from _encoder_helpers import DIM, assert_row_matches

from jin_encoders import CustomEncoderConfig, CustomModalityEncoder, EncoderInputError


@pytest.fixture
def encoder() -> CustomModalityEncoder:
    torch.manual_seed(0)
    return CustomModalityEncoder(CustomEncoderConfig(dim=DIM, input_dim=128))


def test_vector_is_one_projected_token(encoder):
    x = torch.randn(3, 128)
    out = encoder(x)
    assert out.tokens.shape == (3, 1, DIM) and out.padding_mask is None
    torch.testing.assert_close(out.tokens - out.pos, encoder.proj(x)[:, None])


def test_sequences_are_padding_invariant(encoder):
    x = torch.randn(2, 5, 128)
    mask = torch.tensor([[False] * 5, [False, False, True, True, True]])
    batched = encoder(x, mask)
    for row, n in enumerate([5, 2]):
        assert_row_matches(batched, row, encoder(x[row : row + 1, :n]))


def test_bad_input_names_modality_expected_and_received(encoder):
    encoder.modality = "proprioception"
    with pytest.raises(
        EncoderInputError,
        match=r"proprioception: features: expected \(B,128\) or \(B,T,128\) float tensor, "
        r"received torch.float32 of shape \(3, 64\)",
    ):
        encoder(torch.zeros(3, 64))
    with pytest.raises(  # the dtype is what is wrong, not the (matching) shape
        EncoderInputError,
        match=r"proprioception: features: .* received torch.int64 of shape \(3, 128\)",
    ):
        encoder(torch.zeros(3, 128, dtype=torch.long))
    with pytest.raises(EncoderInputError, match="proprioception: features: expected finite values"):
        encoder(torch.tensor([[float("nan")] * 128]))
