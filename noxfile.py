"""Sessions for the Jin monorepo: ``nox -l`` lists them; ``nox`` runs lint, tests, integration.

Each ``tests`` session installs one package (non-editable, so the wheel's metadata is what gets
tested) and only what it declares, into its own environment, and runs that package's tests. For the
leaves this is the proof that they install and work alone; their tests check that no sibling, Ray
or MLflow is present when ``JIN_ISOLATED_ENV=1``. Environments are reused between runs, except
under ``CI=true``, where each test session removes its environment when it ends (each holds its own
torch, Ray and CuPy, about 1-2.6 GB; kept all together they fill a small CI disk).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import nox

nox.options.reuse_venv = "yes"
nox.options.sessions = ["lint", "tests", "integration"]
nox.options.error_on_missing_interpreters = True

ROOT = Path(__file__).parent
LEAVES = ("jin-encoders", "jin-backbone", "jin-zjepa", "jin-data")
PACKAGES = (*LEAVES, "jin-orchestrate")
PRUNE_ENVS = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@contextlib.contextmanager
def _pruned(session: nox.Session) -> Iterator[None]:
    """Under CI, remove the session's environment when it ends, passed or failed."""
    try:
        yield
    finally:
        location = getattr(session.virtualenv, "location", None)
        if PRUNE_ENVS and location:
            session.log(f"CI: removing {location} to keep the run's disk use small")
            shutil.rmtree(location, ignore_errors=True)


def _install_torch(session: nox.Session) -> None:
    # Before anything that needs torch, so that pip never resolves `torch>=...` to a CUDA build.
    session.run("python", str(ROOT / "scripts" / "install_torch.py"))


def _install_all(session: nox.Session, *extra: str) -> None:
    _install_torch(session)
    session.install(*(str(ROOT / "packages" / f"{p}[test]") for p in PACKAGES), *extra)


@nox.session
@nox.parametrize("package", PACKAGES)
def tests(session: nox.Session, package: str) -> None:
    """One package alone in its own environment, with its test extras."""
    with _pruned(session):
        _install_torch(session)
        needs_leaves = package == "jin-orchestrate"
        siblings = [str(ROOT / "packages" / p) for p in LEAVES] if needs_leaves else []
        session.install(*siblings, str(ROOT / "packages" / f"{package}[test]"))
        session.chdir(ROOT / "packages" / package)
        env = {"JIN_ISOLATED_ENV": "1"} if package in LEAVES else {}
        session.run("pytest", *session.posargs, env=env)


@nox.session
def integration(session: nox.Session) -> None:
    """Cross-package tests in tests/ (slow ones included), and jin-data's Ray Data tests.

    jin-data's own session installs it without Ray (a leaf must work alone), so its Ray Data
    tests run here, where Ray is installed through jin-orchestrate.
    """
    with _pruned(session):
        _install_all(session, "build>=1.2")
        session.run("pytest", str(ROOT / "packages" / "jin-data" / "tests" / "test_ray_data.py"))
        session.run("pytest", str(ROOT / "tests"), *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check, configured once in ruff.toml."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", str(ROOT))
    session.run("ruff", "format", "--check", str(ROOT))


@nox.session
def bench(session: nox.Session) -> None:
    """Every benchmarks/*.py, each writing benchmarks/results/<name>.json."""
    _install_all(session)
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    scripts = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
    if not scripts:
        session.skip("no benchmarks yet")
    for script in scripts:
        session.run("python", str(script), "--json", str(results / f"{script.stem}.json"))


@nox.session
def pretrain(session: nox.Session) -> None:
    """The demo job, python -m jin_orchestrate.pretrain (posargs are passed on)."""
    _install_all(session)
    session.run("python", "-m", "jin_orchestrate.pretrain", *session.posargs)
