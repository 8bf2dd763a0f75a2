"""PNG figures of an evaluation: similarity matrix, loss curves, a 2-D map of the joint space.

# N samples, R retrieval width, C classes (numbers)

matplotlib (Agg, no display) draws them; every function writes one PNG and returns its path.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from jin_orchestrate.metrics import class_prototypes
from jin_orchestrate.tables import write_atomic

__all__ = ["embedding_projection", "loss_curves", "pca_2d", "similarity_matrix"]

MARKERS = {"text": "o", "audio": "^", "image": "s", "points": "D"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as a PNG through a temporary file renamed into place, like every artefact:
    a failure half-way leaves the earlier plot, not a damaged file."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    return write_atomic(path, buffer.getvalue())


def similarity_matrix(
    query_NR: torch.Tensor,
    pool_NR: torch.Tensor,
    labels_N: torch.Tensor,
    path: str | os.PathLike[str],
    names: tuple[str, str] = ("text", "audio"),
    title: str = "",
) -> Path:
    """Cosine similarity of the two modalities' class prototypes, numbers in order on both axes.

    A bright diagonal is retrieval working; off-diagonal stripes show which numbers are confused
    (for speech, often numbers that share a word: "forty-six" and "fifty-six").
    """
    q, classes = class_prototypes(query_NR, labels_N)
    p, _ = class_prototypes(pool_NR, labels_N)
    sim = (q @ p.T).numpy()
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(sim, cmap="viridis", vmin=-1, vmax=1)
    ticks = list(range(0, len(classes), max(1, len(classes) // 10)))
    ax.set_xticks(ticks, [str(int(classes[i])) for i in ticks])
    ax.set_yticks(ticks, [str(int(classes[i])) for i in ticks])
    ax.set(xlabel=f"{names[1]} (mean per number)", ylabel=f"{names[0]} (mean per number)")
    ax.set_title(title or f"{names[0]} × {names[1]} cosine similarity, test split")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, path)


def loss_curves(
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | os.PathLike[str],
    key: str = "loss",
) -> Path:
    """``key`` against the global step, one panel per curriculum stage, one line per model.

    ``histories`` maps a model name to its per-step records (``stage``, ``global_step``, ``key``),
    as :class:`~jin_orchestrate.inprocess.TrainHistory` keeps them.
    """
    stages: list[str] = []
    for records in histories.values():
        for r in records:
            if r["stage"] not in stages:
                stages.append(r["stage"])
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.8), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        for name, records in histories.items():
            points = [
                (r["global_step"], r[key]) for r in records if r["stage"] == stage and key in r
            ]
            if points:
                ax.plot(*zip(*points, strict=True), label=name, linewidth=1)
        ax.set(title=stage, xlabel="global step", ylabel=key)
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def pca_2d(x_NR: torch.Tensor) -> torch.Tensor:
    """The first two principal components of ``x`` (centred), ``(N, 2)``; deterministic signs."""
    centred = x_NR - x_NR.mean(dim=0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    comps = v[:2]
    # SVD's signs are arbitrary: fix each component so its largest loading is positive.
    signs = torch.sign(comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)))
    return centred @ (comps * signs).T


def embedding_projection(
    embeddings: Mapping[str, torch.Tensor],
    labels_N: torch.Tensor,
    path: str | os.PathLike[str],
    title: str = "Joint embeddings, test split (PCA)",
    present: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Every modality's test embeddings in one PCA plane, coloured by number, marker by modality.

    One projection for all modalities: items of one number sit together across modalities when
    the space is joint, and each modality forms its own island when it is not. ``present`` maps a
    modality to the ``(N,)`` bool of the samples that have it: the others embed as a zero vector
    and are left out. Items without a number (label -1) are grey.
    """
    rows = {
        n: torch.ones(len(labels_N), dtype=torch.bool)
        if present is None or n not in present
        else present[n]
        for n in embeddings
    }
    names = [n for n in embeddings if rows[n].any()]
    if not names:
        raise ValueError("embedding_projection: no sample has any of the modalities")
    embeddings = {n: embeddings[n][rows[n]] for n in names}
    labels = {
        n: labels_N[rows[n]].float().masked_fill(labels_N[rows[n]] < 0, float("nan")) for n in names
    }
    xy = pca_2d(torch.cat([embeddings[n] for n in names])).numpy()
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    start = 0
    scatter = None
    for name in names:
        n = embeddings[name].shape[0]
        part = xy[start : start + n]
        scatter = ax.scatter(
            part[:, 0],
            part[:, 1],
            c=labels[name].numpy(),
            cmap=plt.get_cmap("turbo").with_extremes(bad="lightgrey"),
            plotnonfinite=True,
            vmin=0,
            vmax=99,
            s=12,
            marker=MARKERS.get(name, "x"),
            label=name,
            alpha=0.8,
        )
        start += n
    ax.set(title=title, xlabel="PC 1", ylabel="PC 2")
    ax.legend(fontsize=8)
    if scatter is not None:
        fig.colorbar(scatter, ax=ax, label="number")
    return _save(fig, path)
