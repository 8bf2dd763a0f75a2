"""Checkpoints are complete or absent, verified at load, and never unpickle user data."""

import json
import re

import pytest
import torch

from jin_orchestrate.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied, stored once by safetensors


# A damaged manifest is a `CheckpointError` naming it and the entry, so `latest_checkpoint` (used
# by `--resume` and by restarted workers) falls back to the previous checkpoint.


def _save(tmp_path, name="ckpt", step=3):
    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.head(model.embed(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    path = save_checkpoint(
        tmp_path / name, model, config={"dim": 4}, state={"global_step": step}, optimizer=opt
    )
    return path, model, opt


def test_round_trip_restores_weights_optimizer_state_and_rng(tmp_path):
    path, model, opt = _save(tmp_path)
    fresh = Tied()
    loaded = load_checkpoint(path, fresh)
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    assert fresh.head.weight is fresh.embed.weight
    assert loaded.state == {"global_step": 3}
    assert loaded.config == {"dim": 4}
    state = opt.state_dict()["state"][0]
    assert torch.equal(loaded.optimizer_state["state"][0]["exp_avg"], state["exp_avg"])
    assert "torch_cpu" in loaded.rng


def test_corrupted_file_is_named(tmp_path):
    path, _, _ = _save(tmp_path)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match its sha256"):
        load_checkpoint(path, Tied())


def test_missing_manifest_means_incomplete(tmp_path):
    path, _, _ = _save(tmp_path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        verify_checkpoint(path)


def test_refuses_to_overwrite_and_leaves_no_temporary_directory_on_failure(tmp_path):
    path, model, _ = _save(tmp_path)
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(path, model, config={}, state={})

    class Broken(torch.nn.Module):
        def state_dict(self, *args, **kwargs):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path / "broken", Broken(), config={}, state={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_latest_checkpoint_skips_incomplete_and_corrupted_ones(tmp_path):
    _save(tmp_path, "a", step=1)
    newest, _, _ = _save(tmp_path, "b", step=2)
    corrupted, _, _ = _save(tmp_path, "c", step=3)
    (corrupted / "state.json").write_text(json.dumps({"global_step": 99}))
    partial = tmp_path / "d.tmp-1234"
    partial.mkdir()
    assert latest_checkpoint(tmp_path) == newest
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_shape_mismatch_names_the_keys(tmp_path):
    path, _, _ = _save(tmp_path)

    class Other(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.other = torch.nn.Linear(2, 2)

    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(path, Other())


def _save_linear(root, name, step):
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
    previous = _save_linear(tmp_path, "checkpoint_000001", step=1)
    newest = _save_linear(tmp_path, "checkpoint_000002", step=2)
    manifest = newest / "manifest.json"
    content = json.loads(manifest.read_text())
    damage(content["files"])
    manifest.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=re.escape(f"manifest {manifest}: entry '{entry}'")):
        verify_checkpoint(newest)
    assert latest_checkpoint(tmp_path) == previous


def test_a_manifest_whose_files_are_not_a_mapping_is_a_checkpoint_error(tmp_path):
    previous = _save_linear(tmp_path, "checkpoint_000001", step=1)
    newest = _save_linear(tmp_path, "checkpoint_000002", step=2)
    manifest = newest / "manifest.json"
    content = json.loads(manifest.read_text())
    content["files"] = list(content["files"])
    manifest.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=re.escape(f"manifest {manifest}: 'files' is a list")):
        verify_checkpoint(newest)
    assert latest_checkpoint(tmp_path) == previous
