"""The ``levers`` stage of ``make gpu-check`` (see ``__main__.py``)."""

from __future__ import annotations

import os
import statistics
import time

import torch
from stages_common import Ctx, setup, timed


def run_levers(ctx: Ctx) -> None:
    import fastitm

    t0 = time.perf_counter()
    model, imgs, texts, plan = setup(ctx)
    ctx.record("setup", {"model_build_s": round(time.perf_counter() - t0, 1)})  # its own process: built again
    n_img, n_txt, T = imgs.shape[0], len(texts), len(plan)
    bs = 8 if ctx.smoke else 64
    rounds = 1 if ctx.smoke else 3
    fn = lambda: fastitm.score(imgs, texts, model=model, plan=plan, batch_size=bs, progress=False)  # noqa: E731

    def measure():
        base = fn()
        return statistics.median(timed(ctx, fn, rounds=rounds, warmup=0)), base.matrix

    plain_s, plain_m = measure()
    for lever in ("fuse_qkv",) if ctx.smoke else ("fuse_qkv", "channels_last"):
        if not ctx.fits(30, f"lever {lever}"):
            continue
        fastitm.models.speed.apply(model, **{lever: True})
        with_s, with_m = measure()
        # Undo, then measure the plain model again: a drift between the two plain runs shows the noise.
        if lever == "channels_last":
            model.unet.to(memory_format=torch.contiguous_format)
        else:
            model.unet.unfuse_qkv_projections()
        again_s, _ = measure()
        ctx.record(f"lever {lever}", {"without_s": round(plain_s, 3), "with_s": round(with_s, 3),
                                      "without_again_s": round(again_s, 3),
                                      "speedup": round(statistics.mean([plain_s, again_s]) / with_s, 3),
                                      "max_abs_score_diff": float((with_m - plain_m).abs().max()),
                                      "conditions": f"engine, batch {bs}, {n_img}x{n_txt}x{T}, bf16, CUDA graphs "
                                                    f"{os.environ.get('FASTITM_CUDA_GRAPHS', 'default (off)')}"})
        plain_s = again_s
    if not ctx.smoke and ctx.fits(150, "lever compile (its first call compiles for minutes)"):
        fastitm.models.speed.apply(model, compile=True)
        t = time.perf_counter()
        fn()
        first = time.perf_counter() - t
        with_s, with_m = measure()
        ctx.record("lever compile", {"without_s": round(plain_s, 3), "with_s": round(with_s, 3), "first_call_s": round(first, 1),
                                     "speedup": round(plain_s / with_s, 3),
                                     "max_abs_score_diff": float((with_m - plain_m).abs().max())})
