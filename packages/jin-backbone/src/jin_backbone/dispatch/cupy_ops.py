"""CuPy CUDA kernels for permutation and weighted un-permutation, as autograd Functions.

Shapes: N tokens, K top-k, M expert-sorted rows, D width.

The kernels live in ``kernels.cu`` and are compiled at first use by NVRTC (``cupy.RawModule``).
Tensors cross to CuPy through DLPack without a copy, and every launch runs on torch's current
stream, so the kernels order correctly with the surrounding PyTorch work. ``cupy`` is imported
lazily: ``import jin_backbone`` works without it, and the PyTorch path is used instead.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CUDA_SOURCE",
    "KERNEL_NAMES",
    "compile_ptx",
    "cupy_available",
    "permute",
    "unpermute_combine",
]

CUDA_SOURCE = Path(__file__).with_name("kernels.cu")

_TYPES = {torch.float32: "float", torch.bfloat16: "bf16"}
# Copy units for the row gather, widest first: (CUDA type, bytes).
_COPY_UNITS = (("uint4", 16), ("unsigned int", 4), ("unsigned short", 2))
KERNEL_NAMES: tuple[str, ...] = (
    *(f"gather_rows<{unit}>" for unit, _ in _COPY_UNITS),
    *(
        f"{kernel}<{t}>"
        for kernel in ("permute_backward", "unpermute_combine", "unpermute_combine_backward")
        for t in _TYPES.values()
    ),
)
_THREADS = 256
_MAX_BLOCKS = 65535 * 8


@functools.cache
def cupy_available() -> bool:
    """True when cupy is installed and torch sees a CUDA device."""
    return importlib.util.find_spec("cupy") is not None and torch.cuda.is_available()


def supports(x: Tensor) -> bool:
    """Whether the CuPy path handles this tensor (CUDA, fp32 or bf16, cupy present)."""
    return x.is_cuda and x.dtype in _TYPES and cupy_available()


def compile_ptx(arch: str = "compute_80") -> dict[str, str]:
    """Compile ``kernels.cu`` to PTX with NVRTC, no GPU needed; returns ``{name: lowered name}``.

    CI calls this on CPU-only machines (cupy-cuda12x + nvidia-cuda-nvrtc-cu12 wheels) so that a
    kernel that does not compile fails before it reaches a GPU. Raises ``RuntimeError`` with the
    NVRTC log on a compile error.
    """
    from cupy_backends.cuda.libs import nvrtc

    program = nvrtc.createProgram(CUDA_SOURCE.read_text(), CUDA_SOURCE.name, [], [])
    try:
        for name in KERNEL_NAMES:
            nvrtc.addNameExpression(program, name)
        try:
            nvrtc.compileProgram(program, [f"--gpu-architecture={arch}", "-std=c++17"])
        except nvrtc.NVRTCError as err:
            raise RuntimeError(f"{CUDA_SOURCE.name}: {nvrtc.getProgramLog(program)}") from err
        if not nvrtc.getPTX(program):
            raise RuntimeError(f"{CUDA_SOURCE.name}: NVRTC produced no PTX for {arch}")
        return {name: nvrtc.getLoweredName(program, name) for name in KERNEL_NAMES}
    finally:
        nvrtc.destroyProgram(program)


@functools.cache
def _cupy() -> ModuleType:
    import cupy

    return cupy


@functools.cache
def _module(device_index: int) -> Any:
    cupy = _cupy()
    with cupy.cuda.Device(device_index):
        return cupy.RawModule(
            code=CUDA_SOURCE.read_text(), options=("-std=c++17",), name_expressions=KERNEL_NAMES
        )


def _launch(name: str, like: Tensor, num_blocks: int, tensors: list[Tensor], ints: list[int]):
    """Run kernel ``name`` on torch's current stream, passing tensors via DLPack (no copy)."""
    if num_blocks == 0:
        return
    cupy = _cupy()
    import numpy as np

    device = like.device.index
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(like.device).cuda_stream, device)
    with cupy.cuda.Device(device), stream:
        kernel = _module(device).get_function(name)
        args = [cupy.from_dlpack(_raw(t)) for t in tensors] + [np.int64(i) for i in ints]
        kernel((min(num_blocks, _MAX_BLOCKS),), (_THREADS,), tuple(args))


def _raw(t: Tensor) -> Tensor:
    """``t`` as CuPy can import it: bfloat16 as its raw 16 bits (an int16 view), which is how the
    kernels read it (``struct bf16``). CuPy has no bfloat16 of its own: without ml_dtypes installed
    (the ``cuda`` extra does not bring it) ``cupy.from_dlpack`` refuses a bfloat16 tensor."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).detach()


def _copy_unit(x: Tensor) -> tuple[str, torch.dtype, int]:
    row_bytes = x.shape[1] * x.element_size()
    for (unit, size), view_dtype in zip(
        _COPY_UNITS, (torch.int32, torch.int32, torch.int16), strict=True
    ):
        if row_bytes % size == 0 and x.data_ptr() % size == 0:
            return unit, view_dtype, row_bytes // size
    raise AssertionError("unreachable: fp32/bf16 rows are multiples of 2 bytes")


def _gather_rows(x_ND: Tensor, source_token_M: Tensor) -> Tensor:
    out = x_ND.new_empty(source_token_M.numel(), x_ND.shape[1])
    unit, view_dtype, row_units = _copy_unit(x_ND)
    # DLPack has no 16-byte type: uint4 rows travel as int32 views, the kernel reads 4 at a time.
    _launch(
        f"gather_rows<{unit}>",
        x_ND,
        out.shape[0],
        [x_ND.view(view_dtype), source_token_M, out.view(view_dtype)],
        [out.shape[0], row_units],
    )
    return out


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_ND: Tensor, source_token_M: Tensor, row_KN: Tensor) -> Tensor:
        ctx.save_for_backward(row_KN)
        return _gather_rows(x_ND.contiguous(), source_token_M)

    @staticmethod
    def backward(ctx: Any, grad_MD: Tensor) -> tuple[Tensor, None, None]:
        (row_KN,) = ctx.saved_tensors
        grad_MD = grad_MD.contiguous()
        top_k, num_tokens = row_KN.shape
        grad_ND = grad_MD.new_empty(num_tokens, grad_MD.shape[1])
        _launch(
            f"permute_backward<{_TYPES[grad_MD.dtype]}>",
            grad_MD,
            num_tokens,
            [grad_MD, row_KN, grad_ND],
            [num_tokens, top_k, grad_MD.shape[1]],
        )
        return grad_ND, None, None


class _UnpermuteCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, y_MD: Tensor, weights_NK: Tensor, row_KN: Tensor) -> Tensor:
        y_MD = y_MD.contiguous()
        weights_f32 = weights_NK.float().contiguous()
        top_k, num_tokens = row_KN.shape
        out_ND = y_MD.new_empty(num_tokens, y_MD.shape[1])
        _launch(
            f"unpermute_combine<{_TYPES[y_MD.dtype]}>",
            y_MD,
            num_tokens,
            [y_MD, weights_f32, row_KN, out_ND],
            [num_tokens, top_k, y_MD.shape[1]],
        )
        ctx.save_for_backward(y_MD, weights_f32, row_KN)
        ctx.weights_dtype = weights_NK.dtype
        return out_ND

    @staticmethod
    def backward(ctx: Any, grad_ND: Tensor) -> tuple[Tensor, Tensor, None]:
        y_MD, weights_f32, row_KN = ctx.saved_tensors
        grad_ND = grad_ND.contiguous()
        top_k, num_tokens = row_KN.shape
        # Padding rows (padded layout) are not written by the kernel: their gradient is zero.
        grad_y = torch.zeros_like(y_MD)
        grad_weights = torch.empty_like(weights_f32)
        _launch(
            f"unpermute_combine_backward<{_TYPES[y_MD.dtype]}>",
            y_MD,
            num_tokens * top_k,
            [grad_ND, y_MD, weights_f32, row_KN, grad_y, grad_weights],
            [num_tokens, top_k, y_MD.shape[1]],
        )
        return grad_y, grad_weights.to(ctx.weights_dtype), None


def permute(x_ND: Tensor, source_token_M: Tensor, row_of_assignment_KN: Tensor) -> Tensor:
    """CuPy twin of :func:`jin_backbone.dispatch.torch_ops.permute` (the backward needs rows).

    The backward gathers each token's gradient from the rows of its kept assignments only: the
    padding rows of the padded layout (copies of token 0 that nothing combines) are taken to
    have zero gradient, as they do in the MoE layer, where torch's backward adds those zeros.
    """
    return _Permute.apply(x_ND, source_token_M, row_of_assignment_KN)


def unpermute_combine(y_MD: Tensor, weights_NK: Tensor, row_of_assignment_KN: Tensor) -> Tensor:
    """CuPy twin of :func:`jin_backbone.dispatch.torch_ops.unpermute_combine`."""
    return _UnpermuteCombine.apply(y_MD, weights_NK, row_of_assignment_KN)
