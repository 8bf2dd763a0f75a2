"""The stage trainer without Ray: learning, non-finite losses, exact resumption."""

import math
import warnings

import pytest
import torch
from trainers import make_trainer as _trainer
from trainers import straight_and_interrupted

from jin_orchestrate.model import JinModel
from jin_orchestrate.train import NonFiniteLossError, StageTrainer, lr_at


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    assert lr_at(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(55, 100, 1.0, 10, 0.1) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))
    )


def test_steps_on_one_batch_lower_the_alignment_loss(test_config, batch):
    cfg = test_config.model_copy(
        update={
            "stages": [
                test_config.stages[2].model_copy(
                    update={"steps": 30, "alpha": 0.0, "beta": 0.0, "zjepa": 0.0}
                )
            ]
        }
    )
    trainer = _trainer(cfg, stage_index=0)
    first = trainer.train_step(batch).metrics["align"]
    for _ in range(29):
        last = trainer.train_step(batch).metrics["align"]
    assert last < 0.5 * first, (first, last)


def test_the_temperature_is_put_back_on_its_bound_after_each_step(test_config, batch):
    trainer = _trainer(test_config)
    scale = trainer.core.logit_scale
    with torch.no_grad():
        scale.log_scale.fill_(10.0)  # as if the optimiser had pushed it past log(100)
    trainer.train_step(batch)
    assert scale.log_scale.item() == pytest.approx(math.log(100.0))
    assert scale().item() == pytest.approx(100.0)


def test_non_finite_loss_is_skipped_counted_then_stops(test_config, batch, monkeypatch):
    trainer = _trainer(test_config)
    before = {n: p.clone() for n, p in trainer.core.named_parameters()}
    forward = type(trainer.core).forward

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(type(trainer.core), "forward", poisoned)
    for i in range(test_config.train.max_nonfinite_steps - 1):
        result = trainer.train_step(batch)
        assert result.skipped
        assert trainer.nonfinite_total == i + 1
    for name, p in trainer.core.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed on a skipped step"
    with pytest.raises(NonFiniteLossError, match="non-finite for 5 steps in a row"):
        trainer.train_step(batch)


def test_non_finite_gradients_of_a_finite_loss_count_in_a_row_and_stop(test_config, batch):
    """A finite loss can have a non-finite gradient (0 * Inf in the backward); such steps were
    skipped but never counted in a row, so the job never stopped (README: "non-finite loss or
    gradient ... after train.max_nonfinite_steps in a row the job stops")."""
    train = test_config.train.model_copy(update={"max_nonfinite_steps": 2})
    trainer = _trainer(test_config.model_copy(update={"train": train}), stage_index=0)
    first = next(trainer.core.parameters())
    hook = first.register_hook(lambda g: g * float("nan"))
    assert trainer.train_step(batch).skipped and trainer.nonfinite_in_row == 1
    hook.remove()
    assert not trainer.train_step(batch).skipped and trainer.nonfinite_in_row == 0
    first.register_hook(lambda g: g * float("nan"))
    assert trainer.train_step(batch).skipped and trainer.nonfinite_in_row == 1
    with pytest.raises(NonFiniteLossError, match="gradient was non-finite for 2 steps in a row"):
        trainer.train_step(batch)
    assert trainer.nonfinite_total == 3


def test_resume_from_checkpoint_reproduces_an_uninterrupted_run(test_config, batch, tmp_path):
    straight, resumed, path = straight_and_interrupted(test_config, batch, tmp_path, 123)
    assert resumed.restore(path) == (0, 2)
    assert resumed.step == 2
    for _ in range(2):
        resumed.train_step(batch)
    for (name, a), (_, b) in zip(
        straight.core.state_dict().items(), resumed.core.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_the_target_momentum_schedule_starts_at_the_first_step_and_resumes_exactly(
    test_config, batch, tmp_path, monkeypatch
):
    """EMAConfig.momentum(step) is the momentum after optimiser step ``step`` (0-based); the loop
    passed the count after it, so the first update used momentum(1) and the curriculum's last
    momentum 1 (no update at all)."""
    from jin_zjepa.ema import EMATarget

    steps = []
    update = EMATarget.update

    def spy(self, online, step):
        steps.append(step)
        return update(self, online, step)

    monkeypatch.setattr(EMATarget, "update", spy)
    _, resumed, path = straight_and_interrupted(test_config, batch, tmp_path, 123)
    assert steps == [0, 1, 2, 3, 0, 1]  # four straight steps, then two before the checkpoint
    resumed.restore(path)
    for _ in range(2):
        resumed.train_step(batch)
    assert steps[6:] == [2, 3]  # the resumed run's schedule is the uninterrupted one's


def test_each_data_parallel_rank_resumes_its_own_random_streams(test_config, batch, tmp_path):
    # Rank 0 alone writes a Ray job's checkpoint, but every rank draws its own masks and noise
    # (seeded by rank); restored from rank 0's states, all ranks drew the same ones after a resume.
    # One process stands in for two ranks: rank 1 steps first, rank 0 last, so that the global RNG
    # rank 0 saves is its own.
    def rank_trainer(rank):  # as train_stage_worker: the same weights, then seeds by rank
        trainer = _trainer(test_config, seed=7 * (rank + 1))
        torch.manual_seed(100 + rank)
        return trainer

    one = rank_trainer(1)
    one.train_step(batch)
    peers = {1: one.rng_states()}  # what _peer_rng_states all-gathers
    zero = rank_trainer(0)
    zero.train_step(batch)
    path = zero.save(tmp_path / "ckpt", epoch=0, batch_in_epoch=1, peers=peers)
    expected = {0: zero.rng_states(), 1: peers[1]}
    for name in ("mask_generator", "torch_cpu"):
        assert not torch.equal(expected[0][name], expected[1][name]), name
    for rank in (1, 0):
        resumed = rank_trainer(rank)
        resumed.restore(path, rank)
        for name, state in expected[rank].items():
            assert torch.equal(resumed.rng_states()[name], state), (rank, name)
    # a rank the checkpoint has no states for (more workers than before) keeps its own seeds
    extra = rank_trainer(2)
    seeds = extra.rng_states()
    extra.restore(path, 2)
    assert all(torch.equal(extra.rng_states()[k], v) for k, v in seeds.items())


def test_a_trainer_made_for_a_device_resumes_its_optimiser_state_there(
    test_config, batch, tmp_path
):
    # A Ray Train worker builds its trainer, restores a checkpoint, then wraps the model for its
    # GPU. The optimiser state loads onto the parameters' device at restore time, so the model
    # must be there before: moved after, the Adam moments would stay on the host. The meta device
    # stands in for a GPU.
    first = _trainer(test_config)
    first.train_step(batch)
    path = first.save(tmp_path / "ckpt", epoch=0, batch_in_epoch=1)
    torch.manual_seed(0)
    cfg = test_config.model_copy(
        update={"train": test_config.train.model_copy(update={"weight_ema": 0.9})}
    )
    resumed = StageTrainer.create(cfg, cfg.stages[2], JinModel(cfg.model), device="meta")
    with warnings.catch_warnings():  # loading values into meta parameters copies nothing
        warnings.simplefilter("ignore", UserWarning)
        resumed.restore(path)
    assert {p.device.type for p in resumed.core.parameters()} == {"meta"}
    moments = [
        value
        for state in resumed.optimizer.state.values()
        for key, value in state.items()
        if key != "step"  # Adam keeps its step count on the host
    ]
    assert moments and {m.device.type for m in moments} == {"meta"}
    assert {t.device.type for t in resumed.ema.shadow.values()} == {"meta"}


def test_an_epoch_without_a_full_batch_is_an_error_not_an_endless_loop():
    from jin_orchestrate.train import EmptyEpochError, _batches

    epochs = {0: ["a", "b"], 1: []}
    got = _batches(iter(range(3)), lambda e: iter(epochs[e]), skip_first=1, batch_size=8)
    assert next(got) == (0, 2, "b")  # resumed after the first batch of epoch 0
    with pytest.raises(EmptyEpochError, match="epoch 1 gave no full batch of 8 samples"):
        next(got)


def test_a_stop_recorded_by_the_workers_is_raised_as_its_own_type():
    from jin_orchestrate.train import EmptyEpochError, JobStopped, stopped_error

    for kind in (NonFiniteLossError, EmptyEpochError):
        error = stopped_error(f"{kind.__name__}: why. Last good checkpoint: none yet")
        assert type(error) is kind and str(error) == "why. Last good checkpoint: none yet"
    assert type(stopped_error("something else")) is JobStopped


def _bf16(cfg):
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": "bf16"})})


def _linear_output_dtypes(trainer, batch):
    seen = set()
    hooks = [
        m.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
        for m in trainer.core.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    result = trainer.train_step(batch)
    for h in hooks:
        h.remove()
    return seen, result


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_sets_the_forwards_compute_dtype_and_keeps_the_state_float32(
    test_config, batch, precision
):
    cfg = _bf16(test_config) if precision == "bf16" else test_config
    reference = _trainer(test_config).train_step(batch).metrics["loss"]
    trainer = _trainer(cfg)
    dtypes, result = _linear_output_dtypes(trainer, batch)
    assert dtypes == ({torch.bfloat16} if precision == "bf16" else {torch.float32})
    assert not result.skipped and math.isfinite(result.metrics["loss"])
    assert result.metrics["loss"] == pytest.approx(reference, rel=0.02)
    assert {p.dtype for p in trainer.core.parameters()} == {torch.float32}
    moments = [s["exp_avg"] for s in trainer.optimizer.state.values()]
    assert moments and {m.dtype for m in moments} == {torch.float32}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_steps_on_the_gpu(test_config, batch):
    torch.manual_seed(0)
    cfg = _bf16(test_config)
    trainer = StageTrainer.create(cfg, cfg.stages[2], JinModel(cfg.model), device="cuda")
    dtypes, first = _linear_output_dtypes(trainer, batch)
    assert dtypes == {torch.bfloat16}
    losses = [first.metrics["loss"]] + [trainer.train_step(batch).metrics["loss"] for _ in range(4)]
    assert all(math.isfinite(x) for x in losses) and trainer.step == 5
