"""Shared by tests/ and bench/: the Triton mode, the skipping of GPU-only tests, and (with
``FASTITM_TEST_LOG``) a line per test outcome written as it happens."""

import json
import os
import sys

import torch

# The GPU check installs without pip (bench/gpu_check.py): fastitm, with kernels/ as fastitm.kernels,
# is linked into a site folder named by FASTITM_SITE. pytest has just put this checkout first on
# sys.path, where fastitm/ has no kernels/, so that folder goes before it.
if os.environ.get("FASTITM_SITE"):
    sys.path.insert(0, os.environ["FASTITM_SITE"])

# Triton decides at import whether @triton.jit functions run in its interpreter, so the choice is
# made here, before anything imports Triton: on a machine without CUDA every Triton kernel runs
# (and is tested) on CPU tensors through the interpreter; with CUDA they run on the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Under pytest-xdist (`make test` runs one worker per core, at most four) each worker gets its share of
# the cores: workers with a thread per core each would slow one another many times over.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, _cores // _workers))


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


# With FASTITM_TEST_LOG=path, each test's start and outcome are appended to that JSON-lines file as
# they happen (the GPU check reads it): a run killed at its time limit keeps every outcome it reached,
# and names the test it was in, where a JUnit file is only written at the end.
def _log(record):
    path = os.environ.get("FASTITM_TEST_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def pytest_runtest_logstart(nodeid, location):
    _log({"id": nodeid, "event": "start"})


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        message = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2])
        elif report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)  # "ExceptionType: message"
            message = crash.message if crash is not None else (report.longreprtext.strip().splitlines() or [""])[-1]
        _log({"id": report.nodeid, "event": report.when, "outcome": report.outcome,
              "seconds": round(report.duration, 3), "message": message[:300]})
