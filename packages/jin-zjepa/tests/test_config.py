"""The configuration convention: unknown keys fail with their name and the allowed keys."""

import pytest
from pydantic import ValidationError

from jin_zjepa import StrictConfig


class _Inner(StrictConfig):
    num_experts: int = 8
    top_k: int = 2


class _Outer(StrictConfig):
    width: int = 64
    inner: _Inner = _Inner()


def test_known_keys_validate():
    cfg = _Outer.model_validate({"width": 32, "inner": {"num_experts": 4}})
    assert cfg.width == 32 and cfg.inner.num_experts == 4 and cfg.inner.top_k == 2


def test_unknown_nested_key_names_key_path_and_allowed_keys():
    with pytest.raises(ValidationError) as err:
        _Outer.model_validate({"inner": {"num_expert": 4}})
    text = str(err.value)
    assert "inner" in text
    assert "'num_expert'" in text
    assert "['num_experts', 'top_k']" in text
    assert "did you mean 'num_experts'" in text


def test_wrong_type_is_rejected_on_assignment():
    cfg = _Outer()
    with pytest.raises(ValidationError, match="width"):
        cfg.width = "wide"
