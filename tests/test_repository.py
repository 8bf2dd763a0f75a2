"""Repository contracts: the README's two commands, CI running the second one, and the GPU check
running on the lent machine's image."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert first_block, "README.md must open with a bash block holding its two commands"
    return [
        line.strip()
        for line in first_block.group(1).splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_readme_opens_with_exactly_two_commands():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert commands[0].endswith("python -m jin_orchestrate.pretrain")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in [line.strip() for line in ci]


def _gpu_check_pytest_options() -> list[str]:
    """The options scripts/gpu_check.sh gives pytest in each package (between `-m pytest` and
    the test files)."""
    script = (ROOT / "scripts" / "gpu_check.sh").read_text().replace("\\\n", " ")
    line = next(line for line in script.splitlines() if '"$PY" -m pytest' in line)
    return shlex.split(line.split('"$PY" -m pytest', 1)[1].replace("$files", ""))


@pytest.mark.slow
def test_gpu_check_runs_the_tests_without_what_the_gpu_image_lacks(tmp_path):
    # The lent GPU machine has no pytest-markdown-docs (the packages' addopts name its option) and
    # no MLflow (imported by the conftest.py of jin-orchestrate's README examples).
    (tmp_path / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class Blocker(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'mlflow':\n"
        "            raise ModuleNotFoundError('no mlflow on the GPU image')\n"
        "sys.meta_path.insert(0, Blocker())\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "PYTEST_ADDOPTS": "-p no:pytest_markdown_docs",
    }
    run = subprocess.run(
        [sys.executable, "-m", "pytest", *_gpu_check_pytest_options(), "tests/test_model.py"],
        cwd=ROOT / "packages" / "jin-orchestrate",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
