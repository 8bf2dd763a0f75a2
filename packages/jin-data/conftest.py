"""Fixtures for the Python examples of README.md, run as tests by pytest-markdown-docs."""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture
def espeak_ng() -> None:
    """For an example that synthesises speech: skip where espeak-ng is missing, as the NumberWorld
    tests do; CI installs it (scripts/setup.sh), so there a missing espeak-ng fails instead."""
    if shutil.which("espeak-ng") is None and not os.environ.get("CI"):
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
