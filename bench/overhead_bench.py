"""Where the engine's time goes beyond the denoiser, on the CPU (issue 19: at equal rows the engine must
be within 3% of a bare loop of UNet calls).

The SD 2.1-base architecture (random weights) at 256 px (4x32x32 latents), fp32,
``diffusion_classifier`` on 2 images x 3 texts x 10 timesteps = 60 UNet rows. Arms, alternating in each
round, the same rows in the same batches:

- ``engine``: ``fastitm.score`` (image and text encoding, noising, the fused error reduction) on the
  model as ``fastitm.load_model`` sets it up on this device (on the CPU in fp32: channels-last
  convolutions, :func:`fastitm.models.speed.default_channels_last`; ``--stock`` leaves the model as built);
- ``bare``: the denoiser alone on 60 rows cut into the engine's batches (no encoding, no error), on
  the engine's model: what the engine adds beyond its denoiser;
- ``encoders``: the engine's VAE and text-encoder calls alone on the same inputs; the engine less
  them, round by round, against ``bare`` is what the engine adds beyond what every scorer runs;
- ``unshared`` (``--unshared``): the engine with ``FASTITM_ROW_SHARING=0``, every row through the whole
  UNet (the engine runs the text-free prefix once per (image, timestep) cell and the cross-attention
  keys and values once per text: :mod:`fastitm.engine.sharing`);
- ``published`` (``--published``): the Diffusion Classifier's ``eval_prob_adaptive.py`` loop (the
  prompts encoded once, per image the VAE encode and one batch of every (prompt, timestep) row) on a
  copy of the model as diffusers builds it, as the published script runs it.

Then one more engine call under cProfile splits its wall time into encoders, UNet, error and the rest.

The work is counted too: torch's FLOP counter on one row gives the UNet's FLOPs per row and those of
the parts the engine shares; with the rows the shared parts ran (the engine's ``prefix_rows`` and
``kv_rows``), that is the engine's UNet FLOPs against the bare loop's.

``--parts`` times the shared modules alone (timers on them) in one batch of the engine's shape, with and
without sharing, alternating: a direct view of what sharing saves, which at 4% of the UNet's work is
within the machine's round-to-round spread of whole calls.

    python bench/overhead_bench.py --rounds 3 [--unshared] [--parts] [--published] [--stock] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import os
import pstats
import statistics
import time
from unittest import mock

import torch
from benchutil import emit, machine, row_flops


def build(size: int):
    import fastitm

    model = fastitm.testing.sd21_base_architecture(seed=0)
    model.unet.register_to_config(sample_size=size // model.vae_scale_factor)
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(2, 3, size, size, generator=g)
    texts = ["a photo of a red car", "a photo of a small dog on grass", "a photo of two cups"]
    return model, imgs, texts


def bare(model, batches: list[int]):
    cond = model.spec.encode_empty(model)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(b, *model.latent_shape, generator=g) for b in batches]
    ts = [torch.randint(0, 1000, (b,), generator=g) for b in batches]
    conds = [{k: v.expand(b, *v.shape[1:]).contiguous() for k, v in cond.items()} for b in batches]

    @torch.no_grad()
    def run():
        for x, t, c in zip(xs, ts, conds, strict=True):
            model.spec.forward(model.unet, x, t, c)

    return run


def encoders(model, imgs, texts, plan):
    """The engine's two encoder calls on the same inputs, which a bare loop of UNet calls does not run:
    the VAE on the images (one batch, as the engine's), the text encoder on the texts (no empty prompt:
    the Diffusion Classifier has no unconditional term)."""
    from fastitm.core.inputs import prepare_images
    from fastitm.engine.common import encode_conditioning, encode_images

    @torch.no_grad()
    def run():
        encode_images(model, prepare_images(imgs, model.resolution, "squash"), plan)
        encode_conditioning(model, texts)

    return run


def shared_parts(model, rounds: int, n_texts: int = 3, cells: int = 10) -> dict:
    """The time inside the parts the engine shares, with and without sharing, on one batch of the
    engine's shape (``cells`` (image, timestep) cells x ``n_texts`` texts), alternating: timers on the
    shared modules (the prefix, and every cross-attention's K/V projections), the gathers excluded."""
    from fastitm.engine.sharing import RowSharing, kv_modules, prefix_modules

    unet = model.unet
    spent = {"prefix": 0.0, "kv": 0.0}
    handles = []
    for part, mods in (("prefix", prefix_modules(unet)), ("kv", kv_modules(unet))):
        for m in mods:
            def pre(mod, args, part=part):
                mod._fastitm_t0 = time.perf_counter()

            def post(mod, args, out, part=part):
                spent[part] += time.perf_counter() - mod._fastitm_t0

            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    g = torch.Generator().manual_seed(2)
    cell, text = torch.arange(cells * n_texts) // n_texts, torch.arange(cells * n_texts) % n_texts
    x = torch.randn(cells, *model.latent_shape, generator=g)[cell]
    t = torch.randint(0, 1000, (cells,), generator=g)[cell]
    hidden = model.spec.encode(model, [f"text {j}" for j in range(n_texts)])["hidden"][text]
    out = {f"{arm}_{k}": [] for arm in ("every_row", "shared") for k in ("prefix_s", "kv_s", "unet_s")}
    with torch.no_grad():
        for _ in range(rounds):
            for arm in ("every_row", "shared"):
                spent.update(prefix=0.0, kv=0.0)
                t0 = time.perf_counter()
                if arm == "shared":  # the hooks' timers were registered first: they exclude the gathers
                    with RowSharing(unet) as share:
                        share.batch(cell, text, torch.device("cpu"))
                        unet(x, t, encoder_hidden_states=hidden)
                else:
                    unet(x, t, encoder_hidden_states=hidden)
                out[f"{arm}_unet_s"].append(round(time.perf_counter() - t0, 2))
                out[f"{arm}_prefix_s"].append(round(spent["prefix"], 3))
                out[f"{arm}_kv_s"].append(round(spent["kv"], 3))
    for h in handles:
        h.remove()
    med = {k: statistics.median(v) for k, v in out.items()}
    saved = med["every_row_prefix_s"] + med["every_row_kv_s"] - med["shared_prefix_s"] - med["shared_kv_s"]
    return {"batch": f"{cells} cells x {n_texts} texts = {cells * n_texts} rows", **out,
            "saved_s_median": round(saved, 3), "saved_of_unet": round(saved / med["every_row_unet_s"], 4)}


def published(model, imgs, texts, plan):
    """eval_prob_adaptive.py's scoring: prompts encoded once; per image the VAE mean, then every
    (prompt, timestep) row in batches of 32 with the shared noise of its timestep."""
    from fastitm.engine.common import encode_conditioning, noisy_latents

    batch = 32

    @torch.no_grad()
    def run():
        emb = encode_conditioning(model, texts)
        for i in range(imgs.shape[0]):
            x0 = model.vae.encode(imgs[i : i + 1] * 2 - 1).latent_dist.mean * model.vae.config.scaling_factor
            pairs = [(p, k) for p in range(len(texts)) for k in range(len(plan))]
            for a in range(0, len(pairs), batch):
                chunk = pairs[a : a + batch]
                p_idx = torch.tensor([p for p, _ in chunk])
                k_idx = torch.tensor([k for _, k in chunk])
                noise = plan.noise[k_idx]
                t = plan.timesteps[k_idx]
                x = noisy_latents(model, x0.expand(len(chunk), -1, -1, -1), noise, t)
                pred = model.spec.forward(model.unet, x, t, {k: v[p_idx] for k, v in emb.items()})
                (noise - pred).pow(2).mean(dim=(1, 2, 3))

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--timesteps", type=int, default=10)
    p.add_argument("--published", action="store_true")
    p.add_argument("--unshared", action="store_true", help="also the engine with FASTITM_ROW_SHARING=0")
    p.add_argument("--parts", action="store_true",
                   help="also time the shared parts alone, with and without sharing, on one batch")
    p.add_argument("--stock", action="store_true", help="the engine's model as built (no load_model defaults)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import fastitm
    from fastitm.models import speed

    stock, imgs, texts = build(args.size)
    model = stock
    if not args.stock and speed.default_channels_last(stock.device, stock.dtype):
        model = speed.apply(copy.deepcopy(stock) if args.published else stock, channels_last=True)
    plan = fastitm.make_plan(model, args.timesteps, seed=0)
    bs = fastitm.models.speed.default_batch_size(model)
    rows = imgs.shape[0] * len(texts) * len(plan)
    batches = [min(bs, rows - a) for a in range(0, rows, bs)]

    def engine():
        return fastitm.score(imgs, texts, model=model, method="diffusion_classifier", plan=plan, batch_size=bs,
                             progress=False)

    def unshared():
        with mock.patch.dict(os.environ, {"FASTITM_ROW_SHARING": "0"}):  # restores what was set before
            return engine()

    arms = {"engine": engine, "bare": bare(model, batches), "encoders": encoders(model, imgs, texts, plan)}
    if args.unshared:
        arms["unshared"] = unshared
    if args.published:
        arms["published"] = published(stock, imgs, texts, plan)
    engine()  # warm-up (first-call costs: allocator, kernels' dispatch)
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(args.rounds):
        for name, fn in arms.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    less = [e - c for e, c in zip(times["engine"], times["encoders"], strict=True)]  # the engine less its encoders

    prof = cProfile.Profile()
    prof.enable()
    res = engine()
    prof.disable()
    st = pstats.Stats(prof)
    parts = {"encode_images": "encode_images", "encode_conditioning": "encode_conditioning",
             "unet": "__call__ (UNetRunner)", "error_reduce": "error_reduce", "noisy_latents": "noisy_latents"}
    split = {}
    for (file, _line, fn), (_cc, _nc, _tt, ct, _callers) in st.stats.items():
        for key, want in parts.items():
            name = want.split(" ")[0]
            if fn == name and (key != "unet" or file.endswith("cuda_graphs.py")):
                split[key] = split.get(key, 0.0) + ct
    total = sum(v for (_f, _l, fn), (_a, _b, _c, v, _d) in st.stats.items() if fn == "score_run")
    split["rest"] = total - sum(split.values())
    out = {"machine": machine(),
           "shapes": f"SD 2.1-base architecture, {args.size} px, fp32, diffusion_classifier, 2 images x 3 texts x "
                     f"{len(plan)} timesteps = {rows} rows, batches {batches}",
           "engine_levers": model.levers or "none", "rounds": args.rounds,
           "times_s": {k: [round(x, 2) for x in v] for k, v in times.items()}, "median_s": {k: round(v, 3) for k, v in med.items()},
           "engine_vs_bare": round(med["bare"] / med["engine"], 4),
           # round by round, against the bare loop: what the engine adds beyond what every scorer runs
           "engine_minus_encoders_s": [round(x, 2) for x in less],
           "engine_minus_encoders_vs_bare": round(med["bare"] / statistics.median(less), 4),
           "unet_rows": res.stats["unet_rows"], "row_sharing": res.stats["row_sharing"],
           "prefix_rows": res.stats.get("prefix_rows"), "kv_rows": res.stats.get("kv_rows"),
           "engine_profile_s": {k: round(v, 3) for k, v in split.items()}, "engine_profiled_s": round(total, 3)}
    if "prefix_rows" in res.stats:
        f = row_flops(model)
        shared = (rows * f["row"] - (rows - res.stats["prefix_rows"]) * f["prefix"]
                  - (rows - res.stats["kv_rows"]) * f["kv"])
        out["gflops_per_row"] = {k: round(v / 1e9, 3) for k, v in f.items()}
        out["unet_gflops"] = {"bare": round(rows * f["row"] / 1e9, 1), "engine": round(shared / 1e9, 1)}
    if args.parts:
        out["shared_parts"] = shared_parts(model, args.rounds)
    if args.unshared:
        out["engine_vs_unshared"] = round(med["unshared"] / med["engine"], 4)
    if args.published:
        out["engine_vs_published"] = round(med["published"] / med["engine"], 4)
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
