"""In-process curriculum training: stages in order, validation points, identical runs per seed."""

import torch

from jin_orchestrate.inprocess import batches, train_in_process, validation_losses
from jin_orchestrate.model import JinModel


def _train(cfg, url, val):
    torch.manual_seed(0)
    model = JinModel(cfg.model)
    return model, train_in_process(cfg, model, url, val_batches=val, val_every=4)


def test_train_in_process_runs_every_stage_and_repeats_exactly(test_config, corpus_url):
    val = list(batches(corpus_url, test_config, "val", epochs=1))[:1]
    model, history = _train(test_config, corpus_url, val)
    assert [r["stage"] for r in history.steps] == [s.name for s in test_config.stages for _ in "ab"]
    assert [r["global_step"] for r in history.steps] == list(range(1, 7))
    assert [p["global_step"] for p in history.validation] == [4, 6]
    assert history.validation[-1]["align"] > 0  # stage 3 has alignment on
    again, history2 = _train(test_config, corpus_url, val)
    assert [r["loss"] for r in history.steps] == [r["loss"] for r in history2.steps]
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_validation_losses_are_repeatable(test_config, batch):
    model = JinModel(test_config.model)
    first = validation_losses(model, [batch], test_config.stages[2], seed=3)
    assert first == validation_losses(model, [batch], test_config.stages[2], seed=3)
    assert not model.training
