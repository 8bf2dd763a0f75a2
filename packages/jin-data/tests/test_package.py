"""Packaging contract: the version is single-sourced and the leaf stands alone."""

import importlib.metadata
import os
import subprocess
import sys

import pytest

import jin_data

# A leaf may be pinned alone in another project: importing it must not pull in a sibling leaf or
# the orchestration stack (DESIGN.md, "Each leaf is useful on its own").
FORBIDDEN_IMPORTS = [
    "jin_backbone",
    "jin_encoders",
    "jin_orchestrate",
    "jin_zjepa",
    "mlflow",
    "ray",
]
FORBIDDEN_DISTRIBUTIONS = [
    "jin-backbone",
    "jin-encoders",
    "jin-orchestrate",
    "jin-zjepa",
    "mlflow",
    "ray",
]


def test_version_matches_installed_metadata():
    assert jin_data.__version__ == importlib.metadata.version("jin-data")


def test_import_pulls_in_no_sibling_or_orchestration_module():
    probe = (
        "import sys, jin_data; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN_IMPORTS!r}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(
    os.environ.get("JIN_ISOLATED_ENV") != "1",
    reason="meaningful only in the environment `nox -s tests` builds with this package alone",
)
@pytest.mark.parametrize("dist", FORBIDDEN_DISTRIBUTIONS)
def test_installed_without_siblings_ray_or_mlflow(dist):
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version(dist)
