"""``model.ema_momentum`` is checked with the config (jin_zjepa's EMAConfig rules), so a bad value
fails before a job starts Ray workers, naming the key."""

from __future__ import annotations

import pytest

from jin_orchestrate.config import load_config


def test_ema_momentum_outside_zero_start_end_one_is_refused_naming_the_key():
    for bad in ("[1.5, -2.0]", "[0.9, 0.5]", "[-0.1, 1.0]", "[0.5, 1.01]", "[.nan, 1.0]"):
        with pytest.raises(ValueError, match=r"model\.ema_momentum: expected \(start, end\)"):
            load_config("jin-test", overrides=[f"model.ema_momentum={bad}"])
    for good in ((0.0, 0.0), (0.5, 1.0), (1.0, 1.0)):
        override = f"model.ema_momentum=[{good[0]}, {good[1]}]"
        assert load_config("jin-test", overrides=[override]).model.ema_momentum == good
