"""Shared fixtures of the integration tests: one small NumberWorld corpus per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def numberworld_url(tmp_path_factory) -> str:
    """200 NumberWorld samples (seed 0), generated once per test session."""
    from jin_data.numberworld import generate_numberworld

    root = tmp_path_factory.mktemp("numberworld")
    url = str(root / "nw")
    generate_numberworld(url, 200, 0, progress=False, cache_dir=str(root / "speech"))
    return url
