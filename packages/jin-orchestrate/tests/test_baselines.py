"""The baselines of the paper's tables: built from Jin's parts, trained and evaluated as Jin is."""

import pytest
import torch

from jin_orchestrate.baselines import (
    TwoTowerModel,
    dense_config,
    image_jepa_stage,
    single_modality_config,
    zjepa_ablation,
)
from jin_orchestrate.evaluate import evaluate_model
from jin_orchestrate.model import JinModel, count_parameters
from jin_orchestrate.train import StageTrainer
from jin_zjepa import TABLE5_ABLATIONS


def test_two_tower_trains_every_tower_and_shares_nothing(test_config, batch):
    torch.manual_seed(0)
    model = TwoTowerModel(test_config.model)
    towers = list(model.towers.values())
    assert len(towers) == 4
    ids = [{id(p) for p in t.parameters()} for t in towers]
    assert all(not (a & b) for i, a in enumerate(ids) for b in ids[i + 1 :])
    stage = test_config.stages[2]
    losses = model(batch, stage=stage)
    assert set(losses) >= {"loss", "align", "align/audio-text", "align/image-points"}
    # InfoNCE only: at initialisation it sits near ln(batch).
    assert abs(float(losses["align"]) - torch.log(torch.tensor(8.0)).item()) < 0.5
    losses["loss"].backward()
    for name, tower in model.towers.items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters()), name


def test_two_tower_steps_with_stage_trainer_and_evaluates(test_config, batch, corpus_url):
    torch.manual_seed(0)
    model = TwoTowerModel(test_config.model)
    trainer = StageTrainer.create(test_config, test_config.stages[2], model)
    before = [p.detach().clone() for p in model.parameters()]
    result = trainer.train_step(batch)
    assert not result.skipped and result.metrics["align"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    figures = evaluate_model(model, corpus_url)
    assert 0.0 <= figures["retrieval/text_to_audio/R10"] <= 1.0
    assert "linear_probe/image_top1" in figures


def test_dense_config_has_no_experts_and_fewer_parameters(test_config):
    dense = dense_config(test_config.model)
    assert dense.backbone.moe_every == 0
    assert dense.model_dump(exclude={"backbone"}) == test_config.model.model_dump(
        exclude={"backbone"}
    )
    counts, moe = count_parameters(dense), count_parameters(test_config.model)
    assert counts.total == counts.active < moe.total
    model = JinModel(dense)
    assert not any("expert" in name for name, _ in model.encoder.backbone.named_parameters())


@pytest.mark.parametrize("row", list(TABLE5_ABLATIONS))
def test_zjepa_ablation_rows_keep_the_models_zoom_depth(test_config, row):
    cfg = zjepa_ablation(test_config.model, row)
    z = cfg.zjepa
    if row == "single_scale":
        assert z.num_z_levels == 1 and not z.cross_scale
    else:
        assert z.num_z_levels == test_config.model.zjepa.num_z_levels
        assert z.zoom_factors == test_config.model.zjepa.zoom_factors
    assert z.adaptive_zoom == (row in ("adaptive_zoom", "bidirectional_feedback"))
    assert z.predict_coarse_from_fine == (row == "bidirectional_feedback")
    with pytest.raises(ValueError, match="zjepa row 'nope'"):
        zjepa_ablation(test_config.model, "nope")


def test_single_modality_config_drops_the_other_encoders(test_config, batch):
    cfg = single_modality_config(test_config, ("image",))
    assert cfg.model.builtin_modalities == ["image"] and cfg.data.modalities == ("image",)
    model = JinModel(cfg.model)
    losses = model(batch, stage=image_jepa_stage(3))
    assert float(losses["jepa"]) > 0 and torch.isfinite(losses["loss"])
    with pytest.raises(ValueError, match="non-empty subset"):
        single_modality_config(test_config, ("smell",))
