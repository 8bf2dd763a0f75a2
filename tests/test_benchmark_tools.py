"""The measuring tools that benchmarks/ report figures with."""

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _moe_benchmark():
    spec = importlib.util.spec_from_file_location("moe_benchmark", ROOT / "benchmarks" / "moe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_live_bytes_keeps_a_freed_allocation_whose_address_is_reused():
    moe = _moe_benchmark()
    nbytes = 64 * 1024
    tracker = moe._LiveBytes()
    with tracker:
        first = torch.ones(nbytes // 4)
        del first
        # Freed and allocated again at the same size: the allocator usually hands the same
        # address back, which must not merge the two lifetimes.
        second = torch.zeros(nbytes // 4)
    excluded = tracker.live_ids({second.untyped_storage().data_ptr()})
    assert len(excluded) == 1
    assert tracker.peak(exclude=excluded) == nbytes  # the first one's lifetime still counts
    assert tracker.peak(exclude=set()) == nbytes  # never both live at once


def test_peak_memory_is_the_same_on_every_call():
    moe = _moe_benchmark()
    case = {"D": 32, "H": 64, "E": 4, "k": 2, "N": 64}
    x = torch.randn(case["N"], case["D"], generator=torch.Generator().manual_seed(0))
    for impl in ("jin", "dense_active"):
        peaks = [
            moe.peak_memory_mb(moe.build(impl, case, "cpu", torch.float32, "gelu"), x)
            for _ in range(4)
        ]
        assert peaks[0] > 0 and peaks == [peaks[0]] * 4, (impl, peaks)
