"""The MoE layer against the seed's naive loop, and its routing losses and statistics."""

import pytest
import torch
from pydantic import ValidationError
from torch.utils._python_dispatch import TorchDispatchMode

from jin_backbone import MoE, MoEConfig, Router, load_balancing_loss, router_z_loss
from jin_backbone.dispatch import expert_capacity, make_plan

CASES = [(e, k) for e in (1, 4, 64) for k in (1, 2, 4) if k <= e]


def _pair(num_experts: int, top_k: int, **overrides) -> tuple[MoE, MoE]:
    """Two layers with identical weights: ``torch`` dispatch and the ``naive`` reference."""
    torch.manual_seed(0)
    cfg = MoEConfig(dim=24, hidden_dim=40, num_experts=num_experts, top_k=top_k, **overrides)
    fast = MoE(cfg.model_copy(update={"dispatch": "torch"}))
    naive = MoE(cfg.model_copy(update={"dispatch": "naive"}))
    naive.load_state_dict(fast.state_dict())
    return fast, naive


def _run(moe: MoE, x: torch.Tensor, padding_mask=None):
    x = x.clone().requires_grad_(True)
    y, aux = moe(x, padding_mask)
    # A loss that mixes output, both auxiliary losses and every parameter path.
    loss = (y * torch.linspace(-1, 1, y.shape[-1])).sum() + aux.load_balancing_loss + aux.z_loss
    loss.backward()
    # Parameters no token reached have no gradient at all; compare them as zeros.
    grads = {
        name: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for name, p in moe.named_parameters()
    }
    return y.detach(), x.grad, grads, aux


# The three ways the experts run: one matmul per expert, one bmm over padded rows, and one
# grouped GEMM (torch's CPU kernel here; what the default takes where the widths allow).
LAYOUTS = {
    "ragged": {"max_padding": 1.0, "grouped_gemm": False},
    "padded": {"max_padding": 100.0, "grouped_gemm": False},
    "grouped": {"grouped_gemm": True},
}
layouts = pytest.mark.parametrize("layout", list(LAYOUTS))


@pytest.mark.parametrize(("num_experts", "top_k"), CASES)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@layouts
def test_dropless_matches_naive_outputs_and_gradients(num_experts, top_k, activation, layout):
    fast, naive = _pair(num_experts, top_k, activation=activation, **LAYOUTS[layout])
    x = torch.randn(3, 11, 24, generator=torch.Generator().manual_seed(1))
    y_fast, gx_fast, g_fast, aux_fast = _run(fast, x)
    y_naive, gx_naive, g_naive, aux_naive = _run(naive, x)
    torch.testing.assert_close(y_fast, y_naive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_fast, gx_naive, rtol=1e-5, atol=1e-5)
    for name in g_fast:
        torch.testing.assert_close(g_fast[name], g_naive[name], rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(aux_fast.stats.tokens_per_expert, aux_naive.stats.tokens_per_expert)
    assert aux_fast.stats.tokens_per_expert.sum().item() == 33 * top_k


@layouts
def test_experts_that_receive_no_token_get_zero_gradient_and_match_naive(layout):
    fast, naive = _pair(64, 2, **LAYOUTS[layout])
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(2))  # 10 assignments, 64 experts
    y_fast, gx_fast, g_fast, aux = _run(fast, x)
    y_naive, gx_naive, g_naive, _ = _run(naive, x)
    idle = aux.stats.tokens_per_expert == 0
    assert idle.sum() >= 54
    torch.testing.assert_close(y_fast, y_naive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_fast, gx_naive, rtol=1e-5, atol=1e-5)
    assert g_fast["experts.w_in"][idle].abs().max() == 0
    assert g_fast["experts.w_in"][~idle].abs().amin(dim=(1, 2)).max() > 0
    torch.testing.assert_close(g_fast["experts.w_out"], g_naive["experts.w_out"])


@pytest.mark.parametrize("dispatch", ["torch", "grouped", "naive"])
def test_zero_tokens(dispatch):
    fast, naive = _pair(4, 2, grouped_gemm=dispatch == "grouped")
    moe = naive if dispatch == "naive" else fast
    y, grad_x, grads, aux = _run(moe, torch.randn(0, 24))
    assert y.shape == (0, 24) and grad_x.shape == (0, 24)
    assert aux.load_balancing_loss.item() == 0 and aux.z_loss.item() == 0
    assert aux.stats.tokens_per_expert.tolist() == [0, 0, 0, 0]
    assert all(torch.isfinite(g).all() for g in grads.values())
    y3, _ = moe(torch.randn(2, 0, 24))
    assert y3.shape == (2, 0, 24)


@pytest.mark.parametrize(("num_experts", "top_k"), [(4, 2), (64, 4)])
@layouts
def test_padded_tokens_are_not_routed(num_experts, top_k, layout):
    fast, naive = _pair(num_experts, top_k, **LAYOUTS[layout])
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 24, generator=gen)
    padding_mask = torch.zeros(2, 7, dtype=torch.bool)
    padding_mask[0, 4:] = True
    padding_mask[1, 6:] = True
    y, grad_x, grads, aux = _run(fast, x, padding_mask)
    y_naive, grad_naive, grads_naive, _ = _run(naive, x, padding_mask)
    torch.testing.assert_close(y, y_naive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_x, grad_naive, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_naive[name], rtol=1e-5, atol=1e-5)
    assert y[padding_mask].abs().max() == 0
    assert grad_x[padding_mask].abs().max() == 0
    assert aux.stats.tokens_per_expert.sum().item() == 10 * top_k
    # Routing only the valid tokens gives the same outputs, losses and statistics.
    y_valid, aux_valid = fast(x[~padding_mask])
    torch.testing.assert_close(y[~padding_mask], y_valid)
    torch.testing.assert_close(aux.load_balancing_loss, aux_valid.load_balancing_loss)
    torch.testing.assert_close(aux.z_loss, aux_valid.z_loss)
    assert torch.equal(aux.stats.tokens_per_expert, aux_valid.stats.tokens_per_expert)


def test_the_default_takes_the_grouped_gemm_where_torch_has_a_kernel_and_true_requires_it():
    moe = MoE(MoEConfig(dim=24, hidden_dim=40, num_experts=4, top_k=2))
    x = torch.randn(5, 24)
    assert moe.uses_grouped_gemm(x) and moe.uses_grouped_gemm(x.bfloat16())
    assert not moe.uses_grouped_gemm(x.double())  # no CPU kernel: the per-expert layouts
    assert not moe.uses_grouped_gemm(x.to("meta"))  # neither CPU nor CUDA
    assert not MoE(moe.cfg.model_copy(update={"grouped_gemm": False})).uses_grouped_gemm(x)
    naive = moe.cfg.model_copy(update={"grouped_gemm": True, "dispatch": "naive"})
    assert not MoE(naive).uses_grouped_gemm(x)
    odd = MoE(MoEConfig(dim=24, hidden_dim=36, num_experts=4, top_k=2))
    assert odd.uses_grouped_gemm(x) and not odd.uses_grouped_gemm(x.bfloat16())  # 72-byte rows
    odd_on = MoE(odd.cfg.model_copy(update={"grouped_gemm": True}))
    with pytest.raises(
        ValueError, match=r"hidden_dim=36 must be multiples of 8 for torch.bfloat16"
    ):
        odd_on.uses_grouped_gemm(x.bfloat16())
    with pytest.raises(ValueError, match="grouped_gemm"):
        MoEConfig(dim=8, hidden_dim=8, grouped_gemm="sometimes")


def test_idle_experts_get_zero_gradient_whatever_the_grouped_kernel_leaves(monkeypatch):
    """Where torch's grouped GEMM may leave garbage in the weight gradient of empty groups
    (Blackwell GPUs), idle experts still get exactly zero gradient: here a kernel that leaves NaN
    there, on a device treated as one that needs the masking."""
    grouped_mm = torch.nn.functional.grouped_mm

    class Poisoned(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b, offs):
            ctx.save_for_backward(a, b, offs)
            return grouped_mm(a, b, offs=offs)

        @staticmethod
        def backward(ctx, grad):
            a, b, offs = ctx.saved_tensors
            with torch.enable_grad():
                a_, b_ = a.detach().requires_grad_(), b.detach().requires_grad_()
                grad_a, grad_b = torch.autograd.grad(grouped_mm(a_, b_, offs=offs), (a_, b_), grad)
            empty = torch.diff(offs, prepend=offs.new_zeros(1)) == 0
            return grad_a, grad_b.masked_fill(empty[:, None, None], float("nan")), None

    import jin_backbone.experts

    monkeypatch.setattr(
        torch.nn.functional, "grouped_mm", lambda a, b, offs: Poisoned.apply(a, b, offs)
    )
    monkeypatch.setattr(jin_backbone.experts, "empty_groups_need_masking", lambda device: True)
    fast, naive = _pair(64, 2, grouped_gemm=True)
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(2))  # 10 assignments, 64 experts
    _, gx, grads, aux = _run(fast, x)
    _, gx_naive, grads_naive, _ = _run(naive, x)
    assert (aux.stats.tokens_per_expert == 0).sum() >= 54
    torch.testing.assert_close(gx, gx_naive, rtol=1e-5, atol=1e-5)
    for name in ("experts.w_in", "experts.w_out"):
        torch.testing.assert_close(grads[name], grads_naive[name], rtol=1e-5, atol=1e-5)


def test_grouped_gemm_under_autocast_computes_in_autocasts_dtype():
    torch.manual_seed(0)
    cfg = MoEConfig(dim=24, hidden_dim=40, num_experts=4, top_k=2)
    grouped = MoE(cfg.model_copy(update={"grouped_gemm": True}))
    loop = MoE(cfg.model_copy(update={"grouped_gemm": False, "max_padding": 1.0}))
    loop.load_state_dict(grouped.state_dict())
    x = torch.randn(2, 9, 24, generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_grouped, _ = grouped(x)
        y_loop, _ = loop(x)
    assert y_grouped.dtype == y_loop.dtype == torch.bfloat16
    torch.testing.assert_close(y_grouped, y_loop, rtol=2e-2, atol=2e-2)


def test_router_stays_fp32_under_autocast_and_routes_as_without_it():
    """``F.linear`` autocasts whatever its operands' dtype: under bf16 autocast the router's
    logits came out bf16 and about 3% of these tokens changed experts."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=64, hidden_dim=64, num_experts=16, top_k=2, grouped_gemm=False))
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(7))
    reference = moe.router(x)
    _, aux_reference = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = moe.router(x)
        _, aux = moe(x)
    for name in ("logits", "probs", "weights"):
        assert getattr(routing, name).dtype == torch.float32, name
        torch.testing.assert_close(getattr(routing, name), getattr(reference, name), msg=name)
    assert torch.equal(routing.experts, reference.experts)
    assert torch.equal(aux.stats.tokens_per_expert, aux_reference.stats.tokens_per_expert)
    for name in ("load_balancing_loss", "z_loss"):
        assert getattr(aux, name).dtype == torch.float32, name
        torch.testing.assert_close(getattr(aux, name), getattr(aux_reference, name), msg=name)
    assert aux.stats.router_entropy.dtype == torch.float32
    torch.testing.assert_close(aux.stats.router_entropy, aux_reference.stats.router_entropy)


def test_top1_gate_is_the_router_probability_so_the_task_loss_trains_the_router():
    """Renormalising one gate makes it exactly 1 and cuts the router off from the task loss;
    with ``top_k=1`` the gate is the probability (Switch; the paper's Eq. 2) whatever
    ``renormalize`` says, while ``top_k > 1`` still renormalises."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=4, top_k=1, renormalize=True))
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(8))
    routing = moe.router(x)
    torch.testing.assert_close(routing.weights, routing.probs.gather(-1, routing.experts))
    assert routing.weights.max() < 1
    y, _ = moe(x)
    y.square().sum().backward()  # the task loss alone, no auxiliary loss
    assert moe.router.weight.grad.abs().sum() > 0
    top2 = Router(8, 4, 2, renormalize=True)(x)
    torch.testing.assert_close(top2.weights.sum(-1), torch.ones(16))


@pytest.mark.parametrize("grouped_gemm", [None, True])
def test_torch_compile_of_a_float32_moe_matches_eager(grouped_gemm):
    """``grouped_mm``'s fake-tensor kernel, which ``torch.compile`` traces with, takes bfloat16
    only (torch 2.13): the default compiles float32 layers without it, and ``True`` runs the
    grouped GEMMs eagerly, outside the graph. Compiling the default used to fail."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=4, top_k=2, grouped_gemm=grouped_gemm))
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(9))
    assert moe.uses_grouped_gemm(x)  # eagerly both take the CPU's float32 grouped GEMM
    torch._dynamo.reset()
    y_compiled, aux_compiled = torch.compile(moe)(x)
    y_eager, aux_eager = moe(x)
    torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux_compiled.z_loss, aux_eager.z_loss, rtol=1e-5, atol=1e-5)


def test_padding_mask_shape_and_dtype_are_checked():
    moe = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=2, top_k=1))
    with pytest.raises(ValueError, match=r"padding_mask: expected bool of shape \(2, 3\)"):
        moe(torch.randn(2, 3, 8), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="padding_mask"):
        moe(torch.randn(2, 3, 8), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"expected \(N, 8\) or \(B, T, 8\), got \(2, 3, 5\)"):
        moe(torch.randn(2, 3, 5))


def test_never_materialises_an_n_by_e_by_d_tensor():
    num_tokens, num_experts, dim = 256, 64, 24
    moe, _ = _pair(num_experts, 2, max_padding=1.25)
    largest = 0

    class _Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal largest
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor):
                    largest = max(largest, t.numel())
            return out

    x = torch.randn(num_tokens, dim, requires_grad=True)
    with _Largest():
        y, aux = moe(x)
        (y.sum() + aux.load_balancing_loss).backward()
    # The biggest tensors are the stacked weights' gradients and the (K*N, 2H) hidden rows; an
    # (N, E, D) tensor would be three times bigger than either.
    largest_weight = max(p.numel() for p in moe.parameters())
    assert largest <= max(largest_weight, 1.25 * 2 * num_tokens * 2 * 40)
    assert 3 * largest < num_tokens * num_experts * dim


def test_capacity_factor_drops_overflow_second_choices_first():
    torch.manual_seed(0)
    cfg = MoEConfig(dim=16, hidden_dim=16, num_experts=4, top_k=2, capacity_factor=0.5)
    experts_NK = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0], [0, 1], [2, 0]])
    plan = make_plan(experts_NK, 4, cfg.capacity_factor)
    capacity = expert_capacity(6, 2, 4, 0.5)  # ceil(0.5 * 12 / 4) = 2
    assert capacity == 2
    assert plan.tokens_per_expert.tolist() == [6, 3, 2, 1]
    assert plan.counts == [2, 2, 2, 1]
    assert plan.dropped.item() == 12 - 7
    # Expert 0 keeps the first choices of tokens 0 and 1; later first choices and all second
    # choices to expert 0 are dropped.
    assert plan.row_of_assignment[0, :2].ge(0).all()
    assert plan.row_of_assignment[0, 2].item() == -1
    assert plan.row_of_assignment[1, 3].item() == -1


def test_capacity_layer_reports_drops_and_large_capacity_is_dropless():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(40, 24, generator=gen)
    dropless, _ = _pair(4, 2)
    roomy, _ = _pair(4, 2, capacity_factor=4.0)
    tight, _ = _pair(4, 2, capacity_factor=0.25)
    tight_padded, _ = _pair(4, 2, capacity_factor=0.25, max_padding=100.0)
    y_dropless, _ = dropless(x)
    y_roomy, aux_roomy = roomy(x)
    y_tight, aux_tight = tight(x)
    torch.testing.assert_close(y_roomy, y_dropless)
    assert aux_roomy.stats.dropped_tokens.item() == 0
    capacity = expert_capacity(40, 2, 4, 0.25)
    expected = (aux_tight.stats.tokens_per_expert - capacity).clamp(min=0).sum()
    assert aux_tight.stats.dropped_tokens.item() == expected.item() > 0
    assert not torch.allclose(y_tight, y_dropless)
    torch.testing.assert_close(tight_padded(x).output, y_tight)


def test_load_balancing_loss_is_one_when_uniform_and_larger_when_collapsed():
    probs = torch.full((8, 4), 0.25)
    balanced = torch.tensor([[0, 1], [2, 3]] * 4)
    assert load_balancing_loss(probs, balanced).item() == pytest.approx(1.0)
    collapsed_probs = torch.tensor([[0.97, 0.01, 0.01, 0.01]] * 8)
    collapsed = torch.tensor([[0, 1]] * 8)
    assert load_balancing_loss(collapsed_probs, collapsed).item() == pytest.approx(4 * 0.49)


def test_z_loss_is_squared_logsumexp():
    logits = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    expected = (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(router_z_loss(logits), expected)


def test_router_entropy_bounds_and_renormalisation():
    moe, _ = _pair(8, 2)
    with torch.no_grad():
        moe.router.weight.zero_()
    _, aux = moe(torch.randn(10, 24))
    torch.testing.assert_close(aux.stats.router_entropy, torch.log(torch.tensor(8.0)))
    routing = moe.router(torch.randn(10, 24))
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(10))


def test_router_noise_only_in_training():
    moe, _ = _pair(8, 2, router_jitter=0.5, router_noise_std=1.0)
    x = torch.randn(20, 24)
    moe.eval()
    torch.testing.assert_close(moe(x).output, moe(x).output)
    moe.train()
    torch.manual_seed(0)
    first = moe.router(x).logits
    torch.manual_seed(1)
    assert not torch.allclose(first, moe.router(x).logits)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"num_experts": 2, "top_k": 3}, "top_k=3 exceeds num_experts=2"),
        ({"num_experts": 0}, "num_experts"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"max_padding": 0.5}, "max_padding"),
        ({"dispatch": "triton"}, "dispatch"),
        ({"topk": 2}, "did you mean 'top_k'"),
    ],
)
def test_config_rejects_impossible_settings(overrides, key):
    with pytest.raises(ValidationError, match=key):
        MoEConfig.model_validate({"dim": 8, "hidden_dim": 8, **overrides})


def test_naive_refuses_capacity():
    _, naive = _pair(4, 2, capacity_factor=1.0)
    with pytest.raises(ValueError, match="capacity_factor=None"):
        naive(torch.randn(4, 24))


def test_cupy_dispatch_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the cupy path is exercised by test_cupy_dispatch.py")
    moe = MoE(MoEConfig(dim=24, hidden_dim=40, num_experts=4, top_k=2, dispatch="cupy"))
    with pytest.raises(ValueError, match="dispatch='cupy' needs cupy"):
        moe(torch.randn(4, 24))


def test_auto_dispatch_leaves_the_cupy_kernels_under_float16_autocast(monkeypatch):
    """The kernels un-permute the experts' rows, which autocast computes in its dtype: under
    float16 autocast (``torch.autocast("cuda")``'s default) ``auto`` picked them from the float32
    input and the layer raised ``KeyError: torch.float16``. Here a device treated as CUDA."""
    from jin_backbone.dispatch import cupy_ops, resolve_backend

    monkeypatch.setattr(cupy_ops, "supports", lambda x: x.dtype in (torch.float32, torch.bfloat16))
    x = torch.randn(4, 8)
    assert resolve_backend("auto", x) == "cupy"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert resolve_backend("auto", x) == "cupy"
    with torch.autocast("cpu", dtype=torch.float16):
        assert resolve_backend("auto", x) == "torch"
        with pytest.raises(ValueError, match=r"dtype=torch.float32, compute dtype=torch.float16"):
            resolve_backend("cupy", x)


def test_grouped_gemm_true_names_the_dtype_the_cpu_kernel_lacks():
    moe = MoE(MoEConfig(dim=24, hidden_dim=40, num_experts=4, top_k=2, grouped_gemm=True))
    x = torch.randn(5, 24)
    assert moe.uses_grouped_gemm(x.half())  # the CPU kernel takes float16 on request
    with pytest.raises(ValueError, match=r"CPU grouped GEMM computes in .* not torch.float64"):
        moe(x.double())


@layouts
@pytest.mark.parametrize("top_k", [1, 2])
def test_output_dtype_under_autocast_does_not_depend_on_idle_experts(layout, top_k):
    """An expert with no rows gave its empty float32 input rows, and ``cat`` promoted every
    expert's bfloat16 output to float32: with ``top_k=1`` the layer's output dtype then
    depended on the batch (as on an all-padding batch for every layout)."""
    torch.manual_seed(0)
    cfg = MoEConfig(dim=24, hidden_dim=40, num_experts=8, top_k=top_k, **LAYOUTS[layout])
    moe = MoE(cfg.model_copy(update={"dispatch": "torch"}))
    gen = torch.Generator().manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_busy, aux_busy = moe(torch.randn(400, 24, generator=gen))
        y_idle, aux_idle = moe(torch.randn(2, 24, generator=gen))
        y_padding, _ = moe(torch.randn(2, 24, generator=gen), torch.ones(2, dtype=torch.bool))
    assert (aux_busy.stats.tokens_per_expert > 0).all()
    assert (aux_idle.stats.tokens_per_expert == 0).any()
    assert y_busy.dtype == y_idle.dtype == y_padding.dtype == torch.bfloat16
