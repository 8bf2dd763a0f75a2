"""MoE layer throughput and memory, side by side in one run (jin-backbone, paper §5.5 / Table 6).

    python benchmarks/moe.py --json benchmarks/results/moe.json

For each case (D, H, E, k, N) and mode (``forward`` without autograd, ``forward_backward``) it
times, round-robin so that load from other processes hits every implementation alike:

- ``naive``: the seed's double loop over k and experts (``MoE(dispatch="naive")``);
- ``jin``: the defaults (``dispatch="auto"``: PyTorch on CPU, CuPy kernels on CUDA;
  ``grouped_gemm=None``: the experts as two grouped GEMMs, ``torch.nn.functional.grouped_mm``,
  where torch has a kernel for them, which includes fp32 on the CPU);
- ``jin_ungrouped``: the same with ``grouped_gemm=False``: a matmul per expert, or one bmm over
  rows padded to the busiest expert (jin-backbone 0.4's only layouts);
- ``dense_active``: one dense FFN with the MoE's active FLOPs (hidden ``k*H``);
- ``dense_total``: one dense FFN with all experts' parameters (hidden ``E*H``);

plus the machine's fp32 matmul GFLOP/s, and the peak memory of a forward+backward of ``jin`` and
``dense_active`` (activations and input gradient; weight gradients excluded, since they are the
size of the weights and an MoE has E/k times more weights by design). Every figure is the best of
``--repeats`` timed runs after one warm-up. ``dense_total`` runs on at most ``--dense-total-tokens``
tokens (its hidden activations at N=16384, E*H=16384 would take several GB); its tokens/s is a
throughput and does not depend on N once the matmuls are large.

With CUDA present it also measures, in bf16, the CuPy permute / un-permute bandwidth against a
device-to-device copy, and the layer at N=65536, E=64 with the CuPy path against the PyTorch one,
each with the experts as a matmul per expert (``grouped_gemm=False``) and as grouped GEMMs
(the default, ``None``, which takes them for bf16 there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from jin_backbone import FeedForward, MoE, MoEConfig
from jin_backbone.dispatch import cupy_ops, make_plan, torch_ops

CASES = [
    {"D": 512, "H": 2048, "E": 8, "k": 2, "N": 16384},
    {"D": 256, "H": 512, "E": 64, "k": 2, "N": 4096},
    {"D": 256, "H": 1024, "E": 8, "k": 2, "N": 256},
]
MODES = ("forward", "forward_backward")
IMPLS = ("naive", "jin", "jin_ungrouped", "dense_active", "dense_total")


def matmul_gflops(size: int = 1024, repeats: int = 10, device: str = "cpu") -> float:
    """Best-of-``repeats`` fp32 ``size x size`` matmul throughput, GFLOP/s."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        start = _now(device)
        a @ b
        best = min(best, _now(device) - start)
    return 2 * size**3 / best / 1e9


def _now(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def build(impl: str, case: dict, device: str, dtype: torch.dtype, activation: str) -> nn.Module:
    """The module ``impl`` for ``case``: an MoE layer or a dense FFN of matching hidden size."""
    torch.manual_seed(0)
    d, h, e, k = case["D"], case["H"], case["E"], case["k"]
    if impl == "dense_active":
        module = FeedForward(d, k * h, activation)
    elif impl == "dense_total":
        module = FeedForward(d, e * h, activation)
    else:
        cfg = MoEConfig(
            dim=d,
            hidden_dim=h,
            num_experts=e,
            top_k=k,
            activation=activation,
            dispatch="naive" if impl == "naive" else "auto",
            grouped_gemm=False if impl == "jin_ungrouped" else None,
        )
        module = MoE(cfg)
    return module.to(device, dtype)


def step(module: nn.Module, x: Tensor, mode: str) -> None:
    """One forward (no autograd) or forward+backward of ``module`` on ``x``."""
    if mode == "forward":
        with torch.no_grad():
            module(x)
        return
    out = module(x)
    y = out[0] if isinstance(out, tuple) else out
    loss = y.float().square().mean()
    if isinstance(module, MoE):
        loss = loss + 0.01 * out[1].load_balancing_loss + 1e-3 * out[1].z_loss
    loss.backward()
    module.zero_grad(set_to_none=True)


def time_cases(cases, args, device: str, dtype: torch.dtype) -> list[dict]:
    """Best-of-``args.repeats`` tokens/s for every case, mode and implementation.

    Rounds interleave the implementations so that load from other processes hits all of them
    alike. A warm-up on an eighth of the tokens estimates each step's time, from which enough
    iterations are chosen for every timing to last about ``args.min_time`` seconds.
    """
    rows = []
    for case in cases:
        gen = torch.Generator().manual_seed(1)
        x_full = torch.randn(case["N"], case["D"], generator=gen).to(device, dtype)
        modules = {impl: build(impl, case, device, dtype, args.activation) for impl in IMPLS}
        inputs = dict.fromkeys(IMPLS, x_full)
        inputs["dense_total"] = x_full[: args.dense_total_tokens]
        for mode in MODES:
            iterations = {}
            for impl in IMPLS:
                x = inputs[impl]
                warm = x[: max(x.shape[0] // 8, 1)].detach().requires_grad_(mode != "forward")
                start = _now(device)
                step(modules[impl], warm, mode)
                estimate = 8 * (_now(device) - start)
                iterations[impl] = max(1, round(args.min_time / max(estimate, 1e-6)))
            best = dict.fromkeys(IMPLS, float("inf"))
            for _ in range(args.repeats):
                for impl in IMPLS:
                    x = inputs[impl].detach().requires_grad_(mode != "forward")
                    start = _now(device)
                    for _ in range(iterations[impl]):
                        step(modules[impl], x, mode)
                    best[impl] = min(best[impl], (_now(device) - start) / iterations[impl])
            for impl in IMPLS:
                tokens = inputs[impl].shape[0]
                row = {**case, "mode": mode, "impl": impl, "tokens_per_s": tokens / best[impl]}
                if tokens != case["N"]:
                    row["measured_tokens"] = tokens
                rows.append(row)
            print(f"  timed {case} {mode}", flush=True)
    return rows


class _LiveBytes(TorchDispatchMode):
    """Tracks bytes of every storage allocated under it, as a timeline of (+/-) events.

    Each allocation gets its own id: an address freed and handed out again (the allocator reuses
    them) is a new allocation, so excluding one storage (a weight gradient, live at the end)
    leaves the other lifetimes at that address counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[int, int]] = []  # (allocation id, +bytes or -bytes)
        self._live: dict[int, list[int]] = {}  # data_ptr -> [allocation id, bytes, tensors]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, Tensor)
        }
        for t in tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or (ptr in inputs and ptr not in self._live):
                continue  # a view of (or in-place op on) memory allocated outside
            if ptr not in self._live:
                self._live[ptr] = [len(self.events), nbytes, 0]
                self.events.append((len(self.events), nbytes))
            self._live[ptr][2] += 1
            weakref.finalize(t, self._release, ptr)
        return out

    def _release(self, ptr: int) -> None:
        entry = self._live[ptr]
        entry[2] -= 1
        if entry[2] == 0:
            del self._live[ptr]
            self.events.append((entry[0], -entry[1]))

    def live_ids(self, ptrs: set[int]) -> set[int]:
        """Allocation ids of the storages at ``ptrs`` that are still live."""
        return {self._live[p][0] for p in ptrs if p in self._live}

    def peak(self, exclude: set[int]) -> int:
        """Peak live bytes over the timeline, leaving out the allocations ``exclude`` names."""
        live = peak = 0
        for allocation, delta in self.events:
            if allocation not in exclude:
                live += delta
                peak = max(peak, live)
        return peak


def peak_memory_mb(module: nn.Module, x: Tensor) -> float:
    """Peak bytes allocated by one forward+backward, weight gradients excluded, in MB."""
    x = x.detach().requires_grad_(True)
    tracker = _LiveBytes()
    with tracker:
        out = module(x)
        y = out[0] if isinstance(out, tuple) else out
        y.float().square().mean().backward()
    grads = {p.grad.untyped_storage().data_ptr() for p in module.parameters() if p.grad is not None}
    excluded = tracker.live_ids(grads)
    module.zero_grad(set_to_none=True)
    return tracker.peak(exclude=excluded) / 2**20


def gpu_section(repeats: int) -> dict:
    """bf16 on CUDA: CuPy permute / un-permute bandwidth and the layer, CuPy vs PyTorch."""
    device, dtype = "cuda", torch.bfloat16
    n, d, h, e, k = 65536, 256, 512, 64, 2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device, dtype)
    experts = torch.rand(n, e, generator=gen).argsort(dim=1)[:, :k].to(device)
    weights = torch.rand(n, k, generator=gen).to(device)
    plan = make_plan(experts, e)
    y = torch.randn(sum(plan.counts), d, generator=gen).to(device, dtype)
    bytes_moved = 2 * k * n * d * x.element_size()  # read + write of the K*N rows

    def best_seconds(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(max(repeats, 5)):
            start = _now(device)
            fn()
            times.append(_now(device) - start)
        return min(times)

    big = torch.empty(k * n, d, device=device, dtype=dtype)
    src = torch.randn(k * n, d, device=device).to(dtype)
    result = {
        "device": torch.cuda.get_device_name(),
        "copy_gb_per_s": bytes_moved / best_seconds(lambda: big.copy_(src)) / 1e9,
        "permute_gb_per_s": bytes_moved
        / best_seconds(lambda: cupy_ops.permute(x, plan.source_token, plan.row_of_assignment))
        / 1e9,
        "unpermute_gb_per_s": bytes_moved
        / best_seconds(lambda: cupy_ops.unpermute_combine(y, weights, plan.row_of_assignment))
        / 1e9,
        "torch_permute_gb_per_s": bytes_moved
        / best_seconds(lambda: torch_ops.permute(x, plan.source_token))
        / 1e9,
        "layer": [],
    }
    case = {"D": d, "H": h, "E": e, "k": k, "N": n}
    layers = {}
    for impl in ("torch", "cupy"):
        for grouped in (False, None):
            torch.manual_seed(0)
            cfg = MoEConfig(
                dim=d, hidden_dim=h, num_experts=e, top_k=k, dispatch=impl, grouped_gemm=grouped
            )
            name = f"{impl}_grouped" if grouped is None else impl
            layers[name] = MoE(cfg).to(device, dtype)
    for mode in MODES:
        for impl, layer in layers.items():
            xin = x.detach().requires_grad_(mode == "forward_backward")
            seconds = best_seconds(lambda layer=layer, xin=xin, mode=mode: step(layer, xin, mode))
            result["layer"].append(
                {**case, "mode": mode, "impl": impl, "tokens_per_s": n / seconds}
            )
    return result


def table(rows: list[dict]) -> str:
    lines = [
        "| D | H | E | k | N | mode | impl | tokens/s | x dense_active | x naive | x dense_total |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def key(r):
        return (r["D"], r["H"], r["E"], r["k"], r["N"], r["mode"])

    by_case: dict[tuple, dict[str, float]] = {}
    for r in rows:
        by_case.setdefault(key(r), {})[r["impl"]] = r["tokens_per_s"]
    for r in rows:
        ref = by_case[key(r)]
        tps = r["tokens_per_s"]
        lines.append(
            f"| {r['D']} | {r['H']} | {r['E']} | {r['k']} | {r['N']} | {r['mode']} | {r['impl']} "
            f"| {tps:,.0f} | {tps / ref['dense_active']:.2f} | {tps / ref['naive']:.2f} "
            f"| {tps / ref['dense_total']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (best of)")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds per timing")
    parser.add_argument("--dense-total-tokens", type=int, default=2048)
    parser.add_argument(
        "--activation",
        choices=["gelu", "swiglu"],
        default="gelu",
        help="expert FFN (gelu: D->H->D, so H is the hidden width the cases name)",
    )
    parser.add_argument("--cases", type=int, nargs="*", help="indices into CASES (default: all)")
    args = parser.parse_args()

    cases = [CASES[i] for i in args.cases] if args.cases else CASES
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 on CPU", flush=True)
    gflops = matmul_gflops()
    print(f"fp32 matmul: {gflops:.1f} GFLOP/s", flush=True)
    rows = time_cases(cases, args, "cpu", torch.float32)
    memory = []
    for case in cases:
        x = torch.randn(case["N"], case["D"], generator=torch.Generator().manual_seed(2))
        jin, ungrouped, dense = (
            peak_memory_mb(build(impl, case, "cpu", torch.float32, args.activation), x)
            for impl in ("jin", "jin_ungrouped", "dense_active")
        )
        memory.append(
            {
                **case,
                "jin_mb": jin,
                "jin_ungrouped_mb": ungrouped,
                "dense_active_mb": dense,
                "ratio": jin / dense,
                "ungrouped_ratio": ungrouped / dense,
            }
        )
    results = {
        "matmul_gflops": gflops,
        "cases": rows,
        "peak_memory": memory,
        "settings": {"activation": args.activation, "threads": torch.get_num_threads()},
    }
    if torch.cuda.is_available() and cupy_ops.cupy_available():
        results["gpu"] = gpu_section(args.repeats)

    print()
    print(table(rows))
    print()
    print(
        "| D | H | E | k | N | jin peak MB | jin_ungrouped peak MB | dense_active peak MB "
        "| jin ratio | jin_ungrouped ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in memory:
        print(
            f"| {m['D']} | {m['H']} | {m['E']} | {m['k']} | {m['N']} | {m['jin_mb']:.1f} "
            f"| {m['jin_ungrouped_mb']:.1f} | {m['dense_active_mb']:.1f} | {m['ratio']:.2f} "
            f"| {m['ungrouped_ratio']:.2f} |"
        )
    if "gpu" in results:
        print(json.dumps(results["gpu"], indent=2))
    else:
        print("\nno CUDA device (or no cupy): the GPU section was not run")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"wrote {args.json} (median jin/dense_active: "
        f"{statistics.median(_ratios(rows, 'jin', 'dense_active')):.2f})"
    )


def _ratios(rows: list[dict], a: str, b: str) -> list[float]:
    index = {(r["D"], r["E"], r["N"], r["mode"], r["impl"]): r["tokens_per_s"] for r in rows}
    return [
        index[(r["D"], r["E"], r["N"], r["mode"], a)]
        / index[(r["D"], r["E"], r["N"], r["mode"], b)]
        for r in rows
        if r["impl"] == a
    ]


if __name__ == "__main__":
    main()
