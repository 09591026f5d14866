"""The measuring stages of ``make gpu-check``, each run by ``bench/gpu_check.py`` in its own process:

    python bench/gpu_stages.py STAGE --figures FILE --until EPOCH_SECONDS [--smoke]

Every figure is appended to FILE (one JSON line: stage, name, figures with their conditions) the
moment it is measured, so a stage stopped at its time limit keeps what it reached. Each stage
checks ``--until`` before each step and skips, with a line saying so, what would not fit.

Stages (in the order the check runs them, most valuable first):

- ``ceilings``: the device's measured bf16 GEMM rate (8192^3) and device-to-device copy bandwidth,
  the denominators of every floor below.
- ``kernels``: the fused ops (cross-attention + LSE forward and backward, error reduction) on fresh
  random inputs at the SD 2.1-base and SDXL layer shapes, fp32/fp16/bf16 against the fp32 reference,
  next to PyTorch's own error in that dtype.
- ``headline``: the SD 2.1-base architecture (random weights, 512 px, bf16): UNet rows/s of the
  engine (CUDA graphs on and off; at the first batch size also without row sharing,
  ``FASTITM_ROW_SHARING=0``), a bare loop of denoiser calls on the same rows, ``fastitm.reference``
  and a per-pair loop in the published scripts' style, at batch sizes 16/32/64/128; UNet FLOPs per row
  counted with ``torch.utils.flop_counter``; the engine's rate as a fraction of the GEMM ceiling.
- ``fused-ops``: the fused ops against SDPA + logsumexp at the SD 2.1 shapes (time, peak memory),
  each time next to its floor (bytes / measured copy bandwidth, FLOPs / measured GEMM rate).
- ``levers``: channels_last and fuse_qkv against the same model without them (compile last, only
  when enough time is left).

``--smoke`` runs a stage on the CPU with the tiny model and small shapes: CI's check that the code
runs (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from unittest import mock

import torch

# SD 2.1-base at 512 px: the cross-attention layers' [heads, query length] (head dim 64, 77 keys).
SD21_LAYERS = ((5, 4096), (10, 1024), (20, 256), (20, 64))
# SDXL at 1024 px: its two attention levels (head dim 64, 77 keys).
SDXL_LAYERS = ((10, 4096), (20, 1024))
HEAD_DIM, KEYS = 64, 77
# Headline shapes: 4 images x 15 texts x 8 timesteps = 512 rows (with the 4 x 8 unconditional rows),
# a whole number of batches at every batch size tried.
N_IMAGES, N_TEXTS, N_TIMESTEPS = 4, 15, 8
BATCH_SIZES = (64, 128, 32, 16)  # the likely best first: a stage cut short keeps the most useful figures


class Ctx:
    def __init__(self, stage: str, figures: Path, until: float, smoke: bool):
        self.stage, self.figures, self.until, self.smoke = stage, figures, until, smoke
        self.device = torch.device("cpu" if smoke else "cuda")

    def left(self) -> float:
        return self.until - time.time()

    def fits(self, seconds: float, what: str) -> bool:
        """Whether ``seconds`` more fit before the stage's end; if not, say what is skipped."""
        if self.left() >= seconds:
            return True
        self.record(f"skipped: {what}", {"reason": f"needs about {seconds:.0f} s, {max(0.0, self.left()):.0f} s left"})
        return False

    def record(self, name: str, figures: dict) -> None:
        line = {"stage": self.stage, "name": name, "figures": figures, "at": round(time.time(), 1)}
        with open(self.figures, "a") as f:
            f.write(json.dumps(line, default=str) + "\n")
        print(f"[{self.stage}] {name}: {json.dumps(figures, default=str)}", flush=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self) -> int:
        if self.device.type != "cuda":
            return 0
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def peak_above(self, base: int) -> int:
        if self.device.type != "cuda":
            return 0
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    def device_name(self) -> str:
        return torch.cuda.get_device_name(0) if self.device.type == "cuda" else "cpu (smoke run)"


def timed(ctx: Ctx, fn, rounds: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``rounds`` calls after ``warmup`` untimed ones, synchronized."""
    for _ in range(warmup):
        fn()
    ctx.sync()
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        ctx.sync()
        out.append(time.perf_counter() - t)
    return out


def busy_seconds(spans) -> float:
    """The length of the union of (start, end) intervals: how long at least one of them was running."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def device_busy(ctx: Ctx, fn) -> tuple[float, float]:
    """(wall seconds, seconds the device was running at least one kernel or copy) of one ``fn()``
    under torch.profiler, from its Chrome trace (on the CPU, a smoke run: its top-level CPU ops)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    cuda = ctx.device.type == "cuda"
    kinds = {"kernel", "gpu_memcpy", "gpu_memset"} if cuda else {"cpu_op"}
    ctx.sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        fn()
        ctx.sync()
        wall = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in kinds and "dur" in e]
    return wall, busy_seconds(spans) / 1e6  # the trace is in microseconds


def event_ms(ctx: Ctx, fn, rounds: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` by CUDA events (wall clock on the CPU)."""
    if ctx.device.type != "cuda":
        return 1e3 * statistics.median(timed(ctx, fn, rounds, warmup))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def ceilings_path(figures: Path) -> Path:
    return figures.with_name("ceilings.json")


def load_ceilings(ctx: Ctx) -> dict:
    """The ceilings measured earlier in this run (``ceilings`` stage), or the datasheet-derived ones
    the issue gives for an H200 (marked as such) when that stage did not finish."""
    p = ceilings_path(ctx.figures)
    if p.is_file():
        return json.loads(p.read_text())
    return {"bf16_gemm_tflops": 780.0, "copy_gb_per_s": 4300.0, "source": "assumed (no ceilings measured in this run)"}


# -- ceilings --------------------------------------------------------------------------------------------

def stage_ceilings(ctx: Ctx) -> None:
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


# -- kernels ---------------------------------------------------------------------------------------------

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference over the expected's max magnitude."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def stage_kernels(ctx: Ctx) -> None:
    from fastitm.ops import cross_attention_lse, cross_attention_lse_ref, error_reduce, error_reduce_ref

    backend = "reference" if ctx.smoke else "triton"
    batch = 2 if ctx.smoke else 8
    layers = [("SD 2.1", h, lq) for h, lq in SD21_LAYERS] + [("SDXL", h, lq) for h, lq in SDXL_LAYERS]
    if ctx.smoke:
        layers = [("SD 2.1", 2, 64)]
    failures = 0
    # Breadth first: every dtype at the largest SD 2.1 layer, then the backward and the error reduction,
    # then the other layers, so a stage cut short has checked every kernel in every dtype.
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    forward = [(d, *layers[0]) for d in dtypes] + [(d, *layer) for layer in layers[1:] for d in dtypes]

    def forward_check(dtype, family, heads, lq):
        nonlocal failures
        if not ctx.fits(8, f"cross_attention_lse forward {family} {heads}x{lq} {dtype}"):
            return
        g = torch.Generator(device="cpu").manual_seed(heads * 7919 + lq)
        shape_q, shape_k = (batch, heads, lq, HEAD_DIM), (batch, heads, KEYS, HEAD_DIM)
        q, k, v = (torch.randn(s, generator=g).to(ctx.device, dtype) for s in (shape_q, shape_k, shape_k))
        t = time.perf_counter()
        out, pooled = cross_attention_lse(q, k, v, backend=backend)
        ctx.sync()
        first_s = time.perf_counter() - t
        ref_out, ref_pooled = cross_attention_lse_ref(q, k, v)  # fp32 oracle on the same rounded inputs
        own_out, own_pooled = cross_attention_lse_ref(q, k, v, upcast=False)  # PyTorch in this dtype
        err_o, err_p = _rel(out, ref_out), _rel(pooled, ref_pooled)
        torch_o, torch_p = _rel(own_out, ref_out), _rel(own_pooled, ref_pooled)
        bound = 1e-5 if dtype == torch.float32 else None
        ok = (err_o <= bound and err_p <= bound) if bound else (err_o <= 2 * torch_o + 1e-6 and err_p <= 2 * torch_p + 1e-6)
        failures += not ok
        ctx.record(f"cross_attention_lse forward {family} q{list(shape_q)} {str(dtype)[6:]}", {
            "ok": ok, "out_rel_err": f"{err_o:.2e}", "pooled_rel_err": f"{err_p:.2e}",
            "torch_out_rel_err": f"{torch_o:.2e}", "torch_pooled_rel_err": f"{torch_p:.2e}",
            "rule": "fp32: <= 1e-5; fp16/bf16: <= 2x PyTorch's own error in that dtype",
            "first_call_s_incl_compile_and_autotune": round(first_s, 2)})

    for case in forward[:len(dtypes)]:
        forward_check(*case)
    # Backward at the two largest SD 2.1 layers, every dtype, against autograd through the fp32 reference.
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for heads, lq in (SD21_LAYERS[:2] if not ctx.smoke else ((2, 64),)):
            if not ctx.fits(10, f"cross_attention_lse backward {heads}x{lq} {dtype}"):
                continue
            g = torch.Generator(device="cpu").manual_seed(heads + lq)
            shape_q, shape_k = (batch, heads, lq, HEAD_DIM), (batch, heads, KEYS, HEAD_DIM)
            base = [torch.randn(s, generator=g).to(ctx.device, dtype) for s in (shape_q, shape_k, shape_k)]
            d_out = torch.randn(shape_q, generator=g).to(ctx.device, dtype)
            d_pool = torch.randn(batch, heads, generator=g).to(ctx.device)

            def grads(fn, upcast, base=base, d_out=d_out, d_pool=d_pool):
                xs = [x.detach().clone().float().requires_grad_() if upcast else x.detach().clone().requires_grad_()
                      for x in base]
                out, pooled = fn(*xs)
                torch.autograd.backward([out, pooled], [d_out.to(out.dtype), d_pool])
                return [x.grad for x in xs]

            got = grads(lambda q, k, v: cross_attention_lse(q, k, v, backend=backend), False)
            want = grads(lambda q, k, v: cross_attention_lse_ref(q, k, v), True)
            own = grads(lambda q, k, v: cross_attention_lse_ref(q, k, v, upcast=False), False)
            errs = [_rel(a, b) for a, b in zip(got, want, strict=True)]
            torch_errs = [_rel(a, b) for a, b in zip(own, want, strict=True)]
            if dtype == torch.float32:
                ok = max(errs) <= 1e-4
            else:
                ok = all(e <= 2 * te + 1e-6 for e, te in zip(errs, torch_errs, strict=True))
            failures += not ok
            ctx.record(f"cross_attention_lse backward SD 2.1 q{list(shape_q)} {str(dtype)[6:]}", {
                "ok": ok, "dq_dk_dv_rel_err": [f"{e:.2e}" for e in errs],
                "torch_dq_dk_dv_rel_err": [f"{e:.2e}" for e in torch_errs],
                "rule": "fp32: <= 1e-4; fp16/bf16: <= 2x PyTorch's own error in that dtype"})
    # Error reduction: 4x64x64 (SD 2.1) and 4x128x128 (SDXL) latents, 3 images x 5 texts x 4 timesteps.
    for F in ((4 * 8 * 8,) if ctx.smoke else (4 * 64 * 64, 4 * 128 * 128)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            if not ctx.fits(5, f"error_reduce F={F} {dtype}"):
                continue
            N, M, T = 3, 5, 4
            rows = [(i, j, k) for i in range(N) for k in range(T) for j in [-1, *range(M)]]
            perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(F))
            idx = torch.tensor(rows, dtype=torch.long)[perm].to(ctx.device)
            ri, rj, rk = idx[:, 0], idx[:, 1], idx[:, 2]
            g = torch.Generator(device="cpu").manual_seed(F + 1)
            pred = torch.randn(len(rows), F, generator=g).to(ctx.device, dtype)
            target = torch.randn(T, F, generator=g).to(ctx.device, dtype)
            outs = []
            for fn, p, tg in ((lambda *a, **kw: error_reduce(*a, **kw, backend=backend), pred, target),
                              (error_reduce_ref, pred.float(), target.float())):
                u, per_t, s = (torch.zeros(N, T, device=ctx.device), torch.zeros(N, M, T, device=ctx.device),
                               torch.zeros(N, M, device=ctx.device))
                fn(p, tg, rk, ri, rj, rk, u, per_t, s)
                outs.append(per_t)
            err = _rel(outs[0], outs[1])
            ok = err <= 1e-4
            failures += not ok
            ctx.record(f"error_reduce F={F} {str(dtype)[6:]}", {"ok": ok, "per_t_rel_err": f"{err:.2e}",
                                                              "rule": "<= 1e-4 of the fp32 reduction of the same rounded inputs"})
    for case in forward[len(dtypes):]:
        forward_check(*case)
    ctx.record("kernels summary", {"failures": failures})
    if failures:
        raise SystemExit(f"{failures} kernel check(s) failed")


# -- headline --------------------------------------------------------------------------------------------

def _model(ctx: Ctx):
    import fastitm

    if ctx.smoke:
        return fastitm.testing.tiny_model(seed=0)
    return fastitm.testing.sd21_base_architecture(device="cuda", dtype=torch.bfloat16)


def _setup(ctx: Ctx):
    """The model and the headline's inputs: N_IMAGES random images x N_TEXTS captions, a plan of
    N_TIMESTEPS (smaller in a smoke run)."""
    import fastitm

    model = _model(ctx)
    n_img, n_txt, T = (2, 3, 4) if ctx.smoke else (N_IMAGES, N_TEXTS, N_TIMESTEPS)
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(n_img, 3, model.resolution, model.resolution, generator=g)
    texts = [f"a photo of object {j} next to object {j + 1}" for j in range(n_txt)]
    return model, imgs, texts, fastitm.make_plan(model, T, seed=0)


def unet_flops_per_row(model) -> int:
    """FLOPs of one denoiser row at the model's latent size, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    cond = model.spec.encode_empty(model)
    x = torch.zeros(1, *model.latent_shape, device=model.device, dtype=model.dtype)
    t = torch.full((1,), 500, device=model.device, dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.spec.forward(model.unet, x, t, cond)
    return int(counter.get_total_flops())


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
    from fastitm.common import encode_conditioning, encode_images, noisy_latents

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


def stage_headline(ctx: Ctx) -> None:
    import fastitm

    t0 = time.perf_counter()
    model, imgs, texts, plan = _setup(ctx)
    ceil = load_ceilings(ctx)
    n_img, n_txt, T = imgs.shape[0], len(texts), len(plan)
    flops = unet_flops_per_row(model)
    rows = n_img * T * (n_txt + 1)
    conditions = (f"{ctx.device_name()}, {model.source}, {model.dtype}, {model.resolution} px, latents "
                  f"{list(model.latent_shape)}, {n_img} images x {n_txt} texts x {T} timesteps = {rows} UNet rows "
                  f"(DiffusionITM, unconditional row shared per image and timestep)")
    ctx.record("setup", {"model_build_s": round(time.perf_counter() - t0, 1), "unet_gflops_per_row": round(flops / 1e9, 1),
                         "ceilings": ceil, "conditions": conditions})
    default_bs = fastitm.speed.default_batch_size(model) if not ctx.smoke else None
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
        if unshared:  # graphs off (the default) without row sharing: what fastitm.sharing saves here
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
        from fastitm.common import encode_conditioning, encode_images
        from fastitm.inputs import prepare_images

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


# -- fused ops vs SDPA ----------------------------------------------------------------------------------

def forward_tiles(ctx: Ctx, q, k, v) -> dict:
    """Each tile the forward's autotuner may pick (BLOCK_M, warps, register cap), timed alone on the same
    inputs, beside the autotuner's choice: what the register caps buy (four or five programs per SM
    instead of two under Triton 3.6, no spill) against the instruction-level parallelism ptxas gives up.
    On the CPU (--smoke) the same launches run under the interpreter, once each."""
    from fastitm.kernels import _tuning
    from fastitm.kernels import cross_attention_lse as cal

    block_n, block_d = cal.blocks(k.shape[2], q.shape[3])
    scale = q.shape[3] ** -0.5
    figs = {}
    for c in cal.fwd_candidates(block_d, q.dtype):
        fn = lambda c=c: cal._launch_fwd(q, k, v, scale, "logits", 1.0, None, block_n, block_d, *c)  # noqa: E731
        ms = event_ms(ctx, fn, rounds=1 if ctx.smoke else 20, warmup=0 if ctx.smoke else 3)
        figs[f"BLOCK_M={c[0]} warps={c[1]} maxnreg={c[2]}_ms"] = round(ms, 4)
    picked = _tuning.chosen().get(cal.fwd_tuning_key(q, k, "logits", False))  # the fused op's call above
    figs["autotuner_picked"] = None if picked is None else list(picked)
    figs["default"] = list(cal.fwd_default(block_d, q.dtype))
    return figs


def stage_fused_ops(ctx: Ctx) -> None:
    import torch.nn.functional as F

    from fastitm.ops import cross_attention_lse, error_reduce
    from fastitm.ops.cross_attention_lse import cross_attention_lse_backward

    ceil = load_ceilings(ctx)
    bw, gemm = ceil["copy_gb_per_s"] * 1e9, ceil["bf16_gemm_tflops"] * 1e12
    batch = 2 if ctx.smoke else 64
    backend = "reference" if ctx.smoke else "triton"
    dtype = torch.bfloat16
    for heads, lq in (((2, 64),) if ctx.smoke else SD21_LAYERS):
        if not ctx.fits(10, f"fused vs sdpa {heads}x{lq}"):
            continue
        g = torch.Generator().manual_seed(lq)
        q = torch.randn(batch, heads, lq, HEAD_DIM, generator=g).to(ctx.device, dtype)
        k = torch.randn(batch, heads, KEYS, HEAD_DIM, generator=g).to(ctx.device, dtype)
        v = torch.randn_like(k)
        scale = HEAD_DIM ** -0.5

        def unfused(q=q, k=k, v=v, scale=scale):
            out = F.scaled_dot_product_attention(q, k, v)
            s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
            return out, torch.logsumexp(s, dim=-1).sum(-1)

        provs = {"fused": lambda q=q, k=k, v=v: cross_attention_lse(q, k, v, backend=backend), "sdpa+logsumexp": unfused,
                 "sdpa_only": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)}
        figs = {}
        for name, fn in provs.items():
            fn()
            base = ctx.reset_peak()
            fn()
            peak = ctx.peak_above(base)
            ms = event_ms(ctx, fn, rounds=3 if ctx.smoke else 20)
            figs[f"{name}_ms"] = round(ms, 4)
            figs[f"{name}_peak_extra_mib"] = round(peak / 2**20, 1)
        nbytes = 2 * q.numel() * q.element_size() + 2 * k.numel() * k.element_size()  # q in, out, k, v
        flop = 4 * batch * heads * lq * KEYS * HEAD_DIM
        figs["bytes_floor_ms"] = round(nbytes / bw * 1e3, 4)
        figs["flops_floor_ms"] = round(flop / gemm * 1e3, 4)
        figs["fused_vs_sdpa+logsumexp"] = round(figs["sdpa+logsumexp_ms"] / figs["fused_ms"], 2)
        figs["fused_fraction_of_floor"] = round(max(figs["bytes_floor_ms"], figs["flops_floor_ms"]) / figs["fused_ms"], 3)
        figs["conditions"] = f"q [{batch}, {heads}, {lq}, 64], k/v [{batch}, {heads}, 77, 64], bf16, {ceil['source']} ceilings"
        ctx.record(f"cross_attention_lse vs SDPA, SD 2.1 layer {heads}x{lq}", figs)
        if ctx.fits(5, f"forward tiles {heads}x{lq}"):
            one = (slice(0, 1), slice(0, 1)) if ctx.smoke else (slice(None), slice(None))  # interpreter: 1 head
            ctx.record(f"cross_attention_lse forward per tile, SD 2.1 layer {heads}x{lq}",
                       forward_tiles(ctx, q[one], k[one], v[one]))
        if ctx.fits(5, f"fused backward {heads}x{lq}"):
            # The backward (fine-tuning): dq, dk, dv from d_out and d_pooled. Floors: q and d_out read, dq
            # written, k, v read, dk, dv written; five matrix products (S, dP, dQ, dK, dV) of 2 x Lq x 77 x 64
            # each (the kernel does a sixth, recomputing O for delta).
            d_out = torch.randn_like(q)
            d_pool = torch.ones(batch, heads, device=ctx.device)
            bwd = lambda q=q, k=k, v=v, d_out=d_out, d_pool=d_pool, scale=scale: cross_attention_lse_backward(  # noqa: E731
                q, k, v, d_out, d_pool, scale, "logits", 1.0, None, backend)
            bwd()
            bf = {"fused_bwd_ms": round(event_ms(ctx, bwd, rounds=3 if ctx.smoke else 20), 4)}
            bf["bytes_floor_ms"] = round((3 * q.numel() * q.element_size() + 4 * k.numel() * k.element_size())
                                         / bw * 1e3, 4)
            bf["flops_floor_ms"] = round(10 * batch * heads * lq * KEYS * HEAD_DIM / gemm * 1e3, 4)
            bf["fused_fraction_of_floor"] = round(max(bf["bytes_floor_ms"], bf["flops_floor_ms"]) / bf["fused_bwd_ms"], 3)
            bf["conditions"] = figs["conditions"] + ", d_pooled ones"
            ctx.record(f"cross_attention_lse backward, SD 2.1 layer {heads}x{lq}", bf)
    # Error reduction over a 128-row batch of 4x64x64 latents.
    if ctx.fits(10, "error_reduce timing"):
        R, Fdim = (16, 256) if ctx.smoke else (128, 4 * 64 * 64)
        N, T = 4, 8
        g = torch.Generator().manual_seed(1)
        pred = torch.randn(R, Fdim, generator=g).to(ctx.device, dtype)
        target = torch.randn(R, Fdim, generator=g).to(ctx.device, dtype)
        ri = torch.arange(R, device=ctx.device) % N
        rk = (torch.arange(R, device=ctx.device) // N) % T
        rj = torch.arange(R, device=ctx.device) % 3 - 1
        bufs = (torch.zeros(N, T, device=ctx.device), torch.zeros(N, 2, T, device=ctx.device), torch.zeros(N, 2, device=ctx.device))
        row_t = torch.arange(R, device=ctx.device)
        fused = lambda: error_reduce(pred, target, row_t, ri, rj, rk, *bufs, backend=backend)  # noqa: E731
        plain = lambda: (pred.float() - target.float()).pow(2).sum(1).sqrt()  # noqa: E731
        figs = {"fused_ms": round(event_ms(ctx, fused), 4), "torch_row_norms_ms": round(event_ms(ctx, plain), 4)}
        figs["bytes_floor_ms"] = round(2 * pred.numel() * pred.element_size() / bw * 1e3, 4)
        figs["fused_fraction_of_floor"] = round(figs["bytes_floor_ms"] / figs["fused_ms"], 3)
        figs["conditions"] = f"pred and target [{R}, {Fdim}] bf16 (the pred read once, its target read once)"
        ctx.record("error_reduce vs PyTorch row norms", figs)


# -- levers ----------------------------------------------------------------------------------------------

def stage_levers(ctx: Ctx) -> None:
    import fastitm

    t0 = time.perf_counter()
    model, imgs, texts, plan = _setup(ctx)
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
        fastitm.speed.apply(model, **{lever: True})
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
        fastitm.speed.apply(model, compile=True)
        t = time.perf_counter()
        fn()
        first = time.perf_counter() - t
        with_s, with_m = measure()
        ctx.record("lever compile", {"without_s": round(plain_s, 3), "with_s": round(with_s, 3), "first_call_s": round(first, 1),
                                     "speedup": round(plain_s / with_s, 3),
                                     "max_abs_score_diff": float((with_m - plain_m).abs().max())})


STAGES = {"ceilings": stage_ceilings, "kernels": stage_kernels, "headline": stage_headline,
          "fused-ops": stage_fused_ops, "levers": stage_levers}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=list(STAGES))
    p.add_argument("--figures", required=True, type=Path)
    p.add_argument("--until", type=float, default=None, help="the stage's end (seconds since the epoch)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, small shapes: the code runs, no figures")
    args = p.parse_args(argv)
    ctx = Ctx(args.stage, args.figures, args.until or time.time() + 600, args.smoke)
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    try:
        STAGES[args.stage](ctx)
    except SystemExit:
        raise
    except Exception as e:
        ctx.record("error", {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]})
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
