"""Shared by tests/ and bench/: the Triton mode and the skipping of GPU-only tests."""

import os

import torch

# Triton decides at import whether @triton.jit functions run in its interpreter, so the choice is
# made here, before anything imports Triton: on a machine without CUDA every Triton kernel runs
# (and is tested) on CPU tensors through the interpreter; with CUDA they run on the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    # GPU tests run only where a CUDA device exists; everything else always runs.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
