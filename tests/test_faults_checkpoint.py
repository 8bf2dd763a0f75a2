"""Checkpoints under faults: SIGKILL while one is written, corrupted files, a malicious pickle.

A child process saves jin-test checkpoints one after another and is killed with SIGKILL, either
at the worst moment (every file and the manifest written and flushed, the rename not yet done) or
at a seeded random moment of its writing. After every kill the newest complete checkpoint must
load, and every directory that is not a temporary one must verify.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jin_orchestrate.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from jin_orchestrate.config import load_config
from jin_orchestrate.model import JinModel

pytestmark = pytest.mark.fault

# The child: saves checkpoint after checkpoint; with PAUSE_AT set, it announces the rename of that
# step and sleeps there, so the parent's SIGKILL lands after the manifest and before the rename.
WRITER = """
import os, sys, time
from pathlib import Path
import torch
import jin_orchestrate.checkpoint as ckpt
from jin_orchestrate.config import load_config
from jin_orchestrate.model import JinModel

root, pause_at = Path(sys.argv[1]), int(sys.argv[2])
cfg = load_config("jin-test")
model = JinModel(cfg.model)
optimizer = torch.optim.AdamW(model.parameters())
step = max([int(p.name.split("-")[1]) for p in root.glob("step-*") if ".tmp-" not in p.name],
           default=0)
real_replace = os.replace

def replace(src, dst):
    if Path(dst).name == f"step-{pause_at}":
        (root / "renaming").write_text(str(src))
        time.sleep(600)
    real_replace(src, dst)

ckpt.os.replace = replace
print("ready", flush=True)
while True:
    step += 1
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    ckpt.save_checkpoint(root / f"step-{step}", model, config=cfg.model_dump(mode="json"),
                         state={"global_step": step}, optimizer=optimizer)
    print(f"saved {step}", flush=True)
"""


def _check_after_kill(root: Path, saved: int) -> Path:
    """The newest complete checkpoint loads, holds step ``saved`` or later; all others verify."""
    latest = latest_checkpoint(root)
    assert latest is not None
    cfg = load_config("jin-test")
    loaded = load_checkpoint(latest, JinModel(cfg.model))
    assert loaded.state["global_step"] >= saved
    for directory in root.glob("step-*"):
        if ".tmp-" not in directory.name:
            verify_checkpoint(directory)
    return latest


def _start(root: Path, pause_at: int) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), str(pause_at)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "ready"
    return child


def test_sigkill_while_writing_never_loses_the_previous_checkpoint(tmp_path):
    root = tmp_path / "ckpts"
    root.mkdir()
    rng = random.Random(0)
    kills = 0
    # Three kills at the worst moment, three at seeded random moments of the writing.
    for round_ in range(6):
        worst = round_ < 3
        marker = root / "renaming"
        marker.unlink(missing_ok=True)
        done = max(
            (int(p.name.split("-")[1]) for p in root.glob("step-*") if ".tmp-" not in p.name),
            default=0,
        )
        child = _start(root, pause_at=done + 2 if worst else -1)
        saved = done
        if worst:
            while not marker.exists():
                assert child.poll() is None, "the writer exited"
                time.sleep(0.05)
            saved = done + 1
        else:
            time.sleep(rng.uniform(0.2, 1.5))
        os.kill(child.pid, signal.SIGKILL)
        output, _ = child.communicate(timeout=60)
        kills += 1
        saved = max(
            [saved]
            + [int(line.split()[1]) for line in output.splitlines() if line.startswith("saved")]
        )
        latest = _check_after_kill(root, saved)
        if worst:
            # The killed write left its temporary directory, complete but never renamed: ignored.
            assert latest.name == f"step-{done + 1}"
            assert list(root.glob(f"step-{done + 2}.tmp-*"))
    assert kills == 6


@pytest.fixture
def saved(tmp_path) -> Path:
    torch.manual_seed(0)
    cfg = load_config("jin-test")
    model = JinModel(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters())
    return save_checkpoint(
        tmp_path / "ckpt",
        model,
        config=cfg.model_dump(mode="json"),
        state={"global_step": 1},
        optimizer=optimizer,
    )


def _files(path: Path) -> list[str]:
    return sorted(json.loads((path / "manifest.json").read_text())["files"])


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_every_damaged_file_is_named_at_load(saved, damage):
    cfg = load_config("jin-test")
    names = [*_files(saved), "manifest.json"]
    assert {"model.safetensors", "optimizer.pt", "rng.safetensors", "state.json"} <= set(names)
    for name in names:
        file = saved / name
        original = file.read_bytes()
        if damage == "flip":
            file.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
        elif damage == "truncate":
            file.write_bytes(original[: len(original) // 2])
        else:
            file.unlink()
        with pytest.raises(CheckpointError, match=str(file).replace(".", r"\.")):
            load_checkpoint(saved, JinModel(cfg.model))
        assert latest_checkpoint(saved.parent) is None
        file.write_bytes(original)
    load_checkpoint(saved, JinModel(cfg.model))


class _Payload:
    """A pickle that would create ``marker`` when unpickled (what an attacker's code would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_malicious_optimizer_pickle_is_refused_and_never_runs(saved, tmp_path):
    """Even with a manifest rewritten to match, ``optimizer.pt`` is read with weights_only."""
    import hashlib

    marker = tmp_path / "pwned"
    optimizer = saved / "optimizer.pt"
    torch.save({"state": {0: _Payload(marker)}, "param_groups": []}, optimizer)
    manifest = json.loads((saved / "manifest.json").read_text())
    manifest["files"]["optimizer.pt"] = {
        "sha256": hashlib.sha256(optimizer.read_bytes()).hexdigest(),
        "bytes": optimizer.stat().st_size,
    }
    (saved / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config("jin-test")
    with pytest.raises(CheckpointError, match=r"refusing .*optimizer\.pt"):
        load_checkpoint(saved, JinModel(cfg.model))
    assert not marker.exists()
    # Weights alone (serving, evaluation) never open the optimiser file.
    load_checkpoint(saved, JinModel(cfg.model), load_optimizer=False)
