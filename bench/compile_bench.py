"""The ``compile`` lever on the CPU: ``torch.compile`` of the denoiser (inductor, weights frozen into the
graph) against the eager denoiser as ``fastitm.load_model`` sets it up on the CPU (fp32, channels-last),
through whole ``fastitm.score`` calls on the same model, inputs and plan.

The SD 2.1-base architecture (random weights) at 256 px (4x32x32 latents), fp32, ``diffusion_classifier``
on 2 images x 4 texts x 2 timesteps = 16 UNet rows in two full batches of 8 (full batches: a compiled
denoiser is specialised to its batch shape, and a smaller batch compiles again). The first compiled call
compiles (its time, less an eager call's, is the compile's cost); then rounds alternate the two arms and
the medians are compared. Under compile the engine's row sharing is off (:mod:`fastitm.engine.sharing`: the
shapes would vary by batch), so the eager arm runs fewer UNet rows' worth of work: the comparison is the
lever as a run would use it.

    python bench/compile_bench.py --rounds 3 [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from benchutil import emit, machine


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import fastitm
    from fastitm.models.speed import apply

    model = fastitm.testing.sd21_base_architecture(seed=0)
    model.unet.register_to_config(sample_size=args.size // model.vae_scale_factor)
    apply(model, channels_last=True)  # load_model's CPU fp32 default: the eager arm as users run it
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(2, 3, args.size, args.size, generator=g)
    texts = ["a photo of a red car", "a photo of a small dog on grass", "a photo of two cups", "a bird"]
    plan = fastitm.make_plan(model, 2, seed=0)
    kw = dict(model=model, method="diffusion_classifier", plan=plan, batch_size=args.batch, progress=False)
    rows = len(imgs) * len(texts) * len(plan)
    assert rows % args.batch == 0, "full batches only (a smaller batch recompiles)"

    unet = model.unet
    torch._inductor.config.freezing = True
    unet.compile(backend="inductor", dynamic=False)
    compiled = unet._compiled_call_impl

    def eager():
        unet._compiled_call_impl = None
        try:
            return fastitm.score(imgs, texts, **kw)
        finally:
            unet._compiled_call_impl = compiled

    def comp():
        return fastitm.score(imgs, texts, **kw)

    t0 = time.perf_counter()
    ref = eager()
    first_eager = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = comp()
    first_compiled = time.perf_counter() - t0
    diff = float((got.matrix - ref.matrix).abs().max())
    e_s, c_s = [], []
    for _ in range(args.rounds):
        for fn, out in ((eager, e_s), (comp, c_s)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    e, c = statistics.median(e_s), statistics.median(c_s)
    batches = rows // args.batch
    compile_cost = first_compiled - first_eager
    saved_per_batch = (e - c) / batches
    emit({
        "bench": "compile lever on the CPU", "machine": machine(), "model": "SD 2.1-base architecture",
        "size_px": args.size, "dtype": "float32", "method": "diffusion_classifier", "rows_per_call": rows,
        "batch": args.batch, "rounds": args.rounds,
        "eager_s": [round(x, 3) for x in e_s], "compiled_s": [round(x, 3) for x in c_s],
        "eager_median_s": round(e, 3), "compiled_median_s": round(c, 3), "speedup": round(e / c, 3),
        "first_compiled_call_s": round(first_compiled, 1), "compile_cost_s": round(compile_cost, 1),
        "eager_batch_s": round(e / batches, 3), "saved_per_batch_s": round(saved_per_batch, 3),
        "break_even_batches": round(compile_cost / saved_per_batch) if saved_per_batch > 0 else None,
        "eager_row_sharing": ref.stats.get("row_sharing"), "compiled_row_sharing": got.stats.get("row_sharing"),
        "max_abs_diff": diff,
    }, args.json)


if __name__ == "__main__":
    main()
