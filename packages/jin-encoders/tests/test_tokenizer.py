"""Byte tokenizer: any Unicode round-trips, the collate path equals the string path, truncation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jin_encoders import ByteTokenizer, EncoderInputError


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=30), min_size=1, max_size=4))
def test_any_unicode_round_trips(texts):
    tok = ByteTokenizer(max_len=128)
    ids, mask = tok.encode(texts)
    assert tok.decode(ids, mask) == texts
    lengths = (~mask).sum(dim=1)
    expected = torch.tensor([len(t.encode("utf-8")) + 2 for t in texts])
    assert torch.equal(lengths, expected)
    assert bool((ids[:, 0] == tok.BOS).all())
    assert torch.equal(
        ids.gather(1, (lengths - 1)[:, None])[:, 0], torch.full_like(lengths, tok.EOS)
    )
    assert bool((ids[mask] == tok.PAD).all())


def test_from_bytes_matches_encode_of_the_same_strings():
    texts = ["héllo", "", "日本語 text ✓"]
    tok = ByteTokenizer(max_len=64)
    raw = [t.encode("utf-8") for t in texts]
    width = max(len(r) for r in raw) + 3  # extra padding columns, as a larger batch would have
    bytes_BT = torch.zeros(len(raw), width, dtype=torch.uint8)
    mask = torch.ones(len(raw), width, dtype=torch.bool)
    for row, r in enumerate(raw):
        bytes_BT[row, : len(r)] = torch.tensor(list(r), dtype=torch.uint8)
        mask[row, : len(r)] = False
    ids_a, mask_a = tok.from_bytes(bytes_BT, mask)
    ids_b, mask_b = tok.encode(texts)
    assert torch.equal(ids_a, ids_b) and torch.equal(mask_a, mask_b)


def test_special_tokens_are_offset_below_the_bytes():
    tok = ByteTokenizer(max_len=8, add_bos=False, add_eos=False)
    ids, _ = tok.encode(["\x00\xff"])
    assert ids.tolist() == [[tok.NUM_SPECIAL + 0, tok.NUM_SPECIAL + 0xC3, tok.NUM_SPECIAL + 0xBF]]
    assert tok.vocab_size == 260


def test_over_long_input_truncates_to_max_len():
    tok = ByteTokenizer(max_len=6, truncation="truncate")
    ids, mask = tok.encode(["abcdefghij", "ab"])
    assert ids.shape == (2, 6)
    assert tok.decode(ids, mask) == ["abcd", "ab"]
    assert ids[0, -1].item() == tok.EOS


def test_over_long_input_errors_naming_row_and_limit():
    tok = ByteTokenizer(max_len=6, truncation="error")
    with pytest.raises(EncoderInputError, match=r"text: rows \[1\]: expected at most 4 bytes"):
        tok.encode(["ab", "abcdefghij"])


def test_bad_byte_tensors_are_rejected():
    tok = ByteTokenizer()
    with pytest.raises(EncoderInputError, match=r"expected uint8 tensor of shape \(B,T\)"):
        tok.from_bytes(torch.zeros(2, 3, dtype=torch.long))
    left_padded = torch.tensor([[True, False]])
    with pytest.raises(EncoderInputError, match="right padding"):
        tok.from_bytes(torch.zeros(1, 2, dtype=torch.uint8), left_padded)
    with pytest.raises(EncoderInputError, match="list of str"):
        tok.encode("not a list")
