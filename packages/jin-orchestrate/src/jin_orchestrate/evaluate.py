"""Zero-shot classification and cross-modal retrieval of a checkpoint on held-out data.

# N samples, C classes (numbers), R retrieval width

- Zero-shot (the paper's Table 2 in miniature): images of numbers that never occur in the training
  split are classified among all numbers by their text prompts, averaged over NumberWorld's
  caption templates (CLIP's prompt ensembling). Chance is 1/C. The same for the held-out numbers'
  speech (CLAP's zero-shot audio classification), keys ``zero_shot_audio_*``.
- Retrieval (Table 3 in miniature): queries of one modality against a pool with one item per
  number (the mean embedding of that number's items in the other modality), so a 100-way pool
  when every number occurs; R@1/5/10. Chance R@10 is 10/C.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from jin_data import ShardDataset, collate, list_shards
from jin_data.numberworld.text import CAPTION_TEMPLATES, number_words
from jin_orchestrate.checkpoint import load_checkpoint, read_config
from jin_orchestrate.data import rename_columns
from jin_orchestrate.metrics import class_prototypes, recall_at_k, zero_shot_accuracy
from jin_orchestrate.model import JinModel, JinModelConfig

__all__ = [
    "embed_dataset",
    "evaluate_checkpoint",
    "format_summary",
    "load_model",
    "prompt_embeddings",
]

ZERO_SHOT_BUILTIN_KEYS = ("zero_shot_top1_all_test", "zero_shot_audio_top1_all_test")
RETRIEVAL_PAIRS = (
    ("text", "audio"),
    ("audio", "text"),
    ("text", "image"),
    ("image", "text"),
    ("text", "points"),
    ("points", "text"),
    ("image", "audio"),
    ("audio", "image"),
)


def load_model(checkpoint: str | Path) -> JinModel:
    """A JinModel built from a checkpoint's stored config, with its weights, in eval mode."""
    cfg = JinModelConfig.model_validate(read_config(checkpoint)["model"])
    model = JinModel(cfg)
    load_checkpoint(checkpoint, model, load_optimizer=False)
    return model.eval()


def _train_labels(url: str) -> set[int]:
    fs, shards = list_shards(url)
    labels: set[int] = set()
    for shard in shards:
        with fs.open(shard.path, "rb") as f:
            table = pq.read_table(f, columns=["label", "split"])
        mask = np.asarray(table["split"].to_numpy(zero_copy_only=False) == "train")
        labels.update(
            int(x) for x in np.asarray(table["label"].to_numpy(zero_copy_only=False))[mask]
        )
    return labels


@torch.no_grad()
def embed_dataset(
    model: JinModel,
    url: str,
    split: str | list[str],
    modalities: list[str],
    batch_size: int = 64,
    columns: Mapping[str, str] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Embeddings ``(N, R)`` per modality of the samples of ``split``, and labels ``(N,)``.

    ``columns`` maps a modality to the column it is read from where the names differ.
    """
    columns = dict(columns or {})
    data = ShardDataset(
        url,
        batch_size=batch_size,
        shuffle=False,
        split=split,
        modalities=[columns.get(m, m) for m in modalities],
        rank=0,
        world_size=1,
    )
    chunks: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    labels = []
    for batch in data:
        emb = model.embed(rename_columns(batch, columns))
        for m in modalities:
            chunks[m].append(emb[m])
        labels.append(batch["label"])
    return {m: torch.cat(v) for m, v in chunks.items()}, torch.cat(labels)


@torch.no_grad()
def prompt_embeddings(model: JinModel, numbers: list[int]) -> torch.Tensor:
    """One text embedding per number: the normalised mean over every caption template."""
    texts = [
        t.format(digits=str(n), words=number_words(n)) for n in numbers for t in CAPTION_TEMPLATES
    ]
    table = pa.table(
        {
            "id": [str(i) for i in range(len(texts))],
            "split": ["eval"] * len(texts),
            "label": pa.array([-1] * len(texts), pa.int64()),
            "text": texts,
        }
    )
    emb = model.embed(collate(table, ["text"]))["text"].view(
        len(numbers), len(CAPTION_TEMPLATES), -1
    )
    return torch.nn.functional.normalize(emb.mean(dim=1), dim=-1)


def evaluate_checkpoint(checkpoint: str | Path, url: str, data_cfg: Any = None) -> dict[str, float]:
    """Zero-shot and retrieval figures of ``checkpoint`` on the test split of ``url``."""
    return evaluate_model(load_model(checkpoint), url, data_cfg)


@torch.no_grad()
def evaluate_model(model: JinModel, url: str, data_cfg: Any = None) -> dict[str, float]:
    """Zero-shot and retrieval figures of ``model`` on the test split of ``url``."""
    model.eval()
    modalities = [
        m for m in model.cfg.builtin_modalities if m in ("text", "image", "audio", "points")
    ]
    columns: dict[str, str] = {}
    if data_cfg is not None:
        modalities = [m for m in modalities if m in data_cfg.modalities]
        # Runtime-added modalities the data feeds (jin_orchestrate.extend records their column).
        columns = {m: c for m, c in data_cfg.columns.items() if m in model.cfg.extra_modalities}
        modalities += list(columns)
    emb, labels = embed_dataset(model, url, "test", modalities, columns=columns)
    seen = _train_labels(url)
    numbers = list(range(100))
    result: dict[str, float] = {"test_samples": float(len(labels))}
    if "text" in emb:
        classes = prompt_embeddings(model, numbers)
        held_out = torch.tensor([int(x) not in seen for x in labels])
        zero_shot = [("image", "zero_shot"), ("audio", "zero_shot_audio")]
        zero_shot += [(m, f"zero_shot_{m}") for m in columns]
        for name, prefix in zero_shot:
            if name not in emb:
                continue
            if held_out.any():
                acc = zero_shot_accuracy(
                    emb[name][held_out], labels[held_out], classes, torch.tensor(numbers)
                )
                result.update(
                    {
                        f"{prefix}_top1": acc[1],
                        f"{prefix}_top5": acc[5],
                        f"{prefix}_samples": float(held_out.sum()),
                        f"{prefix}_chance": 1 / len(numbers),
                    }
                )
            acc_all = zero_shot_accuracy(
                emb[name], labels, classes, torch.tensor(numbers), ks=(1, 10)
            )
            result[f"{prefix}_top1_all_test"] = acc_all[1]
            result[f"{prefix}_top10_all_test"] = acc_all[10]
    pairs = [*RETRIEVAL_PAIRS, *((m, "text") for m in columns), *(("text", m) for m in columns)]
    for query, pool in pairs:
        if query in emb and pool in emb:
            protos, proto_labels = class_prototypes(emb[pool], labels)
            r = recall_at_k(emb[query], protos, labels, proto_labels)
            for k, v in r.items():
                result[f"retrieval/{query}_to_{pool}/R{k}"] = v
            result["retrieval_pool"] = float(len(proto_labels))
    return result


def format_summary(result: dict[str, float]) -> str:
    """The closing table of a job, in Markdown."""
    lines = ["| measure | value | chance |", "| --- | --- | --- |"]
    pool = result.get("retrieval_pool", 100.0)
    extra = [
        k[len("zero_shot_") : -len("_top1_all_test")]
        for k in result
        if k.endswith("_top1_all_test") and k not in ZERO_SHOT_BUILTIN_KEYS
    ]
    for name in extra:  # runtime-added modalities: every test sample against 100 prompts
        for k in (1, 10):
            lines.append(
                f"| {name}→text prompts, test samples, R@{k} (100-way) | "
                f"{result[f'zero_shot_{name}_top{k}_all_test']:.1%} | {k / 100:.1%} |"
            )
    for prefix, what in (
        ("zero_shot", "images"),
        ("zero_shot_audio", "speech"),
        *((f"zero_shot_{m}", m) for m in extra),
    ):
        if f"{prefix}_top1" not in result:
            continue
        n = int(result[f"{prefix}_samples"])
        lines.append(
            f"| zero-shot top-1, {what} of held-out numbers ({n}, 100-way) | "
            f"{result[f'{prefix}_top1']:.1%} | 1.0% |"
        )
        lines.append(
            f"| zero-shot top-5, {what} of held-out numbers | {result[f'{prefix}_top5']:.1%} "
            "| 5.0% |"
        )
    for key in result:
        if key.startswith("retrieval/") and key.endswith("/R10"):
            query, target = key.split("/")[1].split("_to_")
            lines.append(
                f"| R@10 {query}→{target} ({int(pool)}-way) | {result[key]:.1%} | "
                f"{min(1.0, 10 / pool):.1%} |"
            )
    return "\n".join(lines)
