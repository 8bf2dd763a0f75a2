"""Config layering: files, --set overrides, and errors that name the key."""

from __future__ import annotations

import re

import pytest

from jin_orchestrate import pretrain
from jin_orchestrate.config import load_config
from jin_orchestrate.extend import build_extension_config
from jin_orchestrate.generate import build_generation_config
from jin_orchestrate.overrides import apply_overrides, deep_merge, load_mapping, parse_override


def test_parse_override_types_values_like_yaml():
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("a.b=true") == (["a", "b"], True)
    assert parse_override("z=[1.0, 0.5]") == (["z"], [1.0, 0.5])
    assert parse_override("name=jin") == (["name"], "jin")


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1"])
def test_malformed_override_is_rejected(bad):
    with pytest.raises(ValueError, match=r"path\.to\.key=value"):
        parse_override(bad)


def test_overrides_apply_in_order_and_create_sections():
    out = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=2", "train.lr=3", "data.url=x"])
    assert out == {"train": {"lr": 3}, "data": {"url": "x"}}


def test_override_through_a_value_names_the_path():
    with pytest.raises(ValueError, match=r"train\.lr is a value"):
        apply_overrides({"train": {"lr": 1.0}}, ["train.lr.x=1"])


def test_deep_merge_merges_nested_and_does_not_mutate():
    base = {"a": {"b": 1, "c": 2}, "d": [1]}
    out = deep_merge(base, {"a": {"c": 3}, "d": [2]})
    assert out == {"a": {"b": 1, "c": 3}, "d": [2]}
    assert base == {"a": {"b": 1, "c": 2}, "d": [1]}


def test_load_mapping_reads_yaml_and_json_and_names_bad_files(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lr: 0.1\n")
    (tmp_path / "c.json").write_text('{"train": {"lr": 0.2}}')
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    assert load_mapping(tmp_path / "c.yaml") == {"train": {"lr": 0.1}}
    assert load_mapping(tmp_path / "c.json") == {"train": {"lr": 0.2}}
    with pytest.raises(ValueError, match=r"bad\.yaml"):
        load_mapping(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError, match=r"missing\.yaml"):
        load_mapping(tmp_path / "missing.yaml")


# `--set stages.N.key=value` addresses a stage by its index in every config builder (pretrain,
# extend, generate train), and only a canonical index that names a stage is accepted.


def _extension(overrides):
    base = load_config("jin-test").model_dump(mode="json")
    return build_extension_config(
        base, modality="imu", input_dim=6, column="custom", steps=600, lr=5e-3, overrides=overrides
    )


def _generation(overrides):
    base = load_config("jin-test").model_dump(mode="json")
    return build_generation_config(base, steps=1000, lr=2e-3, overrides=overrides)


def test_extend_and_generate_train_set_a_stage_by_index():
    ext = _extension(["stages.0.steps=50", "stages.0.align_with=[text, audio]"])
    assert ext.stages[0].steps == 50
    assert ext.stages[0].align_with == ("text", "audio")
    assert ext.stages[0].name == "extend_imu"  # the rest of the stage is kept
    gen = _generation(["stages.0.steps=50", "stages.0.lr=1e-3"])
    assert (gen.stages[0].steps, gen.stages[0].lr, gen.stages[0].generation) == (50, 1e-3, 1.0)


@pytest.mark.parametrize("index", ["02", "00", "+1", "-1", "3", "x"])
def test_a_stage_index_that_names_no_stage_is_refused_naming_the_override(index):
    override = f"stages.{index}.steps=5"
    message = re.escape(f"override '{override}': no stage with index '{index}'")
    with pytest.raises(ValueError, match=message):
        load_config("jin-test", overrides=[override])
    with pytest.raises(ValueError, match=message):
        _extension([override])
    with pytest.raises(ValueError, match=message):
        _generation([override])


def test_pretrain_reports_a_non_canonical_stage_index_as_bad_input(monkeypatch, capsys, tmp_path):
    """`--set stages.02.steps=5` was an uncaught KeyError; now it is the CLI's bad-input exit."""
    monkeypatch.setattr(pretrain, "run_pretraining", pytest.fail)
    argv = ["--preset", "jin-test", "--set", "stages.02.steps=5", "--output", str(tmp_path / "j")]
    assert pretrain.main(argv) == 2
    assert "no stage with index '02'" in capsys.readouterr().err


def test_stage_overrides_apply_in_order_also_after_a_new_stages_list():
    cfg = load_config(
        "jin-test",
        overrides=["stages.1.steps=5", "stages=[{name: only, steps: 3}]", "stages.0.steps=4"],
    )
    assert [(s.name, s.steps) for s in cfg.stages] == [("only", 4)]
