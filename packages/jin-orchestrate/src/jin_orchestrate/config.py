"""``JinConfig``: the whole job's configuration, its size presets, and ``python -m ...config``.

A config is layered: a preset (below), then a YAML/JSON file, then ``--set path.to.key=value``
overrides; the result is validated by pydantic and every error names the key. A preset fixes few
dials — width, depth, experts, context — and derives the rest (heads of 128 (64 below width 1024)
channels, SwiGLU experts of hidden ``4·dim``, predictor at a third of the width), as nanochat does.

Preset sizes and the tables they reproduce (total parameters, counted on the meta device by
``python -m jin_orchestrate.config show PRESET``; the backbone holds almost all of them):

=========  ======================  ====  ======  =======  =====  ========
preset     table                   dim   layers  experts  top-k  context
=========  ======================  ====  ======  =======  =====  ========
jin-nano   paper Table 1: 1B       1152  6       8        2      32K
jin-base   paper Table 1: 7B       1664  12      16       2      128K
jin-large  paper Table 1: 70B      1920  24      64       2      128K
jin-pro    ZIP-0408: 72B, 256K     2432  32      32       2      256K
jin-max    ZIP-0408: 480B, 1M      2560  48      128      2      1M
jin-tiny   the CPU demo            128   4       4        2      64
jin-test   the smallest the tests  32    2       4        2      48
=========  ======================  ====  ======  =======  =====  ========

Every layer of the published presets is MoE (``moe_every=1``): the tables give one expert count
for the whole model, and parameters at these sizes sit in the experts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from jin_orchestrate._config import StrictConfig
from jin_orchestrate.model import JinModelConfig
from jin_orchestrate.overrides import apply_overrides, deep_merge, load_mapping

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "VECTOR_COLUMNS",
    "DataConfig",
    "JinConfig",
    "StageConfig",
    "TrainConfig",
    "apply_config_overrides",
    "config_changes",
    "load_config",
    "preset",
    "resolve_config",
]

# jin-data columns whose collated batch a CustomModalityEncoder reads: (B,F) vectors.
VECTOR_COLUMNS = ("custom",)


class StageConfig(StrictConfig):
    """One curriculum stage (paper §4.2) and its loss weights (Eq. 7)."""

    name: str = Field(min_length=1)
    steps: int = Field(gt=0)
    alpha: float = Field(
        1.0, ge=0.0, allow_inf_nan=False, description="within-modality JEPA, Eq. 1"
    )
    beta: float = Field(0.0, ge=0.0, allow_inf_nan=False, description="cross-modal JEPA, Eq. 5")
    gamma: float = Field(
        0.0, ge=0.0, allow_inf_nan=False, description="contrastive alignment, Eq. 6"
    )
    zjepa: float = Field(
        0.0, ge=0.0, allow_inf_nan=False, description="z-JEPA cross-scale terms on images, Eq. 4"
    )
    generation: float = Field(
        0.0,
        ge=0.0,
        allow_inf_nan=False,
        description="cross-modal generation (§3.1 decoding: diffusion of image and audio tokens, "
        "captions); a generation stage trains this objective alone",
    )
    lr: float | None = Field(
        None, gt=0.0, allow_inf_nan=False, description="peak learning rate (train.lr if None)"
    )
    trainable: tuple[str, ...] = Field(
        (),
        description="runtime modality extension (§3.6): train only these modalities' encoders, "
        "embedding rows and retrieval projections, by InfoNCE (gamma) and cross-modal "
        "prediction (beta) against the frozen rest; empty: train everything",
    )
    align_with: tuple[str, ...] = Field(
        (),
        description="extension stage: the frozen modalities the trainable ones are aligned with "
        "by InfoNCE (gamma); empty: every modality of the batch",
    )

    @field_validator("name")
    @classmethod
    def _one_path_component(cls, name: str) -> str:
        # Part of the stage's checkpoint folder (`checkpoint.stage_dir_name`): '/' would nest it,
        # '..' put it outside the job, where replacing a checkpoint deletes what is there.
        bad = [c for c in ("/", "\\", "\0") if c in name]
        if bad:
            raise ValueError(
                f"a stage name is part of its checkpoint folder; it may not hold {bad}"
            )
        return name

    @model_validator(mode="after")
    def _some_objective(self) -> StageConfig:
        representation = self.alpha + self.beta + self.gamma + self.zjepa
        if self.generation > 0 and (representation > 0 or self.trainable):
            raise ValueError(
                f"stage {self.name!r}: a generation stage (generation={self.generation}) trains "
                "that objective alone; set alpha, beta, gamma and zjepa to 0 and trainable to []"
            )
        if representation + self.generation == 0:
            raise ValueError(
                f"stage {self.name!r}: alpha, beta, gamma, zjepa and generation are all 0"
            )
        if self.trainable and self.beta + self.gamma == 0:
            raise ValueError(
                f"stage {self.name!r}: an extension stage (trainable={list(self.trainable)}) "
                "learns from beta and gamma only; both are 0"
            )
        if self.align_with and not self.trainable:
            raise ValueError(
                f"stage {self.name!r}: align_with={list(self.align_with)} applies to an extension "
                "stage only; set trainable too, or drop align_with"
            )
        # InfoNCE pairs a trainable modality with an anchor: one of its own is no pair at all.
        own = [m for m in self.align_with if m in self.trainable]
        if own:
            raise ValueError(
                f"stage {self.name!r}: align_with={own} are trainable; align_with names the "
                "frozen modalities the trainable ones are aligned with"
            )
        return self


class TrainConfig(StrictConfig):
    """Optimisation and the Ray Train job around it."""

    batch_size: int = Field(32, gt=0, description="global batch, split over workers")
    lr: float = Field(1e-3, gt=0.0, allow_inf_nan=False)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.05, ge=0.0, allow_inf_nan=False)
    grad_clip: float = Field(1.0, gt=0.0)
    weight_ema: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="decay of an average of the trained weights kept for sampling and evaluation "
        "(jin_orchestrate.ema; DiT: 0.9999); 0 keeps none",
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: each training forward under torch.autocast(bfloat16) on the model's "
        "device (autocast's op lists: matmuls and convolutions in bf16, normalisations and "
        "losses in float32; weights, gradients and optimiser state stay float32); fp32: float32 "
        "throughout",
    )
    seed: int = Field(0, ge=0, description="masks, weights and data order (numpy seeds are >= 0)")
    num_workers: int = Field(2, gt=0)
    use_gpu: bool | None = Field(None, description="None: use GPUs when the cluster has them")
    torch_threads: int | None = Field(1, gt=0, description="intra-op threads per worker")
    checkpoint_every: int = Field(50, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(5, gt=0)
    max_failures: int = Field(2, ge=0, description="worker failures Ray Train recovers from")
    max_nonfinite_steps: int = Field(
        5, gt=0, description="steps in a row with a non-finite loss or gradient that stop the job"
    )

    @model_validator(mode="after")
    def _split_batch(self) -> TrainConfig:
        # Each worker takes batch_size / num_workers samples a step; a remainder would change the
        # global batch (and so the gradient's noise and InfoNCE's negatives) without a word.
        if self.batch_size % self.num_workers:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) is the global batch, split equally over "
                f"train.num_workers ({self.num_workers}): it must be a multiple of the worker "
                "count; change one of them"
            )
        return self


class DataConfig(StrictConfig):
    """Where the shards come from; with no ``url``, NumberWorld is generated into the cache."""

    url: str | None = None
    samples: int = Field(2400, gt=0, description="NumberWorld samples generated when url is None")
    seed: int = Field(0, ge=0)
    cache_dir: str = "~/.cache/jin"
    on_error: Literal["raise", "skip"] = "raise"
    modalities: tuple[str, ...] = Field(("text", "image", "audio", "points"), min_length=1)
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="modality -> the jin-data column it is read from, where the names differ "
        "(a runtime-added modality reading the custom column)",
    )
    shuffle_buffer: int = Field(
        256,
        ge=0,
        description="rows each training worker mixes anew every epoch (seeded by seed, stage, "
        "epoch and rank) after one seeded global shuffle; 0 reads in file order",
    )

    @model_validator(mode="after")
    def _check_columns(self) -> DataConfig:
        stray = [m for m in self.columns if m not in self.modalities]
        if stray:
            raise ValueError(f"data.columns: {stray} are not in data.modalities {self.modalities}")
        bad = {m: c for m, c in self.columns.items() if c not in VECTOR_COLUMNS}
        if bad:
            raise ValueError(
                f"data.columns: {bad}: a renamed modality reads a numeric column, one of "
                f"{list(VECTOR_COLUMNS)}"
            )
        sources = [self.columns.get(m, m) for m in self.modalities]
        twice = sorted({c for c in sources if sources.count(c) > 1})
        if twice:
            raise ValueError(f"data.columns: column(s) {twice} feed more than one modality")
        return self

    @property
    def source_columns(self) -> tuple[str, ...]:
        """The jin-data columns to read, in the order of ``modalities``."""
        return tuple(self.columns.get(m, m) for m in self.modalities)


class JinConfig(StrictConfig):
    """Everything a pretraining job needs; written next to every checkpoint as JSON."""

    preset: str = "custom"
    model: JinModelConfig
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    stages: list[StageConfig]

    @model_validator(mode="after")
    def _check(self) -> JinConfig:
        names = [s.name for s in self.stages]
        if not names:
            raise ValueError("stages: at least one stage is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"stages: names must be unique, got {names}")
        unknown = [m for m in self.data.modalities if m not in self.model.modalities]
        if unknown:
            raise ValueError(
                f"data.modalities: {unknown} have no encoder in model (has {self.model.modalities})"
            )
        for s in self.stages:
            if s.generation > 0 and self.model.generation is None:
                raise ValueError(
                    f"stages.{s.name}.generation: the model has no generation heads "
                    "(set model.generation)"
                )
            for field in ("trainable", "align_with"):
                unknown = [m for m in getattr(s, field) if m not in self.data.modalities]
                if unknown:
                    raise ValueError(
                        f"stages.{s.name}.{field}: {unknown} are not among data.modalities "
                        f"{list(self.data.modalities)}"
                    )
        return self

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)


def _curriculum(steps: tuple[int, int, int]) -> list[dict[str, Any]]:
    """Paper §4.2: within-modality JEPA, + cross-modal prediction, + z-JEPA and alignment."""
    s1, s2, s3 = steps
    return [
        {"name": "within_modality", "steps": s1, "alpha": 1.0},
        {"name": "cross_modal", "steps": s2, "alpha": 1.0, "beta": 1.0},
        {"name": "multimodal", "steps": s3, "alpha": 1.0, "beta": 1.0, "gamma": 1.0, "zjepa": 0.5},
    ]


def _model(
    dim: int,
    depth: int,
    experts: int,
    context: int,
    *,
    top_k: int = 2,
    moe_every: int = 1,
    image: tuple[int, int, int] = (14, 3, 16),
    image_stem: dict[str, Any] | None = None,
    point_groups: int = 64,
) -> dict[str, Any]:
    """Model dials -> a full model config; everything not named here is derived."""
    head_dim = 128 if dim >= 1024 else max(8, dim // 4)
    # I-JEPA's predictor is narrower than the encoder (384 for ViT-H's 1280): about half here.
    predictor_dim = max(head_dim, dim // 2 // head_dim * head_dim)
    patch, channels, grid = image
    return {
        "dim": dim,
        "space": {
            "dim": dim,
            "text": {"max_len": context},
            "image": {
                "patch_size": patch,
                "in_channels": channels,
                "pos_grid": grid,
                **(image_stem or {}),
            },
            "audio": {},
            "points": {"num_groups": point_groups, "group_size": 16, "hidden": max(64, dim // 2)},
        },
        "backbone": {
            "dim": dim,
            "depth": depth,
            "num_heads": dim // head_dim,
            "num_experts": experts,
            "top_k": top_k,
            "moe_every": moe_every,
        },
        "predictor": {
            "predictor_dim": predictor_dim,
            "depth": max(2, depth // 2),
            "num_heads": predictor_dim // head_dim,
        },
    }


def _published(dim: int, depth: int, experts: int, context: int) -> dict[str, Any]:
    return {
        "model": _model(dim, depth, experts, context),
        "stages": _curriculum((1000, 1000, 1000)),
    }


def jin_nano() -> dict[str, Any]:
    return _published(1152, 6, 8, 32_768)


def jin_base() -> dict[str, Any]:
    return _published(1664, 12, 16, 131_072)


def jin_large() -> dict[str, Any]:
    return _published(1920, 24, 64, 131_072)


def jin_pro() -> dict[str, Any]:
    return _published(2432, 32, 32, 262_144)


def jin_max() -> dict[str, Any]:
    return _published(2560, 48, 128, 1_048_576)


def jin_tiny() -> dict[str, Any]:
    """The CPU demo: NumberWorld's 64x64 grayscale images in 8x8 patches, 4 experts."""
    # A convolutional stem, not ViT's linear patches: from 2,400 images a ViT memorises the digits
    # and never reads them; the stem puts held-out numbers' image zero-shot at 10% (0% with
    # linear patches) and text->image R@10 at 39% (5%) in the same 340 steps.
    model = _model(
        128, 4, 4, 64, moe_every=2, image=(8, 1, 8), image_stem={"stem": "conv"}, point_groups=32
    )
    # Two zoom levels (whole image, half-side crop), both resampled to 32 pixels: z-JEPA's equal
    # token budget per level (coarse whole, fine crop at its native resolution), and a quarter of
    # the tokens of full-size levels. z-JEPA at 64 pixels was 60% of a multimodal step.
    # (roi_max_scale_change: jin_zjepa's default, which the demo has always trained with)
    model["zjepa"] = {"num_z_levels": 2, "zoom_factors": (1.0, 0.5), "roi_max_scale_change": 1.5}
    model["zoom_crop_size"] = 32
    # I-JEPA's EMA schedule (0.996 -> 1) is made for hundreds of epochs. In a 340-step run the
    # target then tracks the online network within a few hundred steps and both fall to
    # position-only features (the image targets' content_std went 0.43 -> 0.04 in 120 steps and
    # alignment never left ln(batch)); a slower target keeps content in what the JEPA terms predict.
    model["ema_momentum"] = (0.9995, 1.0)
    stages = _curriculum((30, 30, 280))
    # Stage 3 keeps every objective; alignment leads. At this scale the JEPA terms reach a
    # near-zero loss early (benchmarks/results/train.md) while InfoNCE is what retrieval needs.
    stages[2].update(alpha=0.25, beta=0.25, gamma=1.0, zjepa=0.25)
    return {
        "model": model,
        "train": {"batch_size": 32, "lr": 2e-3, "num_workers": 2},
        "stages": stages,
    }


def jin_test() -> dict[str, Any]:
    """The smallest config the tests need: seconds per step on one core."""
    return {
        "model": _model(
            32,
            2,
            4,
            48,
            moe_every=2,
            image=(16, 1, 4),
            image_stem={"stem": "conv", "stem_channels": (4, 8, 8, 16)},
            point_groups=8,
        ),
        "train": {
            "batch_size": 8,
            "num_workers": 1,
            "warmup_steps": 1,
            "checkpoint_every": 2,
            "log_every": 1,
        },
        "data": {"samples": 200},
        "stages": _curriculum((2, 2, 2)),
    }


PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    "jin-nano": jin_nano,
    "jin-base": jin_base,
    "jin-large": jin_large,
    "jin-pro": jin_pro,
    "jin-max": jin_max,
    "jin-tiny": jin_tiny,
    "jin-test": jin_test,
}

# Parameter counts the presets reproduce (paper Table 1; ZIP-0408's model-scale table).
PUBLISHED_PARAMETERS = {
    "jin-nano": 1e9,
    "jin-base": 7e9,
    "jin-large": 70e9,
    "jin-pro": 72e9,
    "jin-max": 480e9,
}


DEFAULT_PRESET = "jin-tiny"


def preset(name: str) -> dict[str, Any]:
    """The raw mapping of a preset (before file and overrides)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return {"preset": name, **PRESETS[name]()}


def apply_config_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """`apply_overrides` on a config mapping, with stage items addressed by their index in the
    ``stages`` list (``--set stages.2.steps=500``); an index that names no stage is refused."""
    out = dict(data)
    for text in overrides:
        stages = out.get("stages")
        if not isinstance(stages, list):
            out = apply_overrides(out, [text])
            continue
        # The list as a mapping from canonical index ("2", never "02") for this one override.
        indices = [str(i) for i in range(len(stages))]
        out = apply_overrides({**out, "stages": dict(zip(indices, stages, strict=True))}, [text])
        if isinstance(out["stages"], Mapping):
            bad = [k for k in out["stages"] if k not in indices]
            if bad:
                raise ValueError(
                    f"override {text!r}: no stage with index {bad[0]!r}; the stages are "
                    f"indexed {', '.join(indices)}"
                )
            out["stages"] = [out["stages"][i] for i in indices]
    return out


def resolve_config(
    base: Mapping[str, Any],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> JinConfig:
    """A config mapping -> file -> ``--set`` overrides -> validated :class:`JinConfig`."""
    data = dict(base) if path is None else deep_merge(base, load_mapping(path))
    return JinConfig.model_validate(apply_config_overrides(data, overrides))


def load_config(
    preset_name: str = DEFAULT_PRESET,
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> JinConfig:
    """Preset -> file -> ``--set`` overrides -> validated :class:`JinConfig`."""
    return resolve_config(preset(preset_name), path, overrides)


def config_changes(old: Any, new: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """``{"stages.2.steps": (20, 2), ...}``: the keys whose values differ between two config
    mappings (JSON dumps), with the old and new value; list items are compared by index where
    both lists have the same length, else the list is one value."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        pairs = [(k, old.get(k), new.get(k)) for k in dict.fromkeys([*old, *new])]
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        pairs = [(str(i), a, b) for i, (a, b) in enumerate(zip(old, new, strict=True))]
    else:
        return {} if old == new else {prefix: (old, new)}
    changes: dict[str, tuple[Any, Any]] = {}
    for key, a, b in pairs:
        changes.update(config_changes(a, b, f"{prefix}.{key}" if prefix else key))
    return changes


def _show(name: str) -> str:
    from jin_orchestrate.model import count_parameters

    cfg = load_config(name)
    counts = count_parameters(cfg.model)
    lines = [json.dumps(cfg.model_dump(mode="json"), indent=2)]
    lines.append(f"total parameters:            {counts.total:,}")
    lines.append(f"active parameters per token: {counts.active:,}")
    if name in PUBLISHED_PARAMETERS:
        ratio = counts.total / PUBLISHED_PARAMETERS[name]
        lines.append(
            f"published size:              {PUBLISHED_PARAMETERS[name]:,.0f} (ours is {ratio:.3f}x)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m jin_orchestrate.config {list,show PRESET}``."""
    parser = argparse.ArgumentParser(prog="python -m jin_orchestrate.config")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the presets")
    show = sub.add_parser("show", help="print a preset's resolved config and parameter counts")
    show.add_argument("preset", choices=sorted(PRESETS))
    args = parser.parse_args(argv)
    if args.command == "list":
        print("\n".join(sorted(PRESETS)))
    else:
        print(_show(args.preset))
    return 0


if __name__ == "__main__":
    sys.exit(main())
