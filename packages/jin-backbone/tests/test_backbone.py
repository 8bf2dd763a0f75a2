"""Backbone stack, its config checks, and parameter counting on the meta device."""

import pytest
import torch
from pydantic import ValidationError

from jin_backbone import Backbone, BackboneConfig, FeedForward, MoE, count_parameters

TINY = {"dim": 32, "depth": 4, "num_heads": 4, "num_experts": 4, "top_k": 2, "moe_every": 2}


def _backbone(**overrides) -> Backbone:
    torch.manual_seed(0)
    return Backbone(BackboneConfig(**{**TINY, **overrides}))


def test_moe_every_nth_layer_and_dense_baseline():
    kinds = [type(b.ffn) for b in _backbone().blocks]
    assert kinds == [FeedForward, MoE, FeedForward, MoE]
    assert all(isinstance(b.ffn, MoE) for b in _backbone(moe_every=1).blocks)
    assert not any(isinstance(b.ffn, MoE) for b in _backbone(moe_every=0).blocks)


def test_output_aux_loss_is_the_weighted_sum_over_moe_layers():
    model = _backbone(load_balancing_weight=0.5, z_loss_weight=0.25)
    x = torch.randn(2, 7, 32)
    padding_mask = torch.zeros(2, 7, dtype=torch.bool)
    padding_mask[1, 5:] = True
    out = model(x, padding_mask)
    assert out.hidden.shape == (2, 7, 32)
    assert len(out.router_stats) == 2
    torch.testing.assert_close(out.aux_loss, 0.5 * out.load_balancing_loss + 0.25 * out.z_loss)
    assert all(s.tokens_per_expert.sum().item() == 12 * 2 for s in out.router_stats)
    (out.hidden.square().mean() + out.aux_loss).backward()
    assert model.blocks[1].ffn.router.weight.grad.abs().sum() > 0


def test_dense_baseline_has_zero_aux_loss_and_no_stats():
    out = _backbone(moe_every=0)(torch.randn(2, 3, 32))
    assert out.aux_loss.item() == 0 and out.router_stats == []


def test_timestep_and_condition_change_the_output_once_trained_away_from_zero_init():
    model = _backbone()
    x = torch.randn(2, 5, 32)
    t = torch.tensor([10, 500])
    # Fresh adaLN-Zero: the conditioning path is zero, so t changes nothing yet.
    torch.testing.assert_close(model(x, timestep=t).hidden, model(x, timestep=t + 1).hidden)
    for module in model.modules():
        if hasattr(module, "adaLN_modulation"):
            torch.nn.init.normal_(module.adaLN_modulation[-1].weight, std=0.1)
    a = model(x, timestep=t).hidden
    assert not torch.allclose(a, model(x, timestep=t + 1).hidden)
    assert not torch.allclose(a, model(x, timestep=t, cond=torch.randn(2, 32)).hidden)
    assert model(x, timestep=torch.tensor(3)).hidden.shape == (2, 5, 32)  # scalar broadcast


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_heads": 5}, "num_heads=5 does not divide dim=32"),
        ({"top_k": 5}, "top_k=5 exceeds num_experts=4"),
        ({"moe_every": 5}, "moe_every=5 exceeds depth=4"),
        ({"depth": 0}, "depth"),
        ({"conditioning": "film"}, "conditioning"),
        ({"num_expert": 3}, "did you mean 'num_experts'"),
    ],
)
def test_config_rejects_impossible_settings(overrides, message):
    with pytest.raises(ValidationError, match=message):
        BackboneConfig.model_validate({**TINY, **overrides})


def test_bad_inputs_name_the_argument_and_shapes():
    model = _backbone()
    with pytest.raises(ValueError, match=r"expected \(B, T, 32\), got \(2, 3\)"):
        model(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"padding_mask: expected bool of shape \(2, 3\)"):
        model(torch.randn(2, 3, 32), torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"timestep: expected shape \(\) or \(2,\)"):
        model(torch.randn(2, 3, 32), timestep=torch.zeros(3))
    with pytest.raises(ValueError, match=r"cond: expected shape \(2, 32\)"):
        model(torch.randn(2, 3, 32), cond=torch.zeros(2, 8))


def test_count_parameters_matches_the_real_module_and_counts_k_of_e_experts():
    cfg = BackboneConfig(**TINY)
    model = _backbone()
    counted = count_parameters(cfg)
    assert counted.total == sum(p.numel() for p in model.parameters())
    per_expert = (
        model.blocks[1].ffn.experts.w_in[0].numel() + model.blocks[1].ffn.experts.w_out[0].numel()
    )
    assert counted.total - counted.active == 2 * (4 - 2) * per_expert  # two MoE layers
    dense = count_parameters(BackboneConfig(**{**TINY, "moe_every": 0}))
    assert dense.total == dense.active


def test_a_jin_max_scale_configuration_is_counted_on_meta_without_allocation():
    # ZIP-0408's Jin-Max scale (hundreds of billions): width 8192, 60 layers, 64 SwiGLU experts
    # of hidden 4096 in every layer. Expected counts written out from the architecture.
    d, layers, e, k, hx = 8192, 60, 64, 4, 4096
    cfg = BackboneConfig(
        dim=d,
        depth=layers,
        num_heads=64,
        num_experts=e,
        top_k=k,
        moe_every=1,
        expert_hidden_dim=hx,
    )
    expert = d * 2 * hx + hx * d
    per_layer = (d * 3 * d + 3 * d) + (d * d + d) + 2 * 2 * d + (d * 6 * d + 6 * d) + e * d
    per_layer += e * expert
    embedder_and_final = (256 * d + d + d * d + d) + 2 * d + (d * 2 * d + 2 * d)
    counted = count_parameters(cfg)
    assert counted.total == layers * per_layer + embedder_and_final
    assert counted.active == counted.total - layers * (e - k) * expert
    assert counted.total > 4e11
    with torch.device("meta"):
        model = Backbone(cfg)
    assert all(p.is_meta for p in model.parameters())
