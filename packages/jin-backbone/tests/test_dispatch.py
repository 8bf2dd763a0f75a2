"""The dispatch plan and the PyTorch permute / un-permute against direct definitions."""

import contextlib

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jin_backbone.dispatch import make_plan, torch_ops


@settings(max_examples=40, deadline=None)
@given(
    num_tokens=st.integers(0, 30),
    num_experts=st.integers(1, 9),
    top_k=st.integers(1, 3),
    capacity_factor=st.sampled_from([None, 0.3, 1.0, 2.0]),
    max_padding=st.sampled_from([1.0, 1.5, 100.0]),
    seed=st.integers(0, 2**16),
)
def test_plan_sorts_by_expert_and_gives_each_kept_assignment_its_own_row(
    num_tokens, num_experts, top_k, capacity_factor, max_padding, seed
):
    top_k = min(top_k, num_experts)
    gen = torch.Generator().manual_seed(seed)
    # Distinct experts per token, as top-k gives.
    experts_NK = torch.rand(num_tokens, num_experts, generator=gen).argsort(dim=1)[:, :top_k]
    plan = make_plan(experts_NK, num_experts, capacity_factor, max_padding)
    rows = plan.row_of_assignment[plan.row_of_assignment >= 0]
    # Distinct rows, one per kept assignment, all inside the row range.
    assert rows.unique().numel() == rows.numel() == sum(plan.counts)
    assert rows.numel() == 0 or rows.max().item() < plan.num_rows
    assert plan.dropped.item() == num_tokens * top_k - sum(plan.counts)
    if plan.padded_rows is None:
        assert plan.num_rows == sum(plan.counts)
        starts = torch.tensor([0, *plan.counts]).cumsum(0)[:-1].tolist()
    else:
        assert plan.num_rows == num_experts * plan.padded_rows
        assert plan.num_rows <= max_padding * sum(plan.counts)
        starts = [e * plan.padded_rows for e in range(num_experts)]
    # The real rows of expert e are gathered from tokens that chose e, in token order per k.
    for e in range(num_experts):
        tokens = plan.source_token[starts[e] : starts[e] + plan.counts[e]]
        assert (experts_NK[tokens] == e).any(dim=1).all()
    if capacity_factor is None:
        assert plan.counts == plan.tokens_per_expert.tolist()
    assert plan.offsets.dtype == torch.int32
    assert plan.offsets.tolist() == torch.tensor(plan.counts, dtype=torch.int64).cumsum(0).tolist()
    # Without host counts (a grouped GEMM): the ragged layout, the same rows.
    device_only = make_plan(
        experts_NK, num_experts, capacity_factor, max_padding, host_counts=False
    )
    assert device_only.counts is None and device_only.padded_rows is None
    assert torch.equal(device_only.offsets, plan.offsets)
    if plan.padded_rows is None:
        assert torch.equal(device_only.source_token, plan.source_token)
        assert torch.equal(device_only.row_of_assignment, plan.row_of_assignment)


def test_a_dropless_plan_without_host_counts_never_reads_the_device():
    # Meta tensors have no values: any read on the host (.tolist(), .item(), bincount's size on
    # CUDA) would raise. The layout a grouped GEMM takes must not wait for the GPU.
    experts_NK = torch.randint(0, 8, (50, 2)).to("meta")
    plan = make_plan(experts_NK, 8, host_counts=False)
    assert plan.offsets.shape == (8,) and plan.source_token.shape == (100,)
    assert plan.counts is None and plan.padded_rows is None


def test_unpermute_combine_is_the_weighted_sum_with_dropped_rows_adding_zero():
    gen = torch.Generator().manual_seed(0)
    experts_NK = torch.tensor([[1, 0], [1, 2], [1, 0], [2, 1]])
    plan = make_plan(experts_NK, 3, capacity_factor=0.5)  # capacity 2: drops some assignments
    assert plan.dropped.item() > 0
    x_ND = torch.randn(4, 5, generator=gen)
    weights_NK = torch.rand(4, 2, generator=gen)
    y_MD = torch_ops.permute(x_ND, plan.source_token) * 3.0  # a toy "expert"
    out = torch_ops.unpermute_combine(y_MD, weights_NK, plan.row_of_assignment)
    expected = torch.zeros(4, 5)
    for k in range(2):
        for n in range(4):
            if plan.row_of_assignment[k, n] >= 0:
                expected[n] += weights_NK[n, k] * 3.0 * x_ND[n]
    torch.testing.assert_close(out, expected)


def test_the_cupy_path_hands_bfloat16_to_cupy_as_raw_16_bit_words(monkeypatch):
    """CuPy has no bfloat16 without ml_dtypes (which the ``cuda`` extra does not bring):
    ``cupy.from_dlpack`` refuses a bfloat16 tensor, so every bfloat16 launch (bf16 weights, or
    bf16 autocast's expert rows) failed. Here cupy is stood in for by a DLPack importer that has
    no bfloat16 either (numpy), and the launches are recorded instead of run."""
    from types import SimpleNamespace

    from jin_backbone.dispatch import cupy_ops

    imported = []

    def from_dlpack(t):
        imported.append(t.dtype)
        return t.numpy()  # raises for bfloat16, as cupy without ml_dtypes does

    fake_cupy = SimpleNamespace(
        from_dlpack=from_dlpack,
        cuda=SimpleNamespace(
            Device=lambda index: contextlib.nullcontext(),
            ExternalStream=lambda ptr, device: contextlib.nullcontext(),
        ),
    )
    launched = []
    fake_module = SimpleNamespace(get_function=lambda name: lambda *args: launched.append(name))
    monkeypatch.setattr(cupy_ops, "_cupy", lambda: fake_cupy)
    monkeypatch.setattr(cupy_ops, "_module", lambda index: fake_module)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: SimpleNamespace(cuda_stream=0))

    plan = make_plan(torch.tensor([[1, 0], [1, 2], [2, 0]]), 3)
    x = torch.randn(3, 8).to(torch.bfloat16).requires_grad_(True)
    weights = torch.rand(3, 2).to(torch.bfloat16).requires_grad_(True)
    permuted = cupy_ops.permute(x, plan.source_token, plan.row_of_assignment)
    combined = cupy_ops.unpermute_combine(permuted, weights, plan.row_of_assignment)
    combined.float().sum().backward()
    assert launched == [
        "gather_rows<uint4>",
        "unpermute_combine<bf16>",
        "unpermute_combine_backward<bf16>",
        "permute_backward<bf16>",
    ]
    assert torch.bfloat16 not in imported and torch.int16 in imported
