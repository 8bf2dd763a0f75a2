"""Evaluation of a model on a corpus: every figure present, bounded, and in the summary."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jin_data import list_shards
from jin_orchestrate.checkpoint import read_config, save_checkpoint
from jin_orchestrate.evaluate import (
    _retrieval,
    _zero_shot,
    evaluate_checkpoint,
    evaluate_model,
    format_summary,
    load_model,
    main,
    prompt_embeddings,
)
from jin_orchestrate.model import JinModel


def test_evaluate_model_reports_zero_shot_and_retrieval(test_config, corpus_url):
    torch.manual_seed(0)
    model = JinModel(test_config.model)
    result = evaluate_model(model, corpus_url)
    assert result["test_samples"] > 0
    assert result["retrieval_pool"] >= 2
    recalls = {k: v for k, v in result.items() if k.startswith("retrieval/") and "/R" in k}
    assert len(recalls) == 12 * 3  # every direction between text, audio, image, points
    instance = [k for k in result if k.startswith("retrieval_instance/")]
    assert len(instance) == 12 * 3
    assert 0.0 <= result["linear_probe/image_top1"] <= 1.0
    assert all(0.0 <= v <= 1.0 for v in recalls.values())
    summary = format_summary(result)
    assert "R@10 text→audio" in summary
    # Zero-shot needs held-out numbers in the test split: images (CLIP) and speech (CLAP).
    for prefix, what in (("zero_shot", "images"), ("zero_shot_audio", "speech")):
        if f"{prefix}_top1" in result:
            assert 0.0 <= result[f"{prefix}_top1"] <= result[f"{prefix}_top5"] <= 1.0
            assert f"zero-shot top-1, {what} of held-out numbers" in summary


def test_text_reading_reference_is_perfect_for_the_prompts_and_low_when_shuffled(test_config):
    torch.manual_seed(0)
    model = JinModel(test_config.model).eval()
    labels = torch.tensor([3, 42, 99, 7, 56, 3])
    prompts = prompt_embeddings(model, list(range(100)))
    seen = {3, 42, 99}  # 7 and 56 are held out
    exact = _zero_shot(model, {"text": prompts[labels]}, labels, seen)
    assert exact["zero_shot_text_top1_all_test"] == 1.0
    assert exact["zero_shot_text_top1"] == 1.0 and exact["zero_shot_text_samples"] == 2.0
    wrong = _zero_shot(model, {"text": prompts[labels.roll(1)]}, labels, seen)
    assert wrong["zero_shot_text_top1_all_test"] < 0.5
    summary = format_summary(
        {
            **exact,
            "zero_shot_seven_segment_top1_all_test": 0.5,
            "zero_shot_seven_segment_top10_all_test": 0.9,
        }
    )
    assert "reference: text captions→text prompts, test samples, R@1 (100-way) | 100.0%" in summary
    assert "zero-shot top-1, captions (reference" in summary


def test_prompt_embeddings_are_one_normalised_vector_per_number(test_config):
    model = JinModel(test_config.model).eval()
    emb = prompt_embeddings(model, [3, 42, 99])
    assert emb.shape == (3, test_config.model.dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))


def test_retrieval_of_identical_embeddings_is_perfect_in_both_pools():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(30).repeat(2)
    x = torch.nn.functional.normalize(torch.randn(60, 16, generator=g), dim=-1)
    r = _retrieval({"text": x, "audio": x, "image": x[torch.randperm(60, generator=g)]}, labels)
    assert r["retrieval_instance/text_to_audio/R1"] == 1.0
    assert r["retrieval_pool"] == 30 and r["retrieval_instance_pool"] == 60
    # Prototypes of identical items are identical, so a class's nearest prototype is its own
    # only if the two items of a class are closer to their mean than to other means: random
    # 16-D vectors are, nearly always; R@10 is certain.
    assert r["retrieval/text_to_audio/R10"] == 1.0
    # Shuffled image rows: instance retrieval of the own pair drops to about chance.
    assert r["retrieval_instance/text_to_image/R1"] < 0.2


def test_cli_writes_tables_json_plots_and_rejects_a_missing_checkpoint(
    checkpoint, corpus_url, tmp_path, capsys
):
    out = tmp_path / "eval.json"
    rc = main(
        [
            "--checkpoint",
            str(checkpoint),
            "--data",
            corpus_url,
            "--json",
            str(out),
            "--markdown",
            str(tmp_path / "eval.md"),
            "--plots",
            str(tmp_path / "plots"),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert 0.0 <= report["metrics"]["retrieval/text_to_audio/R10"] <= 1.0
    assert report["published_for_context"]["table2_imagenet_zero_shot_top1"]["Jin-Base"] == 82.1
    assert "## Table 3" in (tmp_path / "eval.md").read_text()
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "embeddings_pca.png",
        "text_audio_similarity.png",
    ]
    assert main(["--checkpoint", str(tmp_path / "nope"), "--data", corpus_url]) == 2
    assert "neither a directory nor an MLflow URI" in capsys.readouterr().err


def test_cli_rejects_a_device_it_cannot_use(checkpoint, corpus_url, capsys, monkeypatch):
    base = ["--checkpoint", str(checkpoint), "--data", corpus_url]
    assert main([*base, "--device", "tpu0"]) == 2
    assert "--device tpu0" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*base, "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA device is available here" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main([*base, "--device", "cuda:1"]) == 2
    assert "--device cuda:1: this machine has 1 GPU(s)" in capsys.readouterr().err
    assert main([*base, "--device", "cuda:1", "--generation"]) == 2
    assert "--device cuda:1: this machine has 1 GPU(s)" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_evaluation_on_the_gpu_gives_the_cpus_figures(checkpoint, corpus_url):
    on_cpu = evaluate_model(load_model(checkpoint), corpus_url)
    on_gpu = evaluate_model(load_model(checkpoint, device="cuda"), corpus_url)
    assert on_gpu.keys() == on_cpu.keys()
    # The same weights; embeddings differ in the last bits, so a tie may break the other way.
    for key, value in on_cpu.items():
        assert abs(on_gpu[key] - value) <= 0.05, key


# `python -m jin_orchestrate.evaluate` (and `evaluate_checkpoint` by default) evaluates with
# the data config stored in the checkpoint, as pretraining's own evaluation does: runtime-added
# modalities get their rows, and its `data.on_error` decides what a bad row does.


def test_the_cli_uses_the_checkpoints_columns_and_on_error(checkpoint, corpus_url, tmp_path):
    # The fixture's checkpoint as `extend` records it: seven_segment read from the custom column;
    # bad rows skipped.
    config = read_config(checkpoint)
    data = config["data"]
    data.update(
        modalities=[*data["modalities"], "seven_segment"],
        columns={"seven_segment": "custom"},
        on_error="skip",
    )
    extended = save_checkpoint(
        tmp_path / "extended", load_model(checkpoint), config=config, state={"global_step": 0}
    )
    # The corpus with one test image that does not decode.
    fs, [shard] = list_shards(corpus_url)
    with fs.open(shard.path, "rb") as f:
        table = pq.read_table(f)
    splits = table["split"].to_pylist()
    images = table["image"].to_pylist()
    images[splits.index("test")] = b"not an image"
    damaged = tmp_path / "corpus" / "shard-00000.parquet"
    damaged.parent.mkdir()
    column = table.schema.get_field_index("image")
    pq.write_table(table.set_column(column, "image", pa.array(images, pa.binary())), damaged)

    out = tmp_path / "eval.json"
    argv = ["--checkpoint", str(extended), "--data", str(damaged.parent), "--json", str(out)]
    assert main(argv) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["test_samples"] == splits.count("test") - 1
    for direction in ("seven_segment_to_text", "text_to_seven_segment"):
        assert 0.0 <= metrics[f"retrieval/{direction}/R10"] <= 1.0
    assert "zero_shot_seven_segment_top1_all_test" in metrics
    # The library call defaults to the same stored config.
    library = evaluate_checkpoint(extended, str(damaged.parent))
    assert library["test_samples"] == metrics["test_samples"]
    assert "retrieval/seven_segment_to_text/R10" in library


# A sample may lack a modality (jin-data: `<modality>_present` False; `extend`'s README: "rows
# without the vector are fine") or a label (-1). Such a sample used to be scored anyway: its
# all-padding embedding (a zero vector) as a query and a candidate, -1 as a "held-out number" and
# a class, and a null train label crashed `_train_labels`.


class _Oracle(torch.nn.Module):
    """A perfectly aligned stand-in (`evaluate` takes anything with ``cfg`` and ``embed``): an item
    of number n embeds as the one-hot of n (its number read from its id, also where the label is
    withheld; a text's from its caption), an absent item as the model does, a zero vector."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        from jin_data.numberworld.text import CAPTION_TEMPLATES, number_words

        super().__init__()
        self.cfg = SimpleNamespace(
            builtin_modalities=["text", "image", "audio", "points"],
            extra_modalities={"seven_segment": None},
        )
        self.numbers = {
            t.format(digits=str(n), words=number_words(n)): n
            for n in range(100)
            for t in CAPTION_TEMPLATES
        }

    def embed(self, batch: dict) -> dict:
        out = {}
        for name in ("text", "image", "audio", "points", "seven_segment"):
            if f"{name}_present" not in batch:
                continue
            if name == "text":
                numbers = [self.numbers[t] if t else 0 for t in batch["text"]]
            else:
                numbers = [int(i.split("_")[0][1:]) for i in batch["id"]]
            one_hot = torch.nn.functional.one_hot(torch.tensor(numbers), 100).float()
            out[name] = one_hot * batch[f"{name}_present"][:, None]
        return out


def _corpus(url, *, unlabelled=(), no_image=(), no_custom=(), test_split="test"):
    """Numbers 0-7 twice in train, 0-8 twice in test (8 held out); text, image and custom."""
    import numpy as np

    from jin_data import write_dataset

    samples = []
    for i in range(34):
        split, n = ("train", i % 8) if i < 16 else (test_split, (i - 16) % 9)
        samples.append(
            {
                "id": f"n{n}_{i}",
                "split": split,
                "label": None if i in unlabelled else n,
                "text": f"the number {n}",
                "image": None if i in no_image else np.full((8, 8), 10 * n, np.uint8),
                "custom": None if i in no_custom else np.full(14, float(n), np.float32),
            }
        )
    write_dataset(samples, url, custom_dim=14)
    return url


def test_samples_lacking_a_modality_are_not_scored_for_it(tmp_path):
    from jin_orchestrate.config import DataConfig
    from jin_orchestrate.evaluate import evaluate

    # Test rows 17, 19, ... lack the vector (numbers 1, 3, 5, 7 have none), 20 and 21 the image.
    url = _corpus(str(tmp_path / "d"), no_image=(20, 21), no_custom=range(17, 34, 2))
    data_cfg = DataConfig.model_validate(
        {"modalities": ["text", "image", "seven_segment"], "columns": {"seven_segment": "custom"}}
    )
    m = evaluate(_Oracle(), url, data_cfg).metrics
    assert m["test_samples"] == 18
    assert not any("audio" in k or "points" in k for k in m)  # no sample has them
    for direction in ("image_to_text", "text_to_image", "seven_segment_to_text"):
        assert m[f"retrieval/{direction}/R1"] == 1.0, direction
    # Text queries of 1, 3, 5, 7 have no seven-segment candidate of their number.
    assert m["retrieval/text_to_seven_segment/R1"] == 1.0
    assert m["zero_shot_top1"] == 1.0 and m["zero_shot_samples"] == 2.0
    assert m["zero_shot_top1_all_test"] == 1.0
    assert m["zero_shot_seven_segment_top1_all_test"] == 1.0
    assert (
        m["linear_probe/image_top1"] == 1.0 and m["linear_probe/image_samples"] == 14.0
    )  # 8 held out
    assert m["retrieval_pool"] == 9.0 and m["retrieval_instance_pool"] == 18.0


def test_samples_without_a_label_are_not_a_number(tmp_path):
    from jin_orchestrate.evaluate import evaluate

    # Train row 3 and test rows 24 (an 8, held out) and 30 have no label.
    url = _corpus(str(tmp_path / "d"), unlabelled=(3, 24, 30))
    m = evaluate(_Oracle(), url).metrics
    assert m["zero_shot_samples"] == 1.0  # the labelled 8 only
    for prefix in ("zero_shot", "zero_shot_text"):
        assert m[f"{prefix}_top1"] == 1.0 and m[f"{prefix}_top1_all_test"] == 1.0
    assert m["retrieval_pool"] == 9.0
    assert m["retrieval/image_to_text/R1"] == m["retrieval/text_to_image/R1"] == 1.0
    assert m["linear_probe/image_top1"] == 1.0 and m["linear_probe/image_classes"] == 8.0


def test_data_without_labels_or_test_rows_gives_the_figures_it_can(tmp_path):
    """extend's README: `split`/`label` only if you want the closing evaluation. Unlabelled data
    (or test rows of numbers the train split lacks) has no probe to fit or score, and data without
    test rows nothing to score; both crashed the evaluation, and so the job after its training."""
    from jin_orchestrate.evaluate import evaluate
    from jin_orchestrate.tables import evaluation_markdown

    unlabelled = evaluate(_Oracle(), _corpus(str(tmp_path / "u"), unlabelled=range(34))).metrics
    assert unlabelled["test_samples"] == 18
    assert unlabelled["retrieval_instance/image_to_text/R10"] == 1.0
    assert not any(k.startswith(("linear_probe", "zero_shot", "retrieval/")) for k in unlabelled)
    # Labelled train rows, test rows unlabelled: instance retrieval only, again.
    test_unlabelled = evaluate(_Oracle(), _corpus(str(tmp_path / "t"), unlabelled=range(16, 34)))
    assert not any(k.startswith("linear_probe") for k in test_unlabelled.metrics)
    no_test = evaluate(_Oracle(), _corpus(str(tmp_path / "n"), test_split="val"))
    assert no_test.metrics == {"test_samples": 0.0} and len(no_test.labels) == 0
    for metrics in (unlabelled, test_unlabelled.metrics, no_test.metrics):
        format_summary(metrics)
        evaluation_markdown({"model": metrics})


def test_the_data_is_decoded_at_the_models_audio_rate(corpus_url):
    """As in training: a model whose audio encoder reads 8 kHz is fed 8 kHz waves."""
    from jin_orchestrate.evaluate import _embed_split

    class Recorder(torch.nn.Module):
        def __init__(self, rate: int) -> None:
            super().__init__()
            self.audio_sample_rate, self.lengths = rate, []

        def embed(self, batch: dict) -> dict:
            self.lengths.append(batch["audio_lengths"])
            return {"audio": torch.zeros(len(batch["id"]), 4)}

    usual, slow = Recorder(16000), Recorder(8000)
    for model in (usual, slow):
        _embed_split(model, corpus_url, "test", ["audio"])
    ratio = torch.cat(slow.lengths).float() / torch.cat(usual.lengths).float()
    assert torch.allclose(ratio, torch.full_like(ratio, 0.5), atol=0.01)


def test_plots_leave_out_samples_lacking_a_modality(tmp_path, monkeypatch):
    """A sample without an image embeds as a zero vector; the plots drew it as one (the PCA map
    a cluster of them, the similarity matrix a class -1 for the unlabelled)."""
    from jin_orchestrate import plots
    from jin_orchestrate.config import DataConfig
    from jin_orchestrate.evaluate import evaluate, write_plots

    # Test rows 20 and 21 lack the image, odd ones from 17 the vector; row 30 has no label.
    url = _corpus(
        str(tmp_path / "d"), no_image=(20, 21), no_custom=range(17, 34, 2), unlabelled=(30,)
    )
    data_cfg = DataConfig.model_validate(
        {"modalities": ["text", "image", "seven_segment"], "columns": {"seven_segment": "custom"}}
    )
    evaluation = evaluate(_Oracle(), url, data_cfg)
    projected = []
    pca_2d = plots.pca_2d
    monkeypatch.setattr(plots, "pca_2d", lambda x: projected.append(x) or pca_2d(x))
    paths = write_plots(evaluation, tmp_path / "plots")
    assert [p.name for p in paths] == ["embeddings_pca.png"]  # no audio: no similarity matrix
    [x] = projected
    assert len(x) == 18 + 16 + 9  # text, the images of 16 samples, the vectors of 9
    assert bool((x.norm(dim=-1) > 0).all())


def test_the_similarity_plot_reads_numbered_samples_with_text_and_audio(tmp_path, monkeypatch):
    from jin_orchestrate import plots
    from jin_orchestrate.evaluate import Evaluation, write_plots

    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, -1, 2])
    audio = torch.tensor([True, True, True, False, True, True, True, False])
    emb = {m: torch.nn.functional.normalize(torch.randn(8, 4, generator=g), dim=-1) for m in "ab"}
    emb = {"text": emb["a"], "audio": emb["b"] * audio[:, None]}  # absent audio: zero vectors
    seen = {}
    similarity = plots.similarity_matrix

    def spy(query, pool, labels_N, path, *args, **kwargs):
        seen.update(query=query, pool=pool, labels=labels_N)
        return similarity(query, pool, labels_N, path, *args, **kwargs)

    monkeypatch.setattr(plots, "similarity_matrix", spy)
    write_plots(Evaluation({}, emb, labels, {"audio": audio}), tmp_path)
    rows = torch.tensor([0, 1, 2, 4, 5])
    assert torch.equal(seen["labels"], labels[rows])
    assert torch.equal(seen["query"], emb["text"][rows])
    assert torch.equal(seen["pool"], emb["audio"][rows])
