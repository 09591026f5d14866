"""Shared by tests/ and bench/: the Triton mode and the skipping of GPU-only tests."""

import os

import torch

# Triton decides at import whether @triton.jit functions run in its interpreter, so the choice is
# made here, before anything imports Triton: on a machine without CUDA every Triton kernel runs
# (and is tested) on CPU tensors through the interpreter; with CUDA they run on the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _interpreter_bf16_dot():
    """Make the interpreter's ``tl.dot`` multiply bfloat16 operands by value.

    The interpreter stores bfloat16 as its uint16 bit pattern and its ``create_dot`` converts only
    8-bit float operands, so a bfloat16 ``tl.dot`` multiplies bit patterns (values ~1e10;
    triton-lang/triton#11584, "not supported yet" upstream). Our kernels' bf16 paths (loads, masks,
    the ``p.to(v.dtype)`` casts, stores) are still worth checking on the CPU, so the operands are
    widened to float32 first: a product of two bf16 values is exact in fp32 and the GPU's tensor
    cores accumulate bf16 products in fp32, so this is the GPU's arithmetic up to summation order.
    """
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_widens_bf16", False):
        return
    dot = builder.create_dot

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        bits = h.data.astype(np.uint32) << np.uint32(16)  # bf16 = the high half of an fp32
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, *args, **kwargs):
        return dot(self, widen(a), widen(b), d, *args, **kwargs)

    create_dot._widens_bf16 = True
    builder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_bf16_dot()


def pytest_collection_modifyitems(config, items):
    # GPU tests run only where a CUDA device exists; everything else always runs.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
