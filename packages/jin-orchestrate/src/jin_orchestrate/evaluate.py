"""Zero-shot classification, cross-modal retrieval and linear probes of a checkpoint; its CLI.

# N samples, C classes (numbers), R retrieval width

- Zero-shot (the paper's Table 2 in miniature): images of numbers that never occur in the training
  split are classified among all numbers by their text prompts, averaged over NumberWorld's
  caption templates (CLIP's prompt ensembling). Chance is 1/C. The same for the held-out numbers'
  speech (CLAP's zero-shot audio classification), keys ``zero_shot_audio_*``.
- The text tower's own reading, keys ``zero_shot_text_*``: test captions classified by the same
  prompts. Every zero-shot figure compares another modality with these prompts, so how well the
  captions themselves find them is the reference those figures are bounded by in practice (a
  model whose text embeddings do not tell the numbers apart cannot classify anything by them).
- Retrieval (Table 3 in miniature), in every direction between text, audio, image and points:
  queries of one modality against a pool with one item per number (the mean embedding of that
  number's items in the other modality), so a 100-way pool when every number occurs, and against
  an instance pool of every test item, where only the query's own pair counts; R@1/5/10. Chance
  R@10 is 10/C and 10/N.
- Linear probe (the measure of Table 5): a logistic regression on frozen image embeddings of the
  train split, scored on the test items of numbers it was trained on.

    python -m jin_orchestrate.evaluate --checkpoint runs:/RUN_ID/final_checkpoint --data URL \
        [--json out.json] [--markdown out.md] [--plots DIR] [--run-id RUN_ID]

With ``--generation`` it scores cross-modal generation instead (the paper's Table 4 in
miniature, `jin_orchestrate.generation_eval`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import ValidationError

from jin_data import ShardDataset, ShardError, collate, list_shards
from jin_data.numberworld.text import CAPTION_TEMPLATES, number_words
from jin_orchestrate.checkpoint import CONFIG, CheckpointError, load_checkpoint, read_config
from jin_orchestrate.config import DataConfig
from jin_orchestrate.data import rename_columns
from jin_orchestrate.ema import apply_ema
from jin_orchestrate.metrics import (
    class_prototypes,
    linear_probe_accuracy,
    recall_at_k,
    zero_shot_accuracy,
)
from jin_orchestrate.model import JinModel, JinModelConfig

__all__ = [
    "RETRIEVAL_PAIRS",
    "Evaluation",
    "add_device_argument",
    "add_weights_argument",
    "device_choice",
    "embed_dataset",
    "evaluate",
    "evaluate_checkpoint",
    "evaluate_model",
    "format_summary",
    "load_model",
    "main",
    "prompt_embeddings",
    "weights_choice",
    "write_plots",
]

RETRIEVAL_MODALITIES = ("text", "audio", "image", "points")
ZERO_SHOT_BUILTIN_KEYS = (
    "zero_shot_top1_all_test",
    "zero_shot_audio_top1_all_test",
    "zero_shot_text_top1_all_test",
)
# Every ordered pair of the four, the paper's Table 3 directions (T->A, A->T) first.
RETRIEVAL_PAIRS = (
    ("text", "audio"),
    ("audio", "text"),
    ("text", "image"),
    ("image", "text"),
    ("text", "points"),
    ("points", "text"),
    ("image", "audio"),
    ("audio", "image"),
    ("image", "points"),
    ("points", "image"),
    ("audio", "points"),
    ("points", "audio"),
)


_WEIGHTS = {"auto": None, "ema": True, "raw": False}


def add_weights_argument(parser: argparse.ArgumentParser) -> None:
    """``--weights auto|ema|raw``, read back by :func:`weights_choice` (evaluate, generate)."""
    parser.add_argument(
        "--weights",
        choices=list(_WEIGHTS),
        default="auto",
        help="which weights to load: ema (the average of the trained weights, train.weight_ema), "
        "raw (the last optimiser step's), auto (ema where the checkpoint kept one)",
    )


def weights_choice(args: argparse.Namespace) -> bool | None:
    """The ``ema`` argument of :func:`load_model` for ``--weights``."""
    return _WEIGHTS[args.weights]


def add_device_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--device cpu|cuda[:N]`` (default cpu), read back by :func:`device_choice`."""
    parser.add_argument(
        "--device", default="cpu", help=f"cpu (the default), cuda, cuda:1, ...: {what}"
    )


def device_choice(args: argparse.Namespace) -> torch.device:
    """``--device``, checked: a device string torch knows, on a device this machine has;
    `ValueError` naming the flag otherwise."""
    name = args.device
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: expected cpu or cuda[:N]")
    return device


def load_model(
    checkpoint: str | Path, *, ema: bool | None = None, device: str | torch.device = "cpu"
) -> JinModel:
    """A JinModel built from a checkpoint's stored config, with its weights, in eval mode.

    ``ema``: None loads the average of the trained weights where the checkpoint kept one
    (``train.weight_ema``; `jin_orchestrate.ema`), True requires it, False loads the last step's.
    ``device``: where the model is put (it moves the batches it is given there itself).
    """
    cfg = JinModelConfig.model_validate(read_config(checkpoint)["model"])
    model = JinModel(cfg)
    loaded = load_checkpoint(checkpoint, model, load_optimizer=False)
    if ema and loaded.ema is None:
        raise CheckpointError(
            f"{checkpoint}: no averaged weights (ema.safetensors); it was trained with "
            "train.weight_ema 0"
        )
    if ema is not False and loaded.ema is not None:
        apply_ema(model, loaded.ema)
    return model.to(device).eval()


def _stored_data_config(checkpoint: str | Path) -> DataConfig:
    """The data config ``checkpoint`` was trained with (the default where it records none): what
    :func:`evaluate` needs to give runtime-added modalities (``extend``) their rows and to treat
    bad rows as training did (``data.on_error``), as pretraining's own evaluation does."""
    try:
        return DataConfig.model_validate(read_config(checkpoint).get("data", {}))
    except ValidationError as err:
        raise CheckpointError(f"{Path(checkpoint) / CONFIG}: data: {err}") from None


def _train_labels(url: str, on_error: str = "raise") -> set[int]:
    fs, shards = list_shards(url, on_error)
    labels: set[int] = set()
    for shard in shards:
        try:
            with fs.open(shard.path, "rb") as f:
                table = pq.read_table(f, columns=["label", "split"])
        except (OSError, pa.ArrowException) as err:
            if on_error == "skip":  # the data path skipped (and counted) this shard already
                continue
            raise ShardError(f"cannot read labels: {err}", url=shard.url) from None
        mask = np.asarray(table["split"].to_numpy(zero_copy_only=False) == "train")
        # A row without a label (null; -1 in a batch) names no number.
        numbers = np.asarray(table["label"].fill_null(-1).to_numpy(zero_copy_only=False))
        labels.update(int(x) for x in numbers[mask & (numbers >= 0)])
    return labels


@torch.no_grad()
def embed_dataset(
    model: torch.nn.Module,
    url: str,
    split: str | list[str],
    modalities: list[str],
    batch_size: int = 64,
    columns: Mapping[str, str] | None = None,
    on_error: str = "raise",
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Embeddings ``(N, R)`` float32 on the CPU per modality of the samples of ``split`` (the model
    may be on an accelerator), and labels ``(N,)`` (-1: none).

    ``columns`` maps a modality to the column it is read from where the names differ;
    ``on_error`` is jin-data's (``"skip"`` leaves out what does not read or decode). A sample
    that lacks a modality still has a row (the embedding of nothing); :func:`evaluate` scores
    only the samples that have it.
    """
    emb, _, labels = _embed_split(model, url, split, modalities, batch_size, columns, on_error)
    return emb, labels


def _embed_split(
    model: torch.nn.Module,
    url: str,
    split: str | list[str],
    modalities: list[str],
    batch_size: int = 64,
    columns: Mapping[str, str] | None = None,
    on_error: str = "raise",
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """:func:`embed_dataset`'s embeddings, each modality's ``(N,)`` bool of the samples that have
    it (jin-data's ``<modality>_present``), and the labels."""
    columns = dict(columns or {})
    data = ShardDataset(
        url,
        batch_size=batch_size,
        shuffle=False,
        split=split,
        modalities=[columns.get(m, m) for m in modalities],
        rank=0,
        world_size=1,
        on_error=on_error,
        # Decoded at the rate the model's audio encoder reads, as in training.
        audio_sample_rate=getattr(model, "audio_sample_rate", 16000),
    )
    chunks: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    present: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    labels = []
    for batch in data:
        renamed = rename_columns(batch, columns)
        emb = model.embed(renamed)
        for m in modalities:
            chunks[m].append(emb[m].float().cpu())
            rows = renamed.get(f"{m}_present")
            present[m].append(
                torch.ones(len(batch["label"]), dtype=torch.bool) if rows is None else rows.cpu()
            )
        labels.append(batch["label"])
    if not labels:  # no row of ``split`` (a data set without test rows, say)
        return (
            {m: torch.empty(0, 0) for m in modalities},
            {m: torch.empty(0, dtype=torch.bool) for m in modalities},
            torch.empty(0, dtype=torch.long),
        )
    return (
        {m: torch.cat(v) for m, v in chunks.items()},
        {m: torch.cat(v) for m, v in present.items()},
        torch.cat(labels),
    )


@torch.no_grad()
def prompt_embeddings(model: torch.nn.Module, numbers: list[int]) -> torch.Tensor:
    """One text embedding per number (float32, on the CPU): the normalised mean over every caption
    template."""
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
    emb = model.embed(collate(table, ["text"]))["text"].float().cpu()
    emb = emb.view(len(numbers), len(CAPTION_TEMPLATES), -1)
    return torch.nn.functional.normalize(emb.mean(dim=1), dim=-1)


@dataclass
class Evaluation:
    """A model's figures and the test-split embeddings ``(N, R)`` they came from (for plots);
    ``present``: each modality's ``(N,)`` bool of the samples that have it (default: all)."""

    metrics: dict[str, float]
    embeddings: dict[str, torch.Tensor]
    labels: torch.Tensor
    present: dict[str, torch.Tensor] = field(default_factory=dict)


def evaluate_checkpoint(checkpoint: str | Path, url: str, data_cfg: Any = None) -> dict[str, float]:
    """Zero-shot, retrieval and linear-probe figures of ``checkpoint`` on ``url``; ``data_cfg``
    defaults to the data config the checkpoint records, as in the CLI."""
    if data_cfg is None:
        data_cfg = _stored_data_config(checkpoint)
    return evaluate_model(load_model(checkpoint), url, data_cfg)


def evaluate_model(
    model: torch.nn.Module,
    url: str,
    data_cfg: Any = None,
    *,
    probe_modalities: Sequence[str] = ("image",),
) -> dict[str, float]:
    """Zero-shot, retrieval and linear-probe figures of ``model`` (see :func:`evaluate`)."""
    return evaluate(model, url, data_cfg, probe_modalities=probe_modalities).metrics


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    url: str,
    data_cfg: Any = None,
    *,
    probe_modalities: Sequence[str] = ("image",),
) -> Evaluation:
    """Every figure of the module docstring for ``model`` on the test split of ``url``.

    ``model`` is a :class:`JinModel` or anything with its ``cfg`` and ``embed`` (the baselines of
    :mod:`jin_orchestrate.baselines`). Keys: ``zero_shot_*`` (Table 2), ``retrieval/Q_to_P/Rk``
    over class prototypes and ``retrieval_instance/Q_to_P/Rk`` over every test item (Table 3),
    ``linear_probe/M_top1`` on frozen embeddings of modality M (Table 5's measure). A figure
    the data cannot give is left out: data without test rows gives ``test_samples`` 0 alone,
    unlabelled data no zero-shot, prototype or probe figure.
    """
    model.eval()
    modalities = [m for m in model.cfg.builtin_modalities if m in RETRIEVAL_MODALITIES]
    columns: dict[str, str] = {}
    on_error = "raise" if data_cfg is None else data_cfg.on_error
    if data_cfg is not None:
        modalities = [m for m in modalities if m in data_cfg.modalities]
        # Runtime-added modalities the data feeds (jin_orchestrate.extend records their column).
        extra = getattr(model.cfg, "extra_modalities", {})
        columns = {m: c for m, c in data_cfg.columns.items() if m in extra}
        modalities += list(columns)
    emb, present, labels = _embed_split(
        model, url, "test", modalities, columns=columns, on_error=on_error
    )
    result: dict[str, float] = {"test_samples": float(len(labels))}
    if not len(labels):  # nothing to score: split and label are optional (README, extend)
        return Evaluation(result, emb, labels, present)
    if "text" in emb:
        seen = _train_labels(url, on_error)
        result.update(_zero_shot(model, emb, labels, seen, list(columns), present))
    pairs = [*((m, "text") for m in columns), *(("text", m) for m in columns)]
    result.update(_retrieval(emb, labels, [*RETRIEVAL_PAIRS, *pairs], present))
    probed = [m for m in probe_modalities if m in emb]
    if probed:
        train_emb, train_present, train_labels = _embed_split(
            model, url, "train", probed, on_error=on_error
        )
        for m in probed:
            # Only samples that have the modality and a label (-1: none) train or test a probe,
            # and only where there is one to fit (two classes) and to score (a test sample of one
            # of them): unlabelled data has no probe, as it has no zero-shot figure.
            fit = train_present[m] & (train_labels >= 0)
            test = present[m] & (labels >= 0)
            classes = train_labels[fit].unique()
            if classes.numel() < 2 or not torch.isin(labels[test], classes).any():
                continue
            probe = linear_probe_accuracy(
                train_emb[m][fit], train_labels[fit], emb[m][test], labels[test]
            )
            result[f"linear_probe/{m}_top1"] = probe.accuracy
            result[f"linear_probe/{m}_samples"] = float(probe.samples)
            result[f"linear_probe/{m}_classes"] = float(probe.classes)
    return Evaluation(result, emb, labels, present)


def _zero_shot(
    model: torch.nn.Module,
    emb: dict[str, torch.Tensor],
    labels: torch.Tensor,
    seen: set[int],
    extra: Sequence[str] = (),
    present: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Images (CLIP), speech (CLAP), runtime modalities ``extra`` and the captions themselves (the
    text tower's reading) of held-out numbers against every number's prompts; and every test
    sample against them (``*_all_test``). Only samples with a label (-1: none) and, per
    modality, those that have it (``present``, default all) are scored."""
    numbers = list(range(100))
    classes = prompt_embeddings(model, numbers)
    labelled = labels >= 0
    held_out = torch.tensor([int(x) not in seen for x in labels], dtype=torch.bool) & labelled
    result: dict[str, float] = {}
    named = [
        ("image", "zero_shot"),
        ("audio", "zero_shot_audio"),
        *((m, f"zero_shot_{m}") for m in extra),
        ("text", "zero_shot_text"),
    ]
    for name, prefix in named:
        if name not in emb:
            continue
        has = labelled if present is None or name not in present else present[name] & labelled
        if not has.any():
            continue
        rows = held_out & has
        if rows.any():
            acc = zero_shot_accuracy(emb[name][rows], labels[rows], classes, torch.tensor(numbers))
            result.update(
                {
                    f"{prefix}_top1": acc[1],
                    f"{prefix}_top5": acc[5],
                    f"{prefix}_samples": float(rows.sum()),
                    f"{prefix}_chance": 1 / len(numbers),
                }
            )
        acc_all = zero_shot_accuracy(
            emb[name][has], labels[has], classes, torch.tensor(numbers), ks=(1, 10)
        )
        result[f"{prefix}_top1_all_test"] = acc_all[1]
        result[f"{prefix}_top10_all_test"] = acc_all[10]
    return result


def _retrieval(
    emb: dict[str, torch.Tensor],
    labels: torch.Tensor,
    directions: Sequence[tuple[str, str]] = RETRIEVAL_PAIRS,
    present: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """R@1/5/10 against class prototypes (one per number) and against every test item.

    In the instance pool only a query's own paired item counts (AudioCaps scoring), although
    other items of the same number are as good a match: it is the stricter measure.

    Only samples that have a modality (``present``, default all) are its queries or candidates;
    prototypes are built from labelled samples (-1: no label) and queried by the labelled samples
    of a number that has one; instance queries are the samples whose own pair is in the pool.
    """
    result: dict[str, float] = {}
    pairs = torch.arange(len(labels))
    labelled = labels >= 0
    everyone = torch.ones(len(labels), dtype=torch.bool)
    has = {m: everyone if present is None or m not in present else present[m] for m in emb}
    for query, pool in directions:
        if query not in emb or pool not in emb:
            continue
        candidates = has[pool] & labelled
        if candidates.any():
            protos, proto_labels = class_prototypes(emb[pool][candidates], labels[candidates])
            rows = has[query] & labelled & torch.isin(labels, proto_labels)
            if rows.any():
                recall = recall_at_k(emb[query][rows], protos, labels[rows], proto_labels)
                for k, v in recall.items():
                    result[f"retrieval/{query}_to_{pool}/R{k}"] = v
        rows = has[query] & has[pool]
        if rows.any():
            pool_rows = has[pool]
            recall = recall_at_k(
                emb[query][rows], emb[pool][pool_rows], pairs[rows], pairs[pool_rows]
            )
            for k, v in recall.items():
                result[f"retrieval_instance/{query}_to_{pool}/R{k}"] = v
        result["retrieval_pool"] = float(labels[labelled].unique().numel())
        result["retrieval_instance_pool"] = float(len(labels))
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
    # Runtime-added modalities: every test sample against 100 prompts; beside them, what the
    # anchor's own captions achieve against the same prompts (their reference).
    rows = [(name, f"{name}→text prompts") for name in extra]
    if extra and "zero_shot_text_top1_all_test" in result:
        rows.append(("text", "reference: text captions→text prompts"))
    for name, what in rows:
        for k in (1, 10):
            lines.append(
                f"| {what}, test samples, R@{k} (100-way) | "
                f"{result[f'zero_shot_{name}_top{k}_all_test']:.1%} | {k / 100:.1%} |"
            )
    for prefix, what in (
        ("zero_shot", "images"),
        ("zero_shot_audio", "speech"),
        *((f"zero_shot_{m}", m) for m in extra),
        ("zero_shot_text", "captions (reference: the text tower's own reading)"),
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


def write_plots(evaluation: Evaluation, directory: str | Path, prefix: str = "") -> list[Path]:
    """The text×audio similarity matrix and the PCA map of ``evaluation``'s embeddings, as PNGs.

    Samples that lack a modality (their embedding is a zero vector) are left out of its plots,
    and the similarity matrix reads only the numbered samples that have both text and audio.
    """
    from jin_orchestrate.plots import embedding_projection, similarity_matrix

    directory = Path(directory)
    emb, labels, present = evaluation.embeddings, evaluation.labels, evaluation.present
    everyone = torch.ones(len(labels), dtype=torch.bool)
    has = {m: present.get(m, everyone) for m in emb}
    paths = []
    if "text" in emb and "audio" in emb:
        rows = has["text"] & has["audio"] & (labels >= 0)
        if rows.any():
            paths.append(
                similarity_matrix(
                    emb["text"][rows],
                    emb["audio"][rows],
                    labels[rows],
                    directory / f"{prefix}text_audio_similarity.png",
                )
            )
    if any(rows.any() for rows in has.values()):
        paths.append(
            embedding_projection(
                emb, labels, directory / f"{prefix}embeddings_pca.png", present=has
            )
        )
    return paths


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jin_orchestrate.evaluate",
        description="The paper's Tables 2 and 3 and the image linear probe, for one checkpoint.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint directory, or runs:/RUN_ID/final_checkpoint, models:/NAME/VERSION",
    )
    p.add_argument(
        "--data", required=True, help="fsspec URL of jin-data shards (train and test splits)"
    )
    p.add_argument("--json", type=Path, help="write the figures (and the paper's) as JSON here")
    p.add_argument("--markdown", type=Path, help="write the tables here (always printed)")
    p.add_argument("--plots", type=Path, help="directory for the PNG plots")
    p.add_argument(
        "--run-id",
        help="MLflow run to log the figures, tables and plots to "
        "($MLFLOW_TRACKING_URI, else ./mlflow.db)",
    )
    add_weights_argument(p)
    add_device_argument(
        p,
        "where the model embeds (and, with --generation, generates); the figures are "
        "computed on the CPU either way",
    )
    gen = p.add_argument_group(
        "generation", "--generation: the paper's Table 4 in miniature instead of Tables 2 and 3"
    )
    gen.add_argument(
        "--generation",
        action="store_true",
        help="score cross-modal generation (probe-FD, conditioning accuracy, caption "
        "exact-match); needs a checkpoint with generation heads",
    )
    gen.add_argument("--samples", type=int, default=100, help="generated samples per direction")
    gen.add_argument("--ddim-steps", type=int, default=50)
    gen.add_argument("--guidance", type=float, default=3.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="the split generated from and scored; val chooses guidance or DDIM steps without "
        "the test items (logged as eval/val/...)",
    )
    gen.add_argument("--images", type=Path, help="directory for PNGs of generated images")
    return p


def _generation_main(args: argparse.Namespace, model: JinModel) -> int:
    """``--generation``: Table 4 in miniature, printed, written and logged like the others."""
    from jin_orchestrate.generation_eval import evaluate_generation, format_generation
    from jin_orchestrate.tables import write_atomic, write_json
    from jin_orchestrate.tracking import default_tracking_uri

    if model.generation is None:
        print(
            f"error: --generation: {args.checkpoint} has no generation heads; fine-tune it with "
            "python -m jin_orchestrate.generate train",
            file=sys.stderr,
        )
        return 2
    scores = evaluate_generation(
        model,
        args.data,
        samples=args.samples,
        steps=args.ddim_steps,
        guidance=args.guidance,
        seed=args.seed,
        image_dir=args.images,
        split=args.split,
    )
    markdown = format_generation(scores)
    print(markdown)
    if args.json:
        write_json(args.json, {"checkpoint": str(args.checkpoint), "generation": scores})
    if args.markdown:
        write_atomic(args.markdown, markdown + "\n")
    if args.run_id:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=default_tracking_uri())
        prefix = "eval/" if args.split == "test" else f"eval/{args.split}/"
        for key, value in scores.items():
            if isinstance(value, float):
                client.log_metric(args.run_id, prefix + key, value)
        name = "generation.md" if args.split == "test" else f"generation_{args.split}.md"
        client.log_text(args.run_id, markdown, f"evaluation/{name}")
        print(f"logged to MLflow run {args.run_id}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Evaluate a checkpoint; print the tables; write JSON / Markdown / plots; log to MLflow."""
    import tempfile

    from jin_orchestrate.tables import PUBLISHED, evaluation_markdown, write_atomic, write_json
    from jin_orchestrate.tracking import default_tracking_uri, local_checkpoint

    args = _parser().parse_args(argv)
    try:
        checkpoint = local_checkpoint(args.checkpoint)
        list_shards(args.data)
        model = load_model(checkpoint, ema=weights_choice(args), device=device_choice(args))
        data_cfg = _stored_data_config(checkpoint)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:  # a bad row (on_error="raise") or --generation argument: named, exit 2, as embed does
        if args.generation:
            return _generation_main(args, model)
        evaluation = evaluate(model, args.data, data_cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    markdown = evaluation_markdown({"this checkpoint": evaluation.metrics})
    print(markdown)
    report = {
        "checkpoint": str(args.checkpoint),
        "data": args.data,
        "metrics": evaluation.metrics,
        "published_for_context": PUBLISHED,
    }
    if args.json:
        write_json(args.json, report)
    if args.markdown:
        write_atomic(args.markdown, markdown + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        plots = write_plots(evaluation, args.plots or tmp)
        if args.run_id:
            import mlflow

            client = mlflow.MlflowClient(tracking_uri=default_tracking_uri())
            run_id = args.run_id
            for key, value in evaluation.metrics.items():
                client.log_metric(run_id, f"eval/{key}", value)
            client.log_text(run_id, markdown, "evaluation/paper_tables.md")
            client.log_dict(run_id, report, "evaluation/paper_tables.json")
            for path in plots:
                client.log_artifact(run_id, str(path), "evaluation")
            print(f"logged to MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
