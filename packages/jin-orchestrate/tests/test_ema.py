"""The average of the trained weights: its arithmetic, checkpoints, resumption and loading."""

import pytest
import torch
from torch import nn
from trainers import make_trainer as _trainer
from trainers import straight_and_interrupted

from jin_orchestrate.checkpoint import EMA, CheckpointError
from jin_orchestrate.ema import WeightEMA, apply_ema


def test_the_average_follows_the_warmed_up_decay():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    net.bias.requires_grad_(False)  # only trainable parameters are averaged
    ema = WeightEMA(net, decay=0.9)
    assert set(ema.shadow) == {"weight"}
    assert [ema.decay_at(n) for n in (0, 1, 100)] == pytest.approx([0.1, 2 / 11, 0.9])
    expected = net.weight.detach().clone()
    for n in range(30):
        with torch.no_grad():
            net.weight.add_(torch.randn_like(net.weight))
        ema.update(net)
        d = ema.decay_at(n)
        expected = d * expected + (1 - d) * net.weight.detach()
    torch.testing.assert_close(ema.shadow["weight"], expected)
    assert ema.updates == 30


def test_bad_decays_and_averages_that_do_not_fit_are_refused():
    net = nn.Linear(3, 2)
    for decay in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="decay must be in"):
            WeightEMA(net, decay)
    ema = WeightEMA(net, 0.99)
    with pytest.raises(ValueError, match="missing \\['weight'\\]"):
        ema.load({"bias": torch.zeros(2)}, updates=3)
    with pytest.raises(ValueError, match="lacks: \\['extra'\\]"):
        apply_ema(net, {"extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="weight is \\(2,\\) in the average"):
        apply_ema(net, {"weight": torch.zeros(2)})


def test_checkpoints_keep_the_average_resume_it_and_evaluation_loads_it(
    test_config, batch, tmp_path
):
    from jin_orchestrate.evaluate import load_model

    cfg = test_config.model_copy(
        update={"train": test_config.train.model_copy(update={"weight_ema": 0.5})}
    )
    straight, resumed, path = straight_and_interrupted(cfg, batch, tmp_path, resume_seed=5)
    assert (path / EMA).is_file()
    resumed.restore(path)
    assert resumed.ema is not None and resumed.ema.updates == 2
    for _ in range(2):
        resumed.train_step(batch)
    assert straight.ema is not None
    for name, value in straight.ema.shadow.items():
        torch.testing.assert_close(resumed.ema.shadow[name], value, rtol=0, atol=0, msg=name)

    final = straight.save(tmp_path / "final", epoch=0, batch_in_epoch=4)
    raw = dict(load_model(final, ema=False).named_parameters())
    averaged = dict(load_model(final).named_parameters())
    moved = [n for n in straight.ema.shadow if not torch.equal(raw[n], averaged[n])]
    assert moved, "the average equals the last step's weights"
    for name, value in straight.ema.shadow.items():
        torch.testing.assert_close(averaged[name], value, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(raw[name], dict(straight.core.named_parameters())[name])


def test_without_an_average_the_raw_weights_load_and_asking_for_one_is_an_error(
    test_config, batch, tmp_path
):
    from jin_orchestrate.evaluate import load_model

    trainer = _trainer(test_config)
    assert trainer.ema is None
    trainer.train_step(batch)
    path = trainer.save(tmp_path / "ckpt", epoch=0, batch_in_epoch=1)
    assert not (path / EMA).exists()
    loaded = dict(load_model(path).named_parameters())
    for name, p in trainer.core.named_parameters():
        torch.testing.assert_close(loaded[name], p, rtol=0, atol=0, msg=name)
    with pytest.raises(CheckpointError, match="no averaged weights"):
        load_model(path, ema=True)


def test_evaluate_weights_ema_without_an_average_exits_2_naming_the_checkpoint(
    test_config, batch, corpus_url, tmp_path, capsys
):
    from jin_orchestrate.evaluate import main

    path = _trainer(test_config).save(tmp_path / "ckpt", epoch=0, batch_in_epoch=0)
    assert main(["--checkpoint", str(path), "--data", corpus_url, "--weights", "ema"]) == 2
    assert f"{path}: no averaged weights" in capsys.readouterr().err
