"""Every package builds a wheel and an sdist whose metadata match its pyproject and __version__."""

import email
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jin-encoders", "jin-backbone", "jin-zjepa", "jin-data", "jin-orchestrate")


def _source_version(pkg_dir: Path, module: str) -> str:
    init = (pkg_dir / "src" / module / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"$', init, re.M)
    assert match, f"{module}/__init__.py has no __version__"
    return match.group(1)


@pytest.mark.slow
@pytest.mark.parametrize("package", PACKAGES)
def test_build_wheel_and_sdist_with_correct_metadata(package, tmp_path):
    pkg_dir = ROOT / "packages" / package
    module = package.replace("-", "_")
    project = tomllib.loads((pkg_dir / "pyproject.toml").read_text())["project"]
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(tmp_path), str(pkg_dir)],
        check=True,
        capture_output=True,
    )
    version = _source_version(pkg_dir, module)
    wheel = tmp_path / f"{module}-{version}-py3-none-any.whl"
    sdist = tmp_path / f"{module}-{version}.tar.gz"
    assert wheel.exists() and sdist.exists(), sorted(p.name for p in tmp_path.iterdir())

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = email.message_from_bytes(zf.read(f"{module}-{version}.dist-info/METADATA"))
    assert f"{module}/py.typed" in names
    assert not any(n.startswith("tests/") for n in names)
    assert meta["Name"] == package and meta["Version"] == version
    assert meta["Requires-Python"] == project["requires-python"]
    requires = sorted(
        str(Requirement(r)) for r in meta.get_all("Requires-Dist", []) if "extra ==" not in r
    )
    assert requires == sorted(str(Requirement(r)) for r in project["dependencies"])

    with tarfile.open(sdist) as tf:
        members = tf.getnames()
    prefix = f"{module}-{version}"
    for required in ("pyproject.toml", "README.md", "CHANGELOG.md", f"src/{module}/__init__.py"):
        assert f"{prefix}/{required}" in members, required
