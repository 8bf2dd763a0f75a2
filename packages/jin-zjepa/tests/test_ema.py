"""EMA target: schedule arithmetic, update arithmetic, no gradient, DDP unwrapping."""

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from jin_zjepa import EMAConfig, EMATarget


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_momentum_schedule_endpoints_and_midpoint(schedule):
    cfg = EMAConfig(schedule=schedule, total_steps=100)
    assert cfg.momentum(0) == pytest.approx(0.996)
    assert cfg.momentum(100) == pytest.approx(1.0)
    assert cfg.momentum(1000) == pytest.approx(1.0)
    assert cfg.momentum(50) == pytest.approx(0.998)  # both schedules pass the midpoint halfway
    quarter = 0.25 if schedule == "linear" else 0.5 * (1 - math.cos(math.pi / 4))
    assert cfg.momentum(25) == pytest.approx(0.996 + 0.004 * quarter)


def test_config_rejects_decreasing_momentum():
    with pytest.raises(ValueError, match="momentum_end"):
        EMAConfig(momentum_start=0.999, momentum_end=0.99, total_steps=10)


def test_update_is_the_ema_of_parameters_and_copies_buffers():
    online = _net(0)
    cfg = EMAConfig(momentum_start=0.9, momentum_end=0.9, total_steps=1, norm_stats="copy")
    target = EMATarget(online, cfg)
    before = {k: v.clone() for k, v in target.module.state_dict().items()}
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
        online[1].running_mean.fill_(3.0)
    m = target.update(online, step=0)
    assert m == pytest.approx(0.9)
    for name, p in online.named_parameters():
        expected = 0.9 * before[name] + 0.1 * p
        torch.testing.assert_close(target.module.state_dict()[name], expected)
    assert torch.equal(target.module[1].running_mean, torch.full((8,), 3.0))


def test_no_gradient_reaches_the_target_and_it_stays_in_eval():
    online = _net(0)
    target = EMATarget(online, EMAConfig(total_steps=10))
    target.train()
    assert not target.module.training and not target.module[2].training  # dropout is off
    x = torch.randn(5, 4)
    out = target(x)
    assert not out.requires_grad
    loss = (online(x) - out).pow(2).mean()
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in target.parameters())
    assert all(p.grad is not None for p in online.parameters())
    torch.testing.assert_close(target(x), target(x))  # deterministic: dropout is off


def test_batch_norm_stats_are_the_targets_own():
    """norm_stats='batch': in training the target normalises with its batch's statistics, never
    the online network's (which do not fit its lagging weights); in eval, with its own."""
    online = _net(0)
    target = EMATarget(online, EMAConfig(momentum_start=0.9, momentum_end=0.9, total_steps=1))
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        online[0].weight.mul_(10.0)  # online activations 10x the target's
        online[1].running_var.fill_(100.0)
        online[1].running_mean.fill_(3.0)
    target.update(online, step=0)
    target.train()
    assert target.module[1].training and not target.module[2].training
    h = target.module[1](target.module[0](x))  # the target's BN output on this batch
    torch.testing.assert_close(h.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(h.var(0, unbiased=False), torch.ones(8), atol=1e-3, rtol=0)
    assert not torch.equal(target.module[1].running_mean, online[1].running_mean)
    own = target.module[1].running_var.clone()
    target.update(online, step=0)
    assert torch.equal(target.module[1].running_var, own)  # not overwritten by the online's
    target.eval()
    assert not target.module[1].training
    torch.testing.assert_close(target(x), target(x))


def test_update_through_ddp_and_dataparallel_wrappers(tmp_path):
    online = _net(0)
    target = EMATarget(online, EMAConfig(momentum_start=0.5, momentum_end=0.5, total_steps=1))
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        ddp = nn.parallel.DistributedDataParallel(online)
        EMATarget(ddp, EMAConfig(total_steps=1))  # wrapping a wrapped module works too
        with torch.no_grad():
            for p in online.parameters():
                p.fill_(2.0)
        old = [p.clone() for p in target.module.parameters()]
        target.update(ddp, step=0)
    finally:
        dist.destroy_process_group()
    for p_old, p_new in zip(old, target.module.parameters(), strict=True):
        torch.testing.assert_close(p_new, 0.5 * p_old + 1.0)
    target.update(nn.DataParallel(online), step=0)


def test_update_rejects_a_different_architecture():
    target = EMATarget(_net(0), EMAConfig(total_steps=1))
    with pytest.raises(ValueError, match="mismatched names"):
        target.update(nn.Linear(4, 2), step=0)
