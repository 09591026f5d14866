"""The ``headline`` stage of ``make gpu-check`` (see ``__main__.py``)."""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: the shared FLOP count
from benchutil import row_flops  # noqa: E402
from stages_common import BATCH_SIZES, Ctx, device_busy, load_ceilings, setup, timed


def bare_loop(model, rows: int, batch: int):
    """A loop of denoiser calls on ``rows`` rows in batches of ``batch``: what any scorer must run."""
    cond = {k: v.expand(batch, *v.shape[1:]).contiguous() for k, v in model.spec.encode_empty(model).items()}
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, *model.latent_shape, generator=g).to(model.device, model.dtype)
    t = torch.randint(0, 1000, (batch,), generator=g).to(model.device)

    @torch.no_grad()
    def run():
        for _ in range(rows // batch):
            model.spec.forward(model.unet, x, t, cond)

    return run


def published_style(model, imgs, texts, timesteps) -> callable:
    """Per pair, as the published DiffusionITM script at batch size 1 runs it: the text and the image
    encoded for every pair, then per timestep one denoiser call on [conditional, unconditional]."""
    from fastitm.engine.common import encode_conditioning, encode_images, noisy_latents

    plan_like = type("P", (), {"latent": "mean"})()

    @torch.no_grad()
    def run():
        for i in range(imgs.shape[0]):
            for text in texts:
                z = encode_images(model, (imgs[i:i + 1] * 2 - 1).to(model.device, model.dtype), plan_like)
                cond = encode_conditioning(model, [text])
                empty = encode_conditioning(model, [], empty=True)
                both = {k: torch.cat([cond[k], empty[k]]) for k in cond}
                for t in timesteps:
                    noise = torch.randn_like(z)
                    tt = torch.full((1,), int(t), device=model.device, dtype=torch.long)
                    x = noisy_latents(model, z, noise, tt)
                    pred = model.spec.forward(model.unet, torch.cat([x, x]), tt.repeat(2), both)
                    (pred.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))

    return run


def run_headline(ctx: Ctx) -> None:
    import fastitm

    t0 = time.perf_counter()
    model, imgs, texts, plan = setup(ctx)
    ceil = load_ceilings(ctx)
    n_img, n_txt, T = imgs.shape[0], len(texts), len(plan)
    flops = row_flops(model)["row"]
    rows = n_img * T * (n_txt + 1)
    conditions = (f"{ctx.device_name()}, {model.source}, {model.dtype}, {model.resolution} px, latents "
                  f"{list(model.latent_shape)}, {n_img} images x {n_txt} texts x {T} timesteps = {rows} UNet rows "
                  f"(DiffusionITM, unconditional row shared per image and timestep)")
    ctx.record("setup", {"model_build_s": round(time.perf_counter() - t0, 1), "unet_gflops_per_row": round(flops / 1e9, 1),
                         "ceilings": ceil, "conditions": conditions})
    default_bs = fastitm.models.speed.default_batch_size(model) if not ctx.smoke else None
    ctx.record("default batch size", {"batch_size": default_bs, "rule": "largest power of two whose activations fit "
                                      "half the free memory, at most 128"})
    gemm = ceil["bf16_gemm_tflops"] * 1e12
    rounds = 1 if ctx.smoke else 3
    first = {}  # the first batch size's scores: every other batch size must give the same
    sizes = (8,) if ctx.smoke else BATCH_SIZES

    def engine_vs_bare(bs, images, label, unshared=False):
        n_rows = images.shape[0] * T * (n_txt + 1)
        fns = {}
        for graphs in ("1", "0"):
            def eng(graphs=graphs, bs=bs, images=images):
                os.environ["FASTITM_CUDA_GRAPHS"] = graphs
                return fastitm.score(images, texts, model=model, plan=plan, batch_size=bs, progress=False)
            fns[f"engine_graphs_{'on' if graphs == '1' else 'off'}"] = eng
        if unshared:  # graphs off (the default) without row sharing: what fastitm.engine.sharing saves here
            def eng_unshared(bs=bs, images=images):
                os.environ["FASTITM_CUDA_GRAPHS"] = "0"
                with mock.patch.dict(os.environ, {"FASTITM_ROW_SHARING": "0"}):  # restores what was set before
                    return fastitm.score(images, texts, model=model, plan=plan, batch_size=bs, progress=False)
            fns["engine_unshared"] = eng_unshared
        fns["bare_unet_loop"] = bare_loop(model, n_rows, bs)
        for fn in fns.values():  # warm-up: compilation, autotuning
            fn()
        times = {name: [] for name in fns}
        for _ in range(rounds):  # alternating rounds
            for name, fn in fns.items():
                times[name] += timed(ctx, fn, rounds=1, warmup=0)
        med = {name: statistics.median(v) for name, v in times.items()}
        res, off = fns["engine_graphs_on"](), fns["engine_graphs_off"]()
        first.setdefault(images.shape[0], res.matrix)
        figs = {f"{name}_rows_per_s": round(n_rows / s, 1) for name, s in med.items()}
        figs.update({f"{name}_s": [round(x, 3) for x in v] for name, v in times.items()})
        figs["engine_on_vs_bare"] = round(med["bare_unet_loop"] / med["engine_graphs_on"], 3)
        figs["engine_off_vs_bare"] = round(med["bare_unet_loop"] / med["engine_graphs_off"], 3)
        figs["graphs_speedup"] = round(med["engine_graphs_off"] / med["engine_graphs_on"], 3)
        figs["engine_fraction_of_gemm_ceiling"] = round(n_rows / med["engine_graphs_on"] * flops / gemm, 3)
        figs["bare_fraction_of_gemm_ceiling"] = round(n_rows / med["bare_unet_loop"] * flops / gemm, 3)
        figs["graphs_on_vs_off_max_abs_score_diff"] = float((res.matrix - off.matrix).abs().max())
        if unshared:  # graphs on runs unshared, graphs off shared (the default)
            figs["row_sharing_speedup"] = round(med["engine_unshared"] / med["engine_graphs_off"], 3)
            figs["row_sharing_max_abs_score_diff"] = float((off.matrix - fns["engine_unshared"]().matrix).abs().max())
            figs["prefix_rows"], figs["kv_rows"] = off.stats.get("prefix_rows"), off.stats.get("kv_rows")
        figs["vs_first_batch_size_max_abs_score_diff"] = float((res.matrix - first[images.shape[0]]).abs().max())
        figs["unet_rows"] = res.stats["unet_rows"]
        figs["graph_replays"] = res.stats.get("graph_replays")
        figs["rounds"] = rounds
        figs["conditions"] = f"{images.shape[0]} images x {n_txt} texts x {T} timesteps = {n_rows} rows, batch {bs}"
        ctx.record(f"engine vs bare UNet loop, batch {bs}{label}", figs)

    def baselines():
        # The two baselines of the published code's shape, on a slice (they are much slower per row).
        sub_t = [int(t) for t in plan.timesteps[:T]]
        if ctx.fits(30, "published-style per-pair loop"):
            fn = published_style(model, imgs[:1], texts[:4], sub_t)
            s = statistics.median(timed(ctx, fn, rounds=rounds, warmup=1))
            r = 1 * 4 * len(sub_t) * 2
            ctx.record("per-pair loop, published scripts' style", {
                "rows": r, "median_s": round(s, 3), "rows_per_s": round(r / s, 1),
                "conditions": f"1 image x 4 texts x {len(sub_t)} timesteps; per pair the text and image encoded, per "
                              "timestep one denoiser call on [conditional, unconditional] (batch 2)"})
        if ctx.fits(40, "fastitm.reference"):
            fn = lambda: fastitm.reference.score(imgs[:1], texts[:2], model=model, plan=plan, progress=False)  # noqa: E731
            s = statistics.median(timed(ctx, fn, rounds=rounds, warmup=1))
            ref = fn()
            eng = fastitm.score(imgs[:1], texts[:2], model=model, plan=plan, progress=False)
            r = ref.stats.get("unet_rows", 1 * 2 * T * 2)
            ctx.record("fastitm.reference (per pair and timestep, batch 1, stock attention)", {
                "rows": r, "median_s": round(s, 3), "rows_per_s": round(r / s, 1),
                "engine_vs_reference_max_abs_score_diff": float((eng.matrix - ref.matrix).abs().max()),
                "score_scale": float(ref.matrix.abs().max()),
                "conditions": f"1 image x 2 texts x {T} timesteps, same plan"})

    def encoders():
        # What the engine runs beyond the bare loop's denoiser calls, timed alone (issue 19's "where
        # does the engine's extra time go" on the GPU): the VAE encode of the images (in the VAE's own
        # dtype, recorded: fp32 for an fp16 model whose VAE config forces the upcast) and the texts
        # plus the empty prompt.
        from fastitm.core.inputs import prepare_images
        from fastitm.engine.common import encode_conditioning, encode_images

        pixels = prepare_images(imgs, model.resolution, "squash")
        fns = {"vae_encode": lambda: encode_images(model, pixels, plan),
               "text_encode": lambda: encode_conditioning(model, texts, empty=True)}
        med = {name: statistics.median(timed(ctx, fn, rounds=rounds, warmup=1)) for name, fn in fns.items()}
        ctx.record("encoders alone", {
            **{f"{name}_s": round(v, 4) for name, v in med.items()}, "vae_dtype": str(model.vae.dtype),
            "conditions": f"the headline's {n_img} images and {n_txt} texts + the empty prompt, median of {rounds}; "
                          "the engine's time minus the bare loop's at the same batch size, less these two, is the "
                          "engine's own (noising, error reduction, Python and host syncs per batch)"})

    def busy(bs):
        # The engine's extra time, second view: how long the GPU had work, for the engine and the bare
        # loop, each in one profiled call. Wall minus busy is time the GPU waited for the CPU.
        figs = {}
        os.environ["FASTITM_CUDA_GRAPHS"] = "0"  # the default
        try:
            device_busy(ctx, lambda: None)  # the profiler's one-time start-up, outside both figures
            for name, fn in (("engine", lambda: fastitm.score(imgs, texts, model=model, plan=plan, batch_size=bs,
                                                              progress=False)),
                             ("bare_unet_loop", bare_loop(model, rows, bs))):
                wall, on = device_busy(ctx, fn)
                figs.update({f"{name}_wall_s": round(wall, 4), f"{name}_device_busy_s": round(on, 4),
                             f"{name}_busy_fraction": round(on / wall, 3)})
        except Exception as e:  # a profiler that cannot trace here must not cost the stage its other figures
            figs["error"] = f"{type(e).__name__}: {e}"[:300]
        figs["conditions"] = (f"{rows} rows, batch {bs}, one call each under torch.profiler (device activity only; "
                              "kernels, copies and memsets counted, overlaps once)")
        ctx.record(f"device busy, engine vs bare loop, batch {bs}", figs)

    for n, bs in enumerate(sizes):
        if ctx.fits(25, f"engine vs bare loop at batch {bs}"):
            engine_vs_bare(bs, imgs, "", unshared=n == 0)
        if n == 0 and ctx.fits(5, "encoders alone"):
            encoders()
        if n == 0 and ctx.fits(20, "device busy under the profiler"):
            busy(bs)
        if n == min(1, len(sizes) - 1):  # after the two likely best batch sizes
            baselines()
    os.environ["FASTITM_CUDA_GRAPHS"] = "1"
    # A small call (one item's rows) and a 4x longer one at the same batch size: each fastitm.score
    # call captures its own CUDA graph, so a small call pays the capture (warm-up forwards included).
    bs = sizes[0]
    if ctx.fits(20, "small call, graphs on vs off"):
        small = imgs[:1]
        times = {}
        for graphs in ("1", "0", "1", "0", "1", "0"):
            os.environ["FASTITM_CUDA_GRAPHS"] = graphs
            fn = lambda: fastitm.score(small, texts[:2], model=model, plan=plan, batch_size=bs, progress=False)  # noqa: E731
            times.setdefault(graphs, []).extend(timed(ctx, fn, rounds=1, warmup=0 if graphs in times else 1))
        os.environ["FASTITM_CUDA_GRAPHS"] = "1"
        ctx.record(f"one small call (1 image x 2 texts x {T} timesteps = {3 * T} rows), batch {bs}", {
            "graphs_on_s": [round(x, 3) for x in times["1"]], "graphs_off_s": [round(x, 3) for x in times["0"]],
            "graphs_on_vs_off": round(statistics.median(times["0"]) / statistics.median(times["1"]), 3)})
    if not ctx.smoke and ctx.fits(45, "4x longer run"):
        engine_vs_bare(bs, torch.cat([imgs] * 4), " (4x the images)")
    if ctx.fits(30, "Discffusion engine run"):
        fn = lambda: fastitm.score(imgs, texts, model=model, plan=plan, method="discffusion", batch_size=bs,  # noqa: E731
                                   progress=False)
        s = statistics.median(timed(ctx, fn, rounds=rounds, warmup=1))
        res = fn()
        r = res.stats["unet_rows"]
        ctx.record(f"Discffusion engine (fused cross-attention LSE), batch {bs}", {
            "rows": r, "median_s": round(s, 3), "rows_per_s": round(r / s, 1), "backend": res.backend,
            "fraction_of_gemm_ceiling": round(r / s * flops / gemm, 3)})
