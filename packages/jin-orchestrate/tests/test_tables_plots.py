"""Markdown tables with the published figures labelled, and the PNG plots of an evaluation."""

import math
import os

import pytest
import torch

from jin_orchestrate.plots import embedding_projection, loss_curves, pca_2d, similarity_matrix
from jin_orchestrate.tables import (
    ablation_table,
    evaluation_markdown,
    retrieval_table,
    throughput_table,
    zero_shot_table,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _metrics(value):
    m = {
        "zero_shot_top1": value,
        "zero_shot_top5": value,
        "zero_shot_samples": 12.0,
        "retrieval_pool": 90.0,
        "retrieval_instance_pool": 300.0,
        "linear_probe/image_top1": value,
        "linear_probe/image_samples": 250.0,
        "linear_probe/image_classes": 90.0,
    }
    for k in (1, 5, 10):
        m[f"retrieval/text_to_audio/R{k}"] = value
        m[f"retrieval_instance/text_to_audio/R{k}"] = value / 2
    return m


def test_tables_show_each_model_and_label_the_papers_figures():
    results = {"Jin": _metrics(0.5), "two-tower": _metrics(0.25)}
    t2 = zero_shot_table(results)
    assert "| Jin | 50.0 | 50.0 | — | — | — | — |" in t2 and "12 held-out" in t2
    t3 = retrieval_table(results, "prototype")
    assert "| T→A (90-way) | 50.0 / 50.0 / 50.0 | 25.0 / 25.0 / 25.0 | 11.1 |" in t3
    assert "A→I" not in t3  # directions no model has are left out
    assert "| T→A (300-way) | 25.0 / 25.0 / 25.0 |" in retrieval_table(results, "instance")
    md = evaluation_markdown(results)
    assert "ImageNet zero-shot top-1" in md and "AudioCaps R@10" in md and "context only" in md
    t5 = ablation_table({"single_scale": _metrics(0.3)})
    assert "| Single-scale JEPA (baseline) | 30.0 | 77.9 |" in t5


def test_runtime_added_modalities_get_their_own_rows():
    """README (evaluate): modalities added by `extend` get their own rows; the tables named
    only the four built-in ones, and an explicit direction of a runtime one was a KeyError."""
    metrics = _metrics(0.5)
    for k in (1, 5, 10):
        metrics[f"retrieval/seven_segment_to_text/R{k}"] = 0.25
        metrics[f"retrieval/text_to_seven_segment/R{k}"] = 0.75
        metrics[f"retrieval_instance/seven_segment_to_text/R{k}"] = 0.125
    metrics.update(zero_shot_seven_segment_top1=0.1, zero_shot_seven_segment_top5=0.4)
    results = {"Jin": metrics}
    t3 = retrieval_table(results, "prototype")
    assert "| seven_segment→T (90-way) | 25.0 / 25.0 / 25.0 | 11.1 |" in t3
    assert "| T→seven_segment (90-way) | 75.0 / 75.0 / 75.0 | 11.1 |" in t3
    assert t3.index("T→A") < t3.index("seven_segment→T")  # the paper's directions first
    t3i = retrieval_table(results, "instance")
    assert "| seven_segment→T (300-way) | 12.5 / 12.5 / 12.5 |" in t3i
    assert "T→seven_segment" not in t3i
    only = retrieval_table(results, pairs=[("seven_segment", "text")])
    assert "| seven_segment→T (90-way) | 25.0 / 25.0 / 25.0 | 11.1 |" in only
    t2 = zero_shot_table(results)
    assert "| speech top-5 | seven_segment top-1 | seven_segment top-5 | captions top-1" in t2
    assert "| Jin | 50.0 | 50.0 | — | — | 10.0 | 40.0 | — | — |" in t2
    assert t2.endswith("held-out test items) |" + " 1.0 | 5.0 |" * 4)
    md = evaluation_markdown(results)
    assert "seven_segment→T" in md and "seven_segment top-1" in md


def test_throughput_table_reports_the_ratio_of_the_first_two_rows():
    rows = {
        "MoE": {"text": 300.0, "image": 90.0, "val": 1.25},
        "dense": {"text": 200.0, "image": 60.0, "val": 1.5},
    }
    table = throughput_table(rows, ("text", "image"))
    assert "| MoE / dense | 1.50x | 1.50x |  |" in table
    assert "| MoE | 300 | 90 | 1.25 |" in table


def test_pca_recovers_the_axis_of_largest_spread():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 3, generator=g) * torch.tensor([10.0, 1.0, 0.1])
    xy = pca_2d(x)
    assert xy.shape == (500, 2)
    assert math.isclose(
        torch.corrcoef(torch.stack([xy[:, 0], x[:, 0]]))[0, 1].item(), 1, abs_tol=1e-3
    )
    assert torch.equal(pca_2d(x), xy)


def test_plots_are_written_as_png(tmp_path):
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(20).repeat(3)
    emb = {
        m: torch.nn.functional.normalize(torch.randn(60, 8, generator=g), dim=-1)
        for m in ("text", "audio")
    }
    history = {
        "Jin": [{"stage": s, "global_step": i, "loss": 1.0 / i} for i, s in enumerate("aabbb", 1)]
    }
    paths = [
        similarity_matrix(emb["text"], emb["audio"], labels, tmp_path / "sim.png"),
        embedding_projection(emb, labels, tmp_path / "pca.png"),
        loss_curves(history, tmp_path / "loss.png"),
    ]
    for path in paths:
        assert path.read_bytes().startswith(PNG)


def test_a_plot_that_fails_half_written_leaves_the_earlier_one(tmp_path, monkeypatch):
    """Plots are written through a temporary file, like every other artefact: savefig straight
    to the path left a truncated PNG where the good one was when writing failed."""
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    emb = {"text": torch.nn.functional.normalize(torch.randn(20, 8, generator=g), dim=-1)}
    labels = torch.arange(10).repeat(2)
    good = embedding_projection(emb, labels, tmp_path / "pca.png").read_bytes()

    def disk_full(self, fp, *args, **kwargs):  # PIL writes the PNG; the disk fills half-way
        if isinstance(fp, str | os.PathLike):
            with open(fp, "wb") as f:
                f.write(PNG)
        else:
            fp.write(PNG)
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        embedding_projection(emb, labels, tmp_path / "pca.png")
    assert (tmp_path / "pca.png").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pca.png"]
