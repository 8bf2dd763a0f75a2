"""``--set stages.N.key=value`` addresses a stage by its index in every config builder (pretrain,
extend, generate train), and only a canonical index that names a stage is accepted."""

from __future__ import annotations

import re

import pytest

from jin_orchestrate import pretrain
from jin_orchestrate.config import load_config
from jin_orchestrate.extend import build_extension_config
from jin_orchestrate.generate import build_generation_config


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
