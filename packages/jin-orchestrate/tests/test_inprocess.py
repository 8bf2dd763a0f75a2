"""In-process curriculum training: stages in order, validation points, identical runs per seed."""

import pytest
import torch

from jin_orchestrate.checkpoint import latest_checkpoint
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


class _Killed(Exception):
    pass


def test_train_in_process_resumes_to_the_weights_of_an_uninterrupted_run(
    test_config, corpus_url, tmp_path
):
    # every step checkpointed, and an EMA: the resume restores mid-stage state, averages included
    train = test_config.train.model_copy(update={"checkpoint_every": 1, "weight_ema": 0.9})
    cfg = test_config.model_copy(update={"train": train})
    model, whole = _train(cfg, corpus_url, ())

    def kill_at(step):
        def on_step(record):
            if record["global_step"] == step:
                raise _Killed

        return on_step

    ckpt = tmp_path / "ckpt"
    for stop in (3, 6):  # mid-stage 2; then stage 3's last step, before its checkpoint
        torch.manual_seed(0)
        killed = JinModel(cfg.model)
        with pytest.raises(_Killed):
            train_in_process(cfg, killed, corpus_url, checkpoint_dir=ckpt, on_step=kill_at(stop))
    stage3 = ckpt / f"stage3-{cfg.stages[2].name}"
    assert sorted(p.name for p in stage3.iterdir()) == ["step-00000001"]
    torch.manual_seed(0)
    resumed = JinModel(cfg.model)
    history = train_in_process(cfg, resumed, corpus_url, checkpoint_dir=ckpt)
    assert [r["global_step"] for r in history.steps] == [6]
    assert history.steps[0]["loss"] == whole.steps[-1]["loss"]
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name, value in whole.ema.state().items():
        torch.testing.assert_close(history.ema.state()[name], value, rtol=0, atol=0)
    # a finished run restored from its checkpoints trains nothing more
    again = JinModel(cfg.model)
    assert train_in_process(cfg, again, corpus_url, checkpoint_dir=ckpt).steps == []
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_damaged_checkpoint_is_trained_again_and_replaced(test_config, corpus_url, tmp_path):
    # latest_checkpoint passes over a damaged checkpoint; the stage is trained again from the
    # previous one, and its checkpoint of the same step used to be refused ("already exists").
    stages = [s.model_copy(update={"steps": 1}) for s in test_config.stages]
    cfg = test_config.model_copy(update={"stages": stages})
    ckpt = tmp_path / "ckpt"
    torch.manual_seed(0)
    model = JinModel(cfg.model)
    train_in_process(cfg, model, corpus_url, checkpoint_dir=ckpt)
    stage3 = ckpt / f"stage3-{cfg.stages[2].name}"
    weights = stage3 / "step-00000001" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    torch.manual_seed(0)
    again = JinModel(cfg.model)
    history = train_in_process(cfg, again, corpus_url, checkpoint_dir=ckpt)
    assert [r["global_step"] for r in history.steps] == [3]
    assert latest_checkpoint(stage3) == stage3 / "step-00000001"
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_curriculum_trains_and_resumes_on_a_gpu(test_config, corpus_url, tmp_path):
    # Host batches from jin-data into a model on the GPU; a checkpoint written there resumed
    # there (optimiser state and weight average beside the parameters).
    train = test_config.train.model_copy(update={"checkpoint_every": 1, "weight_ema": 0.9})
    cfg = test_config.model_copy(update={"train": train})
    ckpt = tmp_path / "ckpt"

    def kill_at_3(record):
        if record["global_step"] == 3:
            raise _Killed

    torch.manual_seed(0)
    with pytest.raises(_Killed):
        train_in_process(
            cfg, JinModel(cfg.model).cuda(), corpus_url, checkpoint_dir=ckpt, on_step=kill_at_3
        )
    torch.manual_seed(0)
    model = JinModel(cfg.model).cuda()
    history = train_in_process(cfg, model, corpus_url, checkpoint_dir=ckpt)
    # killed after step 3, before its checkpoint: step 3 again, from step 2's checkpoint
    assert [r["global_step"] for r in history.steps] == [3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history.steps)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert {t.device.type for t in history.ema.shadow.values()} == {"cuda"}


def test_batches_are_decoded_at_the_rate_the_audio_encoder_reads(test_config, corpus_url):
    # jin-data decodes at 16 kHz unless told; a model reading 8 kHz would take 16 kHz waves for
    # its own rate (evaluation, embedding and serving decode at the model's rate already).
    slow = test_config.model_copy(deep=True)
    slow.model.space.audio.sample_rate = 8000
    assert (test_config.model.audio_sample_rate, slow.model.audio_sample_rate) == (16000, 8000)
    usual, halved = (next(batches(corpus_url, c, "train")) for c in (test_config, slow))
    assert usual["id"] == halved["id"]
    ratio = halved["audio_lengths"].float() / usual["audio_lengths"].float()
    assert torch.allclose(ratio, torch.full_like(ratio, 0.5), atol=0.01)


def test_an_extension_stage_trains_in_process_from_its_column(test_config, corpus_url, tmp_path):
    """As a Ray Train worker does, the runtime modality is read from its column (data.columns):
    in process, the loader was asked for a column named after the modality and refused."""
    from jin_orchestrate.checkpoint import save_checkpoint
    from jin_orchestrate.extend import build_extension_config
    from jin_orchestrate.extension import model_from_checkpoint

    base = save_checkpoint(
        tmp_path / "base",
        JinModel(test_config.model),
        config=test_config.model_dump(mode="json"),
        state={"global_step": 0},
    )
    cfg = build_extension_config(
        test_config.model_dump(mode="json"),
        modality="seven_segment",
        input_dim=14,
        column="custom",
        steps=2,
        lr=5e-3,
    )
    torch.manual_seed(0)
    model, _ = model_from_checkpoint(base, cfg.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = train_in_process(cfg, model, corpus_url)
    assert [r["stage"] for r in history.steps] == ["extend_seven_segment"] * 2
    assert all(r["align"] > 0 for r in history.steps)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    new = ("seven_segment", "modality_embed.4")  # its encoder and its row, online and target
    assert changed and all(any(n in k for n in new) for k in changed), sorted(changed)
