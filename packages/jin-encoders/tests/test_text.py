"""Text encoder: strings, bytes and ids agree; padding invariance; errors name the modality."""

import pytest
import torch
from _encoder_helpers import DIM, assert_row_matches

from jin_encoders import EncoderInputError, TextEncoder, TextEncoderConfig


@pytest.fixture
def encoder() -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder(TextEncoderConfig(dim=DIM, max_len=32))


def test_padding_invariance(encoder):
    texts = ["hi", "a much longer sentence", "mid-size ✓"]
    batched = encoder(texts)
    assert batched.tokens.shape[:2] == batched.padding_mask.shape
    for row, text in enumerate(texts):
        assert_row_matches(batched, row, encoder([text]), atol=0)


def test_bytes_ids_and_strings_give_the_same_tokens(encoder):
    texts = ["héllo", "x"]
    ids, mask = encoder.tokenizer.encode(texts)
    raw = torch.zeros(2, 6, dtype=torch.uint8)
    raw[0] = torch.tensor(list("héllo".encode()), dtype=torch.uint8)
    raw[1, 0] = ord("x")
    raw_mask = torch.ones(2, 6, dtype=torch.bool)
    raw_mask[0] = False
    raw_mask[1, 0] = False
    a, b, c = encoder(texts), encoder(ids, mask), encoder(raw, raw_mask)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens, c.tokens)
    assert torch.equal(
        a.pos, encoder.pos_embed[:, : ids.shape[1]].expand(2, -1, -1) * (~mask)[..., None]
    )


def test_batch_inputs_reads_collate_keys(encoder):
    batch = {
        "text": ["ab"],
        "text_bytes": torch.tensor([[97, 98, 0]], dtype=torch.uint8),
        "text_padding_mask": torch.tensor([[False, False, True]]),
    }
    out = encoder(**encoder.batch_inputs(batch, "text"))
    assert torch.equal(out.tokens, encoder(["ab"]).tokens)


def test_absent_samples_become_padding(encoder):
    out = encoder(["ab", "cd"], present=torch.tensor([True, False]))
    assert bool(out.padding_mask[1].all()) and not bool(out.padding_mask[0].any())


def test_bad_input_names_modality_expected_and_received(encoder):
    with pytest.raises(EncoderInputError, match=r"text: token ids: expected values in \[0, 260\)"):
        encoder(torch.tensor([[1, 999]]))
    with pytest.raises(EncoderInputError, match=r"text: input: expected \(B,T\) int64 ids"):
        encoder(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(
        EncoderInputError, match="text: sequence length: expected at most max_len=32"
    ):
        encoder(torch.ones(1, 40, dtype=torch.long))
    with pytest.raises(
        EncoderInputError, match=r"text: batch rows \[1\]: expected at least one token"
    ):
        encoder(torch.ones(2, 3, dtype=torch.long), torch.tensor([[False] * 3, [True] * 3]))
    with pytest.raises(
        EncoderInputError, match="text: texts: expected a list of str, received str"
    ):
        encoder("one string, not a batch of its characters")


def test_rows_without_text_and_no_special_tokens_give_padding_not_a_crash():
    # Without BOS/EOS a batch where no row has text has zero ids a row; ids.min() used to raise
    # torch's RuntimeError (a collate batch without text, or empty strings, crashed).
    torch.manual_seed(0)
    config = TextEncoderConfig(dim=DIM, max_len=32, add_bos=False, add_eos=False)
    encoder = TextEncoder(config)
    absent = torch.tensor([False, False])
    for x, mask in [
        (["", ""], None),
        (torch.zeros(2, 0, dtype=torch.uint8), torch.ones(2, 0, dtype=torch.bool)),
        (torch.zeros(2, 3, dtype=torch.uint8), torch.ones(2, 3, dtype=torch.bool)),
    ]:
        out = encoder(x, mask, present=absent)
        assert out.tokens.shape == (2, 1, DIM) and bool(out.padding_mask.all())
        assert not bool(out.tokens.any())
    with pytest.raises(
        EncoderInputError, match=r"text: batch rows \[0, 1\]: expected at least one token"
    ):
        encoder(["", ""])  # present rows must have a token: "empty sequences" are refused
    with pytest.raises(
        EncoderInputError, match=r"text: batch rows \[0\]: expected at least one token"
    ):
        encoder(torch.zeros(1, 0, dtype=torch.long))


def test_a_text_list_names_the_element_that_is_not_a_str(encoder):
    with pytest.raises(
        EncoderInputError,
        match="text: texts: expected a list of str, received NoneType at index 1",
    ):
        encoder(["a caption", None])
