"""``python -m jin_orchestrate.extend``: add a modality to a trained model without retraining it.

The paper's §3.6 as one command. It loads a checkpoint (a directory or an MLflow URI), registers a
new ``CustomModalityEncoder`` modality (the modality-embedding table grows by one row), freezes
everything that existed and trains only the new encoder, its row and its retrieval projection,
aligned to the existing modalities by InfoNCE and cross-modal prediction
(`jin_orchestrate.extension`). It runs as a one-stage Ray Train job through the same machinery as
pretraining: MLflow parent and stage runs, checkpoints, ``--resume``, worker-failure recovery, the
closing evaluation. The new checkpoint's config records the modality (``model.extra_modalities``)
and the column it reads (``data.columns``), so evaluate, embed and Serve use it as they are.

Worked example, NumberWorld's seven-segment vectors (14 features) as a new "sensor"::

    python -m jin_orchestrate.extend --checkpoint runs:/<run id>/final_checkpoint \\
        --modality seven_segment --encoder custom --input-dim 14 --column custom
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import pyarrow.parquet as pq

__all__ = ["build_extension_config", "main", "trainable_parameters"]

NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def _parser() -> argparse.ArgumentParser:
    from jin_orchestrate.pretrain import add_job_arguments

    p = argparse.ArgumentParser(
        prog="python -m jin_orchestrate.extend",
        description="Add a modality to a trained Jin model, training only its own parameters.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint directory or runs:/RUN_ID/final_checkpoint"
    )
    p.add_argument("--modality", required=True, help="the new modality's name, e.g. imu")
    p.add_argument(
        "--encoder",
        default="custom",
        choices=["custom"],
        help="encoder of the new modality: custom = a linear projection per feature vector",
    )
    p.add_argument("--input-dim", type=int, required=True, help="features per vector (F)")
    p.add_argument(
        "--column",
        default="custom",
        help="the jin-data column holding the vectors (list<float32> of F values)",
    )
    p.add_argument(
        "--data", help="fsspec URL of jin-data shards (default: the checkpoint's own corpus)"
    )
    p.add_argument(
        "--align-with",
        help="comma-separated modalities to align with (default: text, the hub, when the "
        "checkpoint has it; else all it trained on)",
    )
    p.add_argument("--steps", type=int, default=600, help="optimiser steps")
    p.add_argument("--lr", type=float, default=5e-3, help="peak learning rate")
    p.add_argument(
        "--batch-size",
        type=int,
        help="global batch, InfoNCE's negatives (default: the checkpoint's train.batch_size)",
    )
    p.add_argument("--gamma", type=float, default=1.0, help="weight of InfoNCE (Eq. 6)")
    p.add_argument("--beta", type=float, default=0.25, help="weight of cross-modal prediction")
    add_job_arguments(p, experiment="jin-extend")
    return p


def build_extension_config(
    base: dict[str, Any],
    *,
    modality: str,
    input_dim: int,
    column: str,
    steps: int,
    lr: float,
    batch_size: int | None = None,
    gamma: float = 1.0,
    beta: float = 0.25,
    align_with: list[str] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Any:
    """The `JinConfig` of an extension job from the ``config.json`` of the checkpoint it extends.

    The model gains ``modality`` (``model.extra_modalities``), the data reads it from ``column``
    (``data.columns``) beside every modality the checkpoint read (but one an earlier extension
    read from ``column``), and the curriculum is one stage that trains ``modality`` alone, aligned
    with ``align_with`` (default: text, the hub, when the checkpoint trained on it, else all it
    trained on). ``overrides`` (``--set``) apply last.
    """
    from jin_orchestrate.config import JinConfig, resolve_config
    from jin_orchestrate.model import HUB

    if not NAME.fullmatch(modality):  # `$` of match() would pass a final newline
        raise ValueError(
            f"--modality {modality!r}: expected a lower-case identifier of at most 32 characters "
            "(letters, digits, _)"
        )
    cfg = JinConfig.model_validate(base)
    if modality in cfg.model.modalities:
        raise ValueError(
            f"--modality {modality!r}: the model already has it ({cfg.model.modalities})"
        )
    anchors = align_with
    if anchors is None:
        # Text is the hub of pretraining's alignment; aligning with the weaker modalities as well
        # pulls the new one toward their noise (seven-segment on a 480-step base, 100-way R@10
        # to the text prompts: 34% aligned with all four, 41% with text alone; README).
        anchors = [HUB] if HUB in cfg.data.modalities else list(cfg.data.modalities)
    unknown = [m for m in anchors if m not in cfg.model.modalities]
    if unknown or not anchors:
        raise ValueError(
            f"--align-with {anchors}: expected some of the model's modalities "
            f"{cfg.model.modalities}"
        )
    # One column feeds one modality: a modality an earlier extension read from ``column`` keeps
    # its weights, but this job's data feeds the column to the new modality.
    earlier = [m for m, c in cfg.data.columns.items() if c == column]
    clash = [m for m in anchors if m in earlier]
    if clash:
        raise ValueError(
            f"--align-with {clash}: read from the column {column!r}, which feeds --modality "
            f"{modality!r} in this job"
        )
    data = cfg.model_dump(mode="json")
    data["model"]["extra_modalities"][modality] = {"dim": cfg.model.dim, "input_dim": input_dim}
    # The data keeps every other modality the checkpoint read, so the closing evaluation and
    # later `evaluate` runs still cover them; only the anchors run through the model in training.
    kept = [m for m in cfg.data.modalities if m not in earlier]
    data["data"]["modalities"] = [*dict.fromkeys([*kept, *anchors]), modality]
    data["data"]["columns"] = {
        **{m: c for m, c in cfg.data.columns.items() if m not in earlier},
        modality: column,
    }
    data["stages"] = [
        {
            "name": f"extend_{modality}",
            "steps": steps,
            "alpha": 0.0,
            "beta": beta,
            "gamma": gamma,
            "lr": lr,
            "trainable": [modality],
            "align_with": anchors,
        }
    ]
    data["train"]["warmup_steps"] = min(cfg.train.warmup_steps, max(1, steps // 10))
    if batch_size is not None:
        data["train"]["batch_size"] = batch_size
    return resolve_config(data, overrides=overrides)


def check_column(url: str, column: str, input_dim: int) -> None:
    """Fail early, naming the file, if the data's ``column`` does not hold ``input_dim`` values."""
    from jin_data import list_shards
    from jin_data.schema import check_schema

    fs, shards = list_shards(url)
    with fs.open(shards[0].path, "rb") as f:
        info = check_schema(pq.read_schema(f), shards[0].url)
    if column == "custom" and info.custom_dim != input_dim:
        raise ValueError(
            f"--input-dim {input_dim}: the column {column!r} of {shards[0].url} holds "
            f"{info.custom_dim} values per row"
        )


def trainable_parameters(cfg: Any) -> tuple[int, int]:
    """Parameters an extension stage trains, and all of the model's (EMA copy excluded)."""
    import torch

    from jin_orchestrate.model import JinModel

    with torch.device("meta"):
        model = JinModel(cfg.model)
    model.freeze_except(cfg.stages[0].trainable)
    params = [(n, p) for n, p in model.named_parameters() if not n.startswith("target.")]
    return sum(p.numel() for _, p in params if p.requires_grad), sum(p.numel() for _, p in params)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, build the extension config, run the job, print what it reached and cost."""
    from jin_orchestrate.pretrain import checkpoint_source, job_overrides, run_job_from_checkpoint

    args = _parser().parse_args(argv)
    try:
        source, base, url = checkpoint_source(args)
        check_column(url, args.column, args.input_dim)
        cfg = build_extension_config(
            base,
            modality=args.modality,
            input_dim=args.input_dim,
            column=args.column,
            steps=args.steps,
            lr=args.lr,
            batch_size=args.batch_size,
            gamma=args.gamma,
            beta=args.beta,
            align_with=args.align_with.split(",") if args.align_with else None,
            overrides=job_overrides(args),
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    trainable, total = trainable_parameters(cfg)
    print(
        f"[jin] extending {args.checkpoint} with {args.modality!r} from column {args.column!r}: "
        f"training {trainable:,} of {total:,} parameters ({trainable / total:.3%})",
        flush=True,
    )
    return run_job_from_checkpoint(
        cfg, args, url, source, [f"trainable      {trainable:,} of {total:,} parameters"]
    )


if __name__ == "__main__":
    sys.exit(main())
