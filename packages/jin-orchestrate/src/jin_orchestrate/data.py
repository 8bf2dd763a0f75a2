"""The data side of a job: the default NumberWorld corpus, and jin-data's Ray Data path.

With no ``--data`` URL a NumberWorld corpus is generated once into ``data.cache_dir`` (keyed by
its size, seed and schema version), written under a temporary name and renamed when complete, so
an interrupted generation never passes for a finished one.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jin_data import SCHEMA_VERSION, DataError, verify_dataset
from jin_data.numberworld import generate_numberworld
from jin_data.ray_data import ray_collate_fn, read_ray_dataset
from jin_orchestrate.data_faults import FiniteCheck

if TYPE_CHECKING:
    import ray.data

    from jin_orchestrate.config import DataConfig

__all__ = ["default_corpus", "ray_collate", "ray_train_dataset", "rename_columns"]


def default_corpus(cfg: DataConfig, *, progress: bool = True) -> str:
    """Path of the cached NumberWorld corpus for ``cfg``, generating it first if needed."""
    root = Path(cfg.cache_dir).expanduser()
    final = root / f"numberworld-v{SCHEMA_VERSION}-n{cfg.samples}-seed{cfg.seed}"
    if final.exists():
        try:
            verify_dataset(str(final))
            return str(final)
        except DataError as exc:
            print(f"[jin] cached corpus {final} is damaged ({exc}); generating it again")
            shutil.rmtree(final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    print(f"[jin] generating NumberWorld ({cfg.samples} samples, seed {cfg.seed}) into {final}")
    try:
        generate_numberworld(
            str(tmp), cfg.samples, cfg.seed, progress=progress, cache_dir=str(root)
        )
        try:
            tmp.rename(final)
        except OSError:
            if not final.exists():
                raise
            # Another job generated the same corpus meanwhile (same size, seed and schema, so
            # the same bytes) and renamed its complete copy into place first: that one stands.
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(final)


def ray_train_dataset(
    url: str, cfg: DataConfig, split: str = "train", *, audio_sample_rate: int = 16000
) -> ray.data.Dataset:
    """The shards at ``url`` as a decoded Ray Dataset of one split, in one seeded random order
    (Ray repeats it on every pass; `jin_orchestrate.train.epoch_shuffle` mixes each epoch anew),
    audio resampled to ``audio_sample_rate`` (the model's, `JinModelConfig.audio_sample_rate`).

    Bad data is handled per ``cfg.on_error`` (see `jin_orchestrate.data_faults`): with "skip",
    jin-data leaves out the shards whose schema does not read, each logged with its row count.
    """
    dataset = read_ray_dataset(
        url,
        split=split,
        modalities=cfg.source_columns,
        on_error=cfg.on_error,
        audio_sample_rate=audio_sample_rate,
    )
    dataset = dataset.map_batches(FiniteCheck(cfg.on_error), batch_format="pyarrow")
    return dataset.random_shuffle(seed=cfg.seed) if cfg.shuffle_buffer else dataset


def ray_collate(cfg: DataConfig) -> Any:
    """The ``collate_fn`` for ``iter_torch_batches`` giving docs/CONVENTIONS.md batches of the
    source columns (see :func:`rename_columns` for modalities read from another column)."""
    return ray_collate_fn(cfg.source_columns)


def rename_columns(batch: dict[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    """A collated batch with each ``columns`` source (``custom``, ``custom_present``, ...) under
    its modality's name, as a runtime-added modality's encoder reads it."""
    if not columns:
        return batch
    out = dict(batch)
    for modality, column in columns.items():
        for suffix in ("", "_present", "_padding_mask"):
            if column + suffix in out:
                out[modality + suffix] = out.pop(column + suffix)
    return out
