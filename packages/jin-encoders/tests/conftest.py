"""Fixtures shared by the jin-encoders tests."""

import pytest
import torch
from _encoder_helpers import tiny_space_config

from jin_encoders import JointEmbeddingSpace


@pytest.fixture
def space() -> JointEmbeddingSpace:
    """Every built-in modality, one fusion layer, eval mode, seeded."""
    torch.manual_seed(0)
    return JointEmbeddingSpace(tiny_space_config()).eval()
