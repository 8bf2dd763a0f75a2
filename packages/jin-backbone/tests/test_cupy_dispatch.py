"""The CuPy kernels against the PyTorch path: outputs and gradients, fp32 and bf16, uneven and
empty experts, dropped assignments. Runs wherever CUDA and cupy are present; skips elsewhere."""

import pytest
import torch

from jin_backbone import MoE, MoEConfig
from jin_backbone.dispatch import cupy_ops, make_plan, torch_ops

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cupy_ops.cupy_available(), reason="needs CUDA and cupy"),
]

TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
}


def _uneven_routing(num_tokens: int, num_experts: int, top_k: int, gen: torch.Generator):
    # Skewed scores: low experts are popular, the last quarter receive nothing.
    popular = num_experts - max(num_experts // 4, 1) if num_experts > 1 else 1
    scores = torch.rand(num_tokens, popular, generator=gen) * torch.linspace(3, 1, popular)
    experts = scores.topk(top_k, dim=-1).indices
    return experts.cuda(), torch.rand(num_tokens, top_k, generator=gen).cuda()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 33, 7])  # 16-byte, 4-byte and 2-byte copy units
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
@pytest.mark.parametrize("max_padding", [1.0, 100.0], ids=["ragged", "padded"])
def test_permute_and_unpermute_match_torch(dtype, dim, capacity_factor, max_padding):
    gen = torch.Generator().manual_seed(0)
    num_tokens, num_experts, top_k = 300, 16, 2
    experts_NK, weights_NK = _uneven_routing(num_tokens, num_experts, top_k, gen)
    plan = make_plan(experts_NK, num_experts, capacity_factor, max_padding)
    assert 0 in plan.counts
    assert (plan.padded_rows is None) == (max_padding == 1.0)
    x = torch.randn(num_tokens, dim, generator=gen).to("cuda", dtype)
    y_upstream = torch.randn(plan.num_rows, dim, generator=gen).to("cuda", dtype)
    # The permuted rows' upstream gradient is zero on the padded layout's padding rows, as in the
    # MoE layer (nothing combines them): the CuPy backward reads the kept rows only.
    real_rows = torch.zeros(plan.num_rows, 1, dtype=torch.bool, device="cuda")
    real_rows[plan.row_of_assignment[plan.row_of_assignment >= 0]] = True
    grad_permuted = torch.where(real_rows, y_upstream, 0).float()
    grad_out = torch.randn(num_tokens, dim, generator=gen).to("cuda", dtype)

    results = {}
    for name, ops in (("torch", torch_ops), ("cupy", cupy_ops)):
        x_in = x.clone().requires_grad_(True)
        y_in = y_upstream.clone().requires_grad_(True)
        w_in = weights_NK.clone().requires_grad_(True)
        if ops is cupy_ops:
            permuted = ops.permute(x_in, plan.source_token, plan.row_of_assignment)
        else:
            permuted = ops.permute(x_in, plan.source_token)
        combined = ops.unpermute_combine(y_in, w_in, plan.row_of_assignment)
        (permuted.float() * grad_permuted).sum().backward()
        combined.backward(grad_out)
        results[name] = (permuted, combined, x_in.grad, y_in.grad, w_in.grad)
    for got, want in zip(results["cupy"], results["torch"], strict=True):
        torch.testing.assert_close(got.float(), want.float(), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_experts", "top_k"), [(1, 1), (8, 2), (64, 4)])
@pytest.mark.parametrize("max_padding", [1.0, 100.0], ids=["ragged", "padded"])
def test_moe_layer_cupy_equals_torch(dtype, num_experts, top_k, max_padding):
    torch.manual_seed(0)
    cfg = MoEConfig(
        dim=64,
        hidden_dim=96,
        num_experts=num_experts,
        top_k=top_k,
        max_padding=max_padding,
        grouped_gemm=False,  # the layouts this test names (grouped: test_grouped_gemm_on_cuda)
    )
    layers = {
        name: MoE(cfg.model_copy(update={"dispatch": name})).to("cuda", dtype)
        for name in ("torch", "cupy")
    }
    layers["cupy"].load_state_dict(layers["torch"].state_dict())
    x = torch.randn(4, 50, 64, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)
    padding_mask = torch.zeros(4, 50, dtype=torch.bool, device="cuda")
    padding_mask[1, 30:] = True
    out = {name: _outputs_and_grads(layer, x, padding_mask) for name, layer in layers.items()}
    for got, want in zip(out["cupy"], out["torch"], strict=True):
        # Scaled to each tensor's size: the router's weight gradient (~100 here) sums products of
        # the un-permutation's weight gradients, whose reduction order differs from torch's, so
        # its near-zero entries carry absolute errors near 1e-5 * its largest.
        tolerance = TOLERANCE[dtype]
        atol = tolerance["atol"] * max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.float(), want.float(), rtol=tolerance["rtol"], atol=atol)


def _outputs_and_grads(layer, x, padding_mask, autocast=False):
    """The layer's output, the input's gradient and every parameter's, from one step."""
    x_in = x.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y, aux = layer(x_in, padding_mask)
    (y.float().square().sum() + aux.load_balancing_loss).backward()
    return [y, x_in.grad, *(p.grad for p in layer.parameters())]


def test_auto_selects_cupy_on_cuda():
    from jin_backbone.dispatch import resolve_backend

    assert resolve_backend("auto", torch.zeros(1, device="cuda")) == "cupy"
    assert resolve_backend("auto", torch.zeros(1, device="cuda", dtype=torch.float16)) == "torch"
    assert resolve_backend("auto", torch.zeros(1)) == "torch"
    # torch.autocast("cuda")'s default float16: the experts' rows would be float16.
    with torch.autocast("cuda"):
        assert resolve_backend("auto", torch.zeros(1, device="cuda")) == "torch"


@pytest.mark.parametrize("dispatch", ["torch", "cupy"])
@pytest.mark.parametrize(
    ("num_experts", "top_k", "tokens"), [(1, 1, 50), (8, 2, 50), (64, 4, 50), (64, 2, 2)]
)
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "autocast"])
def test_grouped_gemm_on_cuda_equals_the_per_expert_loop(
    dispatch, num_experts, top_k, tokens, autocast
):
    """torch's CUDA grouped GEMM for bf16 compute (bf16 weights, or fp32 ones under bf16
    autocast) gives the per-expert loop's outputs and gradients, idle experts' zeros included
    (64 experts, 8 tokens: most get none); the default takes it on compute capability 8.x-9.x."""
    torch.manual_seed(0)
    cfg = MoEConfig(dim=64, hidden_dim=96, num_experts=num_experts, top_k=top_k, dispatch=dispatch)
    dtype = torch.float32 if autocast else torch.bfloat16
    grouped = MoE(cfg.model_copy(update={"grouped_gemm": True})).to("cuda", dtype)
    loop = MoE(cfg.model_copy(update={"grouped_gemm": False, "max_padding": 1.0})).to("cuda", dtype)
    loop.load_state_dict(grouped.state_dict())
    x = torch.randn(4, tokens, 64, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)
    padding_mask = torch.zeros(4, tokens, dtype=torch.bool, device="cuda")
    padding_mask[1, tokens // 2 :] = True
    hopper_or_older = torch.cuda.get_device_capability() < (10, 0)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        assert MoE(cfg).to("cuda", dtype).uses_grouped_gemm(x) == hopper_or_older
        assert grouped.uses_grouped_gemm(x) and not loop.uses_grouped_gemm(x)
    out = {
        name: _outputs_and_grads(layer, x, padding_mask, autocast)
        for name, layer in (("grouped", grouped), ("loop", loop))
    }
    for got, want in zip(out["grouped"], out["loop"], strict=True):
        torch.testing.assert_close(got.float(), want.float(), **TOLERANCE[torch.bfloat16])
