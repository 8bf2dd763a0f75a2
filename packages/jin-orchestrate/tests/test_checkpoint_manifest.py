"""A damaged manifest is a `CheckpointError` naming it and the entry, so `latest_checkpoint` (used
by ``--resume`` and by restarted workers) falls back to the previous checkpoint."""

import json
import re

import pytest
import torch

from jin_orchestrate.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)


def _save(root, name, step):
    torch.manual_seed(0)
    return save_checkpoint(
        root / name, torch.nn.Linear(2, 2), config={"dim": 2}, state={"global_step": step}
    )


def _renamed_key(files):
    files["config.json"]["rha256"] = files["config.json"].pop("sha256")  # one bit of "s" flipped


def _bytes_as_text(files):
    files["state.json"]["bytes"] = str(files["state.json"]["bytes"])


def _bytes_as_bool(files):
    files["state.json"]["bytes"] = True


def _sha256_as_number(files):
    files["model.safetensors"]["sha256"] = 12345


def _entry_as_list(files):
    files["model.safetensors"] = [files["model.safetensors"]["sha256"], 8]


@pytest.mark.parametrize(
    ("damage", "entry"),
    [
        (_renamed_key, "config.json"),
        (_bytes_as_text, "state.json"),
        (_bytes_as_bool, "state.json"),
        (_sha256_as_number, "model.safetensors"),
        (_entry_as_list, "model.safetensors"),
    ],
)
def test_a_damaged_manifest_entry_is_a_checkpoint_error_and_latest_falls_back(
    tmp_path, damage, entry
):
    previous = _save(tmp_path, "checkpoint_000001", step=1)
    newest = _save(tmp_path, "checkpoint_000002", step=2)
    manifest = newest / "manifest.json"
    content = json.loads(manifest.read_text())
    damage(content["files"])
    manifest.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=re.escape(f"manifest {manifest}: entry '{entry}'")):
        verify_checkpoint(newest)
    assert latest_checkpoint(tmp_path) == previous


def test_a_manifest_whose_files_are_not_a_mapping_is_a_checkpoint_error(tmp_path):
    previous = _save(tmp_path, "checkpoint_000001", step=1)
    newest = _save(tmp_path, "checkpoint_000002", step=2)
    manifest = newest / "manifest.json"
    content = json.loads(manifest.read_text())
    content["files"] = list(content["files"])
    manifest.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=re.escape(f"manifest {manifest}: 'files' is a list")):
        verify_checkpoint(newest)
    assert latest_checkpoint(tmp_path) == previous
