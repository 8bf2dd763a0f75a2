"""Every CUDA source of the package compiles with NVRTC, no GPU needed (DESIGN.md, CI rule).

Needs the ``cuda`` extra (cupy-cuda12x, nvidia-cuda-nvrtc-cu12); the ``test`` extra includes it,
so CI runs this on CPU-only machines.
"""

from pathlib import Path

import pytest

import jin_backbone

pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="needs jin-backbone[cuda]")

from jin_backbone.dispatch import cupy_ops

SOURCES = sorted(Path(jin_backbone.__file__).parent.rglob("*.cu"))


def test_the_kernel_source_is_the_one_cupy_ops_loads():
    assert cupy_ops.CUDA_SOURCE in SOURCES


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_every_kernel_compiles_to_ptx(arch):
    lowered = cupy_ops.compile_ptx(arch)
    assert set(lowered) == set(cupy_ops.KERNEL_NAMES)
    assert all(name.startswith("_Z") for name in lowered.values())  # mangled C++ symbols


def test_a_broken_kernel_is_reported_with_the_nvrtc_log(tmp_path, monkeypatch):
    broken = tmp_path / "kernels.cu"
    broken.write_text(cupy_ops.CUDA_SOURCE.read_text().replace("acc += ", "acc += undeclared + "))
    monkeypatch.setattr(cupy_ops, "CUDA_SOURCE", broken)
    with pytest.raises(RuntimeError, match="undeclared"):
        cupy_ops.compile_ptx()
