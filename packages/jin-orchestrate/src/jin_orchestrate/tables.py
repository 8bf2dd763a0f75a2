"""The paper's Tables 2, 3, 5 and 6 in Markdown: our figures, and the published ones for context.

Our figures are measured on NumberWorld (100 numbers, a few thousand samples, CPU-sized models);
the paper's are on ImageNet, AudioCaps and an A100 at 7B-70B parameters. They share a measure,
not a task: the published numbers are printed beside ours, labelled, only to show what each
table reports at full scale, never to be compared row by row.

Inputs are the metric dicts of :func:`jin_orchestrate.evaluate.evaluate` keyed by model name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jin_orchestrate.evaluate import RETRIEVAL_PAIRS

__all__ = [
    "PUBLISHED",
    "ablation_table",
    "evaluation_markdown",
    "probe_table",
    "published_context",
    "retrieval_table",
    "throughput_table",
    "write_atomic",
    "write_json",
    "zero_shot_table",
]

Results = Mapping[str, Mapping[str, float]]

# The paper's published figures (percent; samples/s for Table 6), by table.
PUBLISHED: dict[str, dict[str, Any]] = {
    "table2_imagenet_zero_shot_top1": {
        "CLIP ViT-L/14": 75.3,
        "ALIGN": 76.4,
        "Florence": 83.7,
        "Jin-Base": 82.1,
        "Jin-Large": 85.2,
    },
    "table3_audiocaps_r10_t2a_a2t": {
        "AudioCLIP": (45.2, 43.8),
        "CLAP": (51.3, 49.7),
        "Jin-Base": (58.9, 56.4),
        "Jin-Large": (63.2, 61.8),
    },
    "table5_imagenet_linear_probe": {
        "single_scale": 77.9,
        "hierarchical_levels": 79.4,
        "cross_scale_prediction": 80.8,
        "adaptive_zoom": 81.6,
        "bidirectional_feedback": 82.3,
    },
    "table6_a100_samples_per_s": {
        "Jin-Base (dense)": {"text": 890, "vision": 234, "multi": 156},
        "Jin-Base (MoE)": {"text": 1240, "vision": 312, "multi": 223},
    },
}

TABLE5_LABELS = {
    "single_scale": "Single-scale JEPA (baseline)",
    "hierarchical_levels": "+ Hierarchical levels",
    "cross_scale_prediction": "+ Cross-scale prediction",
    "adaptive_zoom": "+ Adaptive zoom",
    "bidirectional_feedback": "+ Bidirectional feedback",
}

SHORT = {"text": "T", "audio": "A", "image": "I", "points": "P"}


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(cells: Sequence[str], align: str = "---:") -> list[str]:
    return [_row(cells), _row(["---"] + [align] * (len(cells) - 1))]


def zero_shot_table(results: Results) -> str:
    """Table 2: zero-shot top-1 / top-5 (%) on images and speech of held-out numbers, and on
    the runtime-added modalities' vectors of them (`jin_orchestrate.extend`) after speech.

    The last two columns are the reference the others are bounded by: the held-out numbers'
    captions classified by the same prompts (how well the text tower reads a number at all).
    """
    columns = [
        ("zero_shot", "images"),
        ("zero_shot_audio", "speech"),
        *((f"zero_shot_{m}", m) for m in _runtime_zero_shot(results)),
        ("zero_shot_text", "captions"),
    ]
    reference = {"zero_shot_text": " (reference)"}
    lines = _header(
        [
            "model",
            *(f"{what} top-{k}{reference.get(p, '')}" for p, what in columns for k in (1, 5)),
        ]
    )
    for name, r in results.items():
        lines.append(
            _row([name, *(_pct(r.get(f"{p}_top{k}")) for p, _ in columns for k in (1, 5))])
        )
    first = next(iter(results.values()), {})
    n = int(first.get("zero_shot_samples", 0))
    chance = ["1.0", "5.0"] * len(columns)
    lines.append(_row([f"chance (100-way; {n} held-out test items)", *chance]))
    return "\n".join(lines)


def _runtime_zero_shot(results: Results) -> list[str]:
    """The runtime-added modalities (`jin_orchestrate.extend`) with zero-shot figures in
    ``results``, in order: ``zero_shot_<m>_top1`` beside the built-in images, speech, captions."""
    builtin = ("zero_shot", "zero_shot_audio", "zero_shot_text")
    found = [
        key[: -len("_top1")].removeprefix("zero_shot_")
        for r in results.values()
        for key in r
        if key.startswith("zero_shot_")
        and key.endswith("_top1")
        and key[: -len("_top1")] not in builtin
    ]
    return list(dict.fromkeys(found))


def _retrieval_pairs(results: Results, prefix: str) -> list[tuple[str, str]]:
    """`RETRIEVAL_PAIRS`, then the directions of runtime-added modalities (``m``↔text) that
    ``results`` holds ``{prefix}/<query>_to_<candidate>/R1`` figures of, in order."""
    known = set(RETRIEVAL_PAIRS)
    found: list[tuple[str, str]] = []
    for r in results.values():
        for key in r:
            if not (key.startswith(f"{prefix}/") and key.endswith("/R1")):
                continue
            direction = key[len(prefix) + 1 : -len("/R1")]
            # A modality name may hold "_to_": split where one side is a built-in modality.
            splits = [
                (direction[:i], direction[i + len("_to_") :])
                for i in range(len(direction))
                if direction.startswith("_to_", i)
            ]
            pair = next((s for s in splits if s[0] in SHORT or s[1] in SHORT), None)
            if pair is not None and pair not in known and pair not in found:
                found.append(pair)
    return [*RETRIEVAL_PAIRS, *found]


def retrieval_table(
    results: Results, pool: str = "prototype", pairs: Sequence[tuple[str, str]] | None = None
) -> str:
    """Table 3: R@1 / R@5 / R@10 (%) per direction (rows) and model (columns).

    ``pool="prototype"``: one candidate per number; ``"instance"``: every test item, where only the
    query's own pair counts. ``pairs`` defaults to `RETRIEVAL_PAIRS` and the runtime-added
    modalities' directions the results hold; a direction no model has is left out.
    """
    prefix = "retrieval" if pool == "prototype" else "retrieval_instance"
    if pool not in ("prototype", "instance"):
        raise ValueError(f"pool: expected 'prototype' or 'instance', got {pool!r}")
    size_key = "retrieval_pool" if pool == "prototype" else "retrieval_instance_pool"
    first = next(iter(results.values()), {})
    size = first.get(size_key, 0.0)
    lines = _header(["direction", *(f"{n} R@1 / 5 / 10" for n in results), "chance R@10"])
    for q, p in pairs or _retrieval_pairs(results, prefix):
        cells = []
        for r in results.values():
            values = [r.get(f"{prefix}/{q}_to_{p}/R{k}") for k in (1, 5, 10)]
            cells.append(" / ".join(_pct(v) for v in values))
        if any(c != "— / — / —" for c in cells):
            chance = _pct(min(1.0, 10 / size)) if size else "—"
            direction = f"{SHORT.get(q, q)}→{SHORT.get(p, p)}"
            lines.append(_row([f"{direction} ({int(size)}-way)", *cells, chance]))
    return "\n".join(lines)


def probe_table(results: Results, modality: str = "image") -> str:
    """Linear-probe top-1 (%) of frozen ``modality`` embeddings per model."""
    lines = _header(["model", f"{modality} linear probe top-1", "test items", "classes"])
    for name, r in results.items():
        lines.append(
            _row(
                [
                    name,
                    _pct(r.get(f"linear_probe/{modality}_top1")),
                    str(int(r.get(f"linear_probe/{modality}_samples", 0))),
                    str(int(r.get(f"linear_probe/{modality}_classes", 0))),
                ]
            )
        )
    return "\n".join(lines)


def ablation_table(results: Results, modality: str = "image") -> str:
    """Table 5: linear-probe top-1 (%) per z-JEPA configuration, beside the published ImageNet."""
    published = PUBLISHED["table5_imagenet_linear_probe"]
    lines = _header(["configuration", "ours: NumberWorld probe top-1", "paper: ImageNet (context)"])
    for name, r in results.items():
        paper = published.get(name)
        lines.append(
            _row(
                [
                    TABLE5_LABELS.get(name, name),
                    _pct(r.get(f"linear_probe/{modality}_top1")),
                    "—" if paper is None else f"{paper:.1f}",
                ]
            )
        )
    return "\n".join(lines)


def throughput_table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str]) -> str:
    """Table 6: samples/s per modality (``columns``) per model, and the ratio of the first two.

    ``rows`` maps a model name to ``{column: samples/s, ...}`` plus any extra keys, which are
    shown after the throughput columns (validation loss, parameters).
    """
    names = list(rows)
    extras = [k for k in next(iter(rows.values()), {}) if k not in columns]
    lines = _header(["model", *columns, *extras])
    for name in names:
        r = rows[name]
        lines.append(
            _row([name, *(f"{r[c]:,.0f}" for c in columns), *(_fmt(r[k]) for k in extras)])
        )
    if len(names) >= 2:
        a, b = rows[names[0]], rows[names[1]]
        ratio = [f"{a[c] / b[c]:.2f}x" for c in columns]
        lines.append(_row([f"{names[0]} / {names[1]}", *ratio, *([""] * len(extras))]))
    return "\n".join(lines)


def _fmt(value: float) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}"
    return f"{int(value):,}"


def published_context() -> str:
    """The paper's figures, labelled with their data sets: context, not comparison."""
    t2 = PUBLISHED["table2_imagenet_zero_shot_top1"]
    t3 = PUBLISHED["table3_audiocaps_r10_t2a_a2t"]
    t6 = PUBLISHED["table6_a100_samples_per_s"]
    lines = [
        "Published figures (ImageNet, AudioCaps, A100; 7B-70B models) — context only, not "
        "comparable with NumberWorld's:",
        "",
        "- Table 2, ImageNet zero-shot top-1 (%): " + ", ".join(f"{k} {v}" for k, v in t2.items()),
        "- Table 3, AudioCaps R@10 T→A / A→T (%): "
        + ", ".join(f"{k} {a} / {b}" for k, (a, b) in t3.items()),
        "- Table 6, A100 samples/s text / vision / multi: "
        + "; ".join(f"{k} {v['text']} / {v['vision']} / {v['multi']}" for k, v in t6.items()),
    ]
    return "\n".join(lines)


def evaluation_markdown(results: Results, title: str = "Evaluation") -> str:
    """Tables 2 and 3 (both pools) and the image probe for ``results``, with the paper's figures."""
    return "\n\n".join(
        [
            f"# {title}",
            "## Table 2 — zero-shot classification of held-out numbers (%)",
            zero_shot_table(results),
            "## Table 3 — retrieval, one candidate per number (%)",
            retrieval_table(results, "prototype"),
            "## Table 3 — retrieval, instance pool (%)",
            retrieval_table(results, "instance"),
            "## Linear probe of frozen image embeddings (Table 5's measure, %)",
            probe_table(results),
            published_context(),
        ]
    )


def write_atomic(path: str | os.PathLike[str], text: str | bytes) -> Path:
    """Write ``text`` (or bytes: a PNG) to ``path`` through a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(text, bytes):
        tmp.write_bytes(text)
    else:
        tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """:func:`write_atomic` of ``data`` as indented JSON."""
    return write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
