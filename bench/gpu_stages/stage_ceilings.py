"""The ``ceilings`` stage of ``make gpu-check`` (see ``__main__.py``)."""

from __future__ import annotations

import json

import torch
from stages_common import Ctx, ceilings_path, event_ms


def run_ceilings(ctx: Ctx) -> None:
    n = 256 if ctx.smoke else 8192
    a = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    ms = event_ms(ctx, lambda: torch.matmul(a, b), rounds=3 if ctx.smoke else 20, warmup=1 if ctx.smoke else 5)
    tflops = 2 * n**3 / (ms * 1e-3) / 1e12
    ctx.record("bf16 GEMM ceiling", {"shape": f"{n}^3", "median_ms": round(ms, 3), "tflops": round(tflops, 1),
                                     "rounds": 20, "device": ctx.device_name()})
    a = b = None  # free the 256 MiB operands before the copy test
    nbytes = (16 if ctx.smoke else 2048) * 2**20
    x = torch.empty(nbytes, dtype=torch.uint8, device=ctx.device)
    y = torch.empty_like(x)
    ms = event_ms(ctx, lambda: y.copy_(x), rounds=3 if ctx.smoke else 20, warmup=1 if ctx.smoke else 5)
    gbs = 2 * nbytes / (ms * 1e-3) / 1e9  # read + write
    ctx.record("device copy ceiling", {"bytes": nbytes, "median_ms": round(ms, 3), "gb_per_s_read_plus_write": round(gbs, 1),
                                       "rounds": 20, "device": ctx.device_name()})
    ceilings_path(ctx.figures).write_text(json.dumps({"bf16_gemm_tflops": tflops, "copy_gb_per_s": gbs,
                                                      "source": "measured in this run"}))
