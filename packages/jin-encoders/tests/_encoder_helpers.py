"""Tiny configs and the padding-invariance assertion shared by the encoder tests."""

from __future__ import annotations

import torch

from jin_encoders import EncoderOutput, JointEmbeddingSpaceConfig

DIM = 32


def tiny_space_config(**overrides: object) -> JointEmbeddingSpaceConfig:
    """Every built-in modality at width 32, small enough for seconds-long tests."""
    fields: dict[str, object] = {
        "dim": DIM,
        "text": {"max_len": 48},
        "image": {"patch_size": 8, "in_channels": 1, "pos_grid": 4},
        "audio": {},
        "points": {"num_groups": 8, "group_size": 4, "hidden": 16, "in_features": 4},
        "custom": {"input_dim": 7},
        "fusion_layers": 1,
        "fusion_heads": 4,
        "retrieval_dim": 16,
    }
    fields.update(overrides)
    return JointEmbeddingSpaceConfig.model_validate(fields)


def tiny_inputs(seed: int = 0) -> dict[str, object]:
    """A batch of 3 samples of different sizes for every built-in modality."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([8000, 2650, 4801])
    audio = torch.randn(3, 8000, generator=gen) * 0.1
    audio = audio * (torch.arange(8000)[None] < lengths[:, None])
    counts = torch.tensor([40, 5, 23])
    return {
        "text": ["a", "naïve café ✓", "the number forty-two"],
        "image": {
            "x": torch.randint(0, 256, (3, 1, 40, 33), dtype=torch.uint8, generator=gen),
            "sizes": torch.tensor([[40, 33], [17, 9], [24, 33]]),
        },
        "audio": {"x": audio, "lengths": lengths},
        "points": {
            "x": torch.randn(3, 40, 4, generator=gen),
            "padding_mask": torch.arange(40)[None] >= counts[:, None],
        },
        "custom": torch.randn(3, 7, generator=gen),
    }


def assert_row_matches(batched: EncoderOutput, row: int, alone: EncoderOutput, atol=1e-5) -> None:
    """Row ``row`` of a batched output equals the output of that sample encoded alone.

    Valid tokens and positions must match (to float tolerance of different kernel shapes), the
    valid count must be the alone sequence's, and everything past it must be padding.
    """
    valid = batched.valid_mask[row]
    count = int(valid.sum())
    assert alone.tokens.shape[0] == 1
    assert alone.padding_mask is None, "a sample alone has no padding"
    assert count == alone.tokens.shape[1]
    assert bool(valid[:count].all()) and not bool(valid[count:].any()), "padding not at the end"
    torch.testing.assert_close(batched.tokens[row, :count], alone.tokens[0], atol=atol, rtol=1e-5)
    torch.testing.assert_close(batched.pos[row, :count], alone.pos[0], atol=atol, rtol=1e-5)
    assert bool((batched.tokens[row, count:] == 0).all()), "padded tokens are zeroed"
