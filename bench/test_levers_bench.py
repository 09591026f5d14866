"""The GPU speed levers side by side on the SD 2.1-base architecture (random weights): engine rows/s
with each lever against the same run without it, same inputs and plan, medians of interleaved rounds.
These figures decide which levers are on by default on CUDA (:mod:`fastitm.models.speed`). All ``gpu``.
"""

import pytest
import torch
from benchutil import context, median_ms

import fastitm
from fastitm.testing import assert_close

pytestmark = pytest.mark.gpu

N, M, T = 4, 8, 10


def _run(model, plan, imgs, texts, **kw):
    return fastitm.score(imgs, texts, model=model, plan=plan, progress=False, **kw)


def _inputs(model):
    g = torch.Generator().manual_seed(0)
    return torch.rand(N, 3, 512, 512, generator=g), [f"a photo of object {j}" for j in range(M)]


# compile last: its first call compiles for minutes, and a stage stopped at its limit keeps what ran before
@pytest.mark.parametrize("lever", ["fp32_vs_bf16", "channels_last", "fuse_qkv", "batch_size", "compile"])
def test_lever_gpu(lever, report, benchmark):
    base_dtype = torch.float32 if lever == "fp32_vs_bf16" else torch.bfloat16
    base = fastitm.testing.sd21_base_architecture(device="cuda", dtype=base_dtype)
    other = fastitm.testing.sd21_base_architecture(device="cuda", dtype=torch.bfloat16)
    if lever in ("channels_last", "fuse_qkv", "compile"):
        fastitm.models.speed.apply(other, **{lever: True})
    imgs, texts = _inputs(base)
    plan = fastitm.make_plan(base, T, seed=0)
    kw_base = {"batch_size": 32} if lever == "batch_size" else {}
    kw_other = {} if lever == "batch_size" else {}
    fa = lambda: _run(base, plan, imgs, texts, **kw_base)  # noqa: E731
    fb = lambda: _run(other, plan, imgs, texts, **kw_other)  # noqa: E731
    ra, rb = fa(), fb()  # warm-up (compilation, graph capture, autotuning)
    # Interleaved rounds: slow drifts of clock or temperature hit both alike.
    ms_a, ms_b = [], []
    for _ in range(3):
        ms_a.append(median_ms(fa, base.device, rounds=1, warmup=0)[0])
        ms_b.append(median_ms(fb, other.device, rounds=1, warmup=0)[0])
    a, b = sorted(ms_a)[1], sorted(ms_b)[1]
    rows = rb.stats["unet_rows"]
    for name, value in context(other.device, other.dtype, model="SD 2.1-base architecture", images=N, texts=M,
                               timesteps=T).items():
        report(name, value)
    report("lever", lever)
    report("without_ms", round(a, 1))
    report("with_ms", round(b, 1))
    report("speedup", round(a / b, 3))
    report("rows_per_s_with", round(rows / b * 1e3, 1))
    report("batch_size_with", rb.stats["batch_size"])
    # the lever keeps the numbers: within bf16 rounding of the run without it
    scale = ra.matrix.abs().max().clamp_min(1.0)
    assert_close(rb.matrix, ra.matrix, rtol=5e-2, atol=5e-2 * float(scale), name=lever)
    benchmark.pedantic(fb, rounds=1, warmup_rounds=0)
