"""JinConfig: presets, layering, validation that names the key, and parameter counts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from jin_orchestrate.config import PRESETS, PUBLISHED_PARAMETERS, load_config, main
from jin_orchestrate.model import count_parameters


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name):
    cfg = load_config(name)
    assert cfg.preset == name
    assert [s.name for s in cfg.stages] == ["within_modality", "cross_modal", "multimodal"]
    assert cfg.model.space.dim == cfg.model.backbone.dim == cfg.model.predictor.embed_dim


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_published_presets_within_ten_percent_of_their_tables(name):
    counts = count_parameters(load_config(name).model)
    assert abs(counts.total / PUBLISHED_PARAMETERS[name] - 1) <= 0.10, counts
    assert counts.active < counts.total


def test_overrides_reach_nested_keys_and_stage_items():
    cfg = load_config(
        "jin-test", overrides=["train.lr=3e-4", "stages.2.steps=7", "model.backbone.num_experts=8"]
    )
    assert cfg.train.lr == 3e-4
    assert cfg.stages[2].steps == 7
    assert cfg.model.backbone.num_experts == 8


def test_yaml_file_layer(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_size: 4\ndata:\n  samples: 50\n")
    cfg = load_config("jin-test", path)
    assert cfg.train.batch_size == 4
    assert cfg.data.samples == 50


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.lrr=1", "'lrr'"),
        ("model.backbone.top_k=9", "top_k=9 exceeds num_experts=4"),
        ("model.backbone.num_heads=5", "num_heads=5 does not divide dim=32"),
        ("stages.0.steps=0", "steps"),
        ("stages.5.steps=1", "no stage with index"),
        ("data.modalities=[smell]", "data.modalities"),
        # accepted once, then failing inside every Ray worker with an error naming no key
        ("train.seed=-1", "train.seed"),
        ("data.seed=-3", "data.seed"),
        ("data.modalities=[]", "data.modalities"),
        # split over workers as batch_size // num_workers: 8 over 3 trained with 6
        ("train.num_workers=3", "train.batch_size (8) is the global batch"),
        ("train.num_workers=16", "train.num_workers (16)"),
        # accepted, then every loss (or weight) non-finite: the job stopped blaming lr or the data
        ("train.lr=inf", "train.lr\n  Input should be a finite number"),
        ("train.weight_decay=.inf", "train.weight_decay\n  Input should be a finite number"),
        ("stages.0.alpha=inf", "stages.0.alpha\n  Input should be a finite number"),
        ("stages.2.lr=1e400", "stages.2.lr\n  Input should be a finite number"),
    ],
)
def test_bad_settings_fail_naming_the_key(override, fragment):
    with pytest.raises((ValidationError, ValueError)) as err:
        load_config("jin-test", overrides=[override])
    assert fragment in str(err.value)


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="jin-tiny"):
        load_config("jin-huge")


def test_show_prints_resolved_config_and_counts(capsys):
    assert main(["show", "jin-nano"]) == 0
    out = capsys.readouterr().out
    assert '"num_experts": 8' in out
    assert "total parameters:" in out
    assert "active parameters per token:" in out


# `model.ema_momentum` is checked with the config (jin_zjepa's EMAConfig rules), so a bad value
# fails before a job starts Ray workers, naming the key.


def test_ema_momentum_outside_zero_start_end_one_is_refused_naming_the_key():
    for bad in ("[1.5, -2.0]", "[0.9, 0.5]", "[-0.1, 1.0]", "[0.5, 1.01]", "[.nan, 1.0]"):
        with pytest.raises(ValueError, match=r"model\.ema_momentum: expected \(start, end\)"):
            load_config("jin-test", overrides=[f"model.ema_momentum={bad}"])
    for good in ((0.0, 0.0), (0.5, 1.0), (1.0, 1.0)):
        override = f"model.ema_momentum=[{good[0]}, {good[1]}]"
        assert load_config("jin-test", overrides=[override]).model.ema_momentum == good


def test_an_extension_stage_aligned_with_its_own_trainable_modality_is_refused():
    # Accepted once; the new modality then had no anchor, and its InfoNCE was 0 every step.
    trainable = "stages.2.trainable=[image]"
    with pytest.raises(ValidationError, match=r"stages\.2\n.*align_with=\['image'\] are trainable"):
        load_config("jin-test", overrides=[trainable, "stages.2.align_with=[text, image]"])
    cfg = load_config("jin-test", overrides=[trainable, "stages.2.align_with=[text]"])
    assert cfg.stages[2].align_with == ("text",)
