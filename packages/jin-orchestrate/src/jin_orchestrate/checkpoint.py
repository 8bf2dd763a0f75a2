"""Checkpoints that are complete or absent: safetensors weights, checksummed, written atomically.

Layout of one checkpoint directory::

    model.safetensors   weights (safetensors: loading never unpickles anything)
    optimizer.pt        optimiser state, read back with ``torch.load(weights_only=True)``
    rng.safetensors     torch (CPU and CUDA) RNG states
    ema.safetensors     the average of the trained weights (``train.weight_ema``), if kept
    state.json          step, stage, data position and anything else JSON-serialisable
    config.json         the resolved JinConfig
    manifest.json       sha256 and size of every file above; written last

A checkpoint is written into a temporary sibling directory and renamed into place only when every
file, the manifest included, is on disk and flushed, so a process killed mid-write leaves the
previous checkpoint untouched and at worst a ``*.tmp-*`` directory that :func:`latest_checkpoint`
ignores. Loading verifies every checksum first and names the file that does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

__all__ = [
    "CheckpointError",
    "LoadedCheckpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "read_config",
    "save_checkpoint",
    "stage_dir_name",
    "verify_checkpoint",
]

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
RNG = "rng.safetensors"
EMA = "ema.safetensors"
STATE = "state.json"
CONFIG = "config.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or corrupted; the message names the file."""


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` restored besides the weights."""

    path: Path
    state: dict[str, Any]
    config: dict[str, Any]
    optimizer_state: dict[str, Any] | None = None
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    ema: dict[str, torch.Tensor] | None = None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch RNG states (CPU and CUDA), as a checkpoint stores them."""
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"torch_cuda_{i}"] = s
    return states


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    """Restore the RNG states saved with a checkpoint (CUDA ones only where devices match)."""
    if "torch_cpu" in rng:
        torch.set_rng_state(rng["torch_cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: torch.nn.Module,
    *,
    config: dict[str, Any],
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    rng: dict[str, torch.Tensor] | None = None,
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint to ``directory`` atomically and return its path.

    ``directory`` must not exist yet; its parent is created. Tied parameters are stored once
    (``safetensors.torch.save_model`` deduplicates shared storage). ``rng`` adds further RNG
    states (e.g. a ``torch.Generator``'s) to the global ones; ``ema`` is a
    :class:`~jin_orchestrate.ema.WeightEMA`'s state.
    """
    final = Path(directory)
    if final.exists():
        raise CheckpointError(f"checkpoint directory {final} already exists; refusing to overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        save_model(model, str(tmp / WEIGHTS))
        states = {**rng_state(), **(rng or {})}
        save_file({k: v.contiguous() for k, v in states.items()}, str(tmp / RNG))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        if ema is not None:
            save_file(ema, str(tmp / EMA))
        (tmp / STATE).write_text(json.dumps(state, indent=2, sort_keys=True))
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {
            name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
            for name in files
        }
        (tmp / MANIFEST).write_text(json.dumps({"version": 1, "files": manifest}, indent=2))
        for name in [*files, MANIFEST]:
            _fsync_file(tmp / name)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _check_entry(manifest_path: Path, name: str, meta: Any) -> None:
    """A manifest entry is ``{"sha256": str, "bytes": int}``; anything else is damage, which must
    surface as `CheckpointError` so that :func:`latest_checkpoint` falls back to an older one."""
    if not (
        isinstance(meta, dict)
        and isinstance(meta.get("sha256"), str)
        # bool is an int subclass, but no file size
        and type(meta.get("bytes")) is int
    ):
        raise CheckpointError(
            f"corrupted checkpoint manifest {manifest_path}: entry {name!r} is {meta!r:.200}, not "
            '{"sha256": str, "bytes": int}'
        )


def verify_checkpoint(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Check that every file listed in the manifest exists with its recorded checksum."""
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"incomplete checkpoint: {manifest_path} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())["files"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"corrupted checkpoint manifest {manifest_path}: {exc}") from exc
    if not isinstance(manifest, dict):
        raise CheckpointError(
            f"corrupted checkpoint manifest {manifest_path}: 'files' is a "
            f"{type(manifest).__name__}, not a mapping of file names"
        )
    for name, meta in manifest.items():
        _check_entry(manifest_path, name, meta)
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"incomplete checkpoint: {file} is listed but missing")
        if file.stat().st_size != meta["bytes"] or _sha256(file) != meta["sha256"]:
            raise CheckpointError(f"corrupted checkpoint: {file} does not match its sha256")
    if WEIGHTS not in manifest:
        raise CheckpointError(f"incomplete checkpoint: {path / WEIGHTS} is not in the manifest")
    return manifest


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The config stored with a verified checkpoint."""
    verify_checkpoint(directory)
    return json.loads((Path(directory) / CONFIG).read_text())


def load_checkpoint(
    directory: str | os.PathLike[str],
    model: torch.nn.Module,
    *,
    strict: bool = True,
    load_optimizer: bool = True,
) -> LoadedCheckpoint:
    """Verify checksums, then load weights into ``model`` and return the rest.

    Nothing is unpickled: weights and RNG come from safetensors, the optimiser state through
    ``torch.load(weights_only=True)``.
    """
    path = Path(directory)
    manifest = verify_checkpoint(path)
    missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path / WEIGHTS} does not fit the model: missing keys {sorted(missing)[:10]}, "
            f"unexpected keys {sorted(unexpected)[:10]}"
        )
    optimizer_state = None
    if load_optimizer and OPTIMIZER in manifest:
        try:
            optimizer_state = torch.load(path / OPTIMIZER, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as exc:
            # weights_only refuses any global outside torch's allow-list, so nothing ran; torch's
            # own advice (retry with weights_only=False) is the unsafe one, so only its reason.
            reason = [line for line in str(exc).splitlines() if "Unsupported global" in line]
            raise CheckpointError(
                f"refusing {path / OPTIMIZER}: it holds objects other than tensors and plain "
                f"containers, which only an unsafe unpickle would load {reason}"
            ) from None
    rng = load_file(str(path / RNG)) if RNG in manifest else {}
    ema = load_file(str(path / EMA)) if EMA in manifest else None
    return LoadedCheckpoint(
        path=path,
        state=json.loads((path / STATE).read_text()),
        config=json.loads((path / CONFIG).read_text()),
        optimizer_state=optimizer_state,
        rng=rng,
        ema=ema,
    )


def stage_dir_name(index: int, name: str) -> str:
    """``stage<index + 1>-<name>``: the folder of curriculum stage ``index`` (0-based) below a
    job's storage, where its checkpoints go (Ray Train's and `train_in_process`'s alike).

    ``StageConfig`` keeps the name one plain path component: a ``/`` in it would nest the folder,
    and with ``..`` put it outside the job, where replacing a checkpoint deletes what is there.
    """
    return f"stage{index + 1}-{name}"


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The newest complete, verified checkpoint below ``root`` (by its recorded global step)."""
    base = Path(root)
    if not base.exists():
        return None
    best: tuple[int, float, Path] | None = None
    for manifest in base.rglob(MANIFEST):
        candidate = manifest.parent
        if ".tmp-" in candidate.name:
            continue
        try:
            verify_checkpoint(candidate)
            step = int(json.loads((candidate / STATE).read_text()).get("global_step", -1))
        except (CheckpointError, json.JSONDecodeError, ValueError):
            continue
        key = (step, candidate.stat().st_mtime, candidate)
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else best[2]
