"""An evaluation whose items share images, with and without the image cache, side by side.

    python bench/image_cache_bench.py [--queries 24] [--candidates 10] [--timesteps 10] [--rounds 3] [--adaptive]

Flickr30k-image-retrieval-shaped: ``--queries`` captions, each ranking ``--candidates`` images from
a pool of as many images as captions (its true image and others drawn at random, seeded), so each image
is a candidate of about ``--candidates`` captions, as in GDBench's re-ranking file (1,000 captions, CLIP's
top 10 of 1,000 images). The embedded model, held-out synthetic images, DiffusionITM with its
unconditional row. Each arm is a whole ``fastitm.evaluate.run`` on the jsonl task (PNG decoding,
metrics and curves included), and the arms alternate. Reported per arm: denoiser rows, VAE images,
reused rows, wall time (median of the rounds), and the largest score difference between the arms.
``--adaptive``: both arms race (``adaptive=True``: each caption's candidate images, round by round).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from benchutil import machine


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=24)
    p.add_argument("--candidates", type=int, default=10)
    p.add_argument("--timesteps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--adaptive", action="store_true", help="race the candidates in both arms")
    args = p.parse_args(argv)
    if not 2 <= args.candidates <= args.queries:
        p.error("--candidates must be in [2, --queries] (candidates are drawn from a pool of --queries images)")

    import fastitm
    from fastitm import data

    model = fastitm.load_model()
    ex = data.make_dataset(args.queries, "heldout", seed=5, size=model.resolution)
    rng = random.Random(0)
    tmp = Path(tempfile.mkdtemp(prefix="image-cache-bench-"))
    for n, e in enumerate(ex):
        e.image.save(tmp / f"{n}.png")
    lines = []
    for n, e in enumerate(ex):
        others = rng.sample([m for m in range(len(ex)) if m != n], args.candidates - 1)
        lines.append({"images": [f"{m}.png" for m in [n, *others]], "text": e.caption, "label": 0})
    f = tmp / "set.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))

    def run(cache: bool):
        return fastitm.evaluate.run("jsonl", f, model=model, timesteps=args.timesteps, seed=0, progress=False,
                                    image_cache=cache, adaptive=True if args.adaptive else None)

    arms = {"per item (no cache)": False, "image cache": True}
    times = {k: [] for k in arms}
    got = {}
    for r in range(args.rounds):
        for name in arms if r % 2 == 0 else reversed(list(arms)):
            t = time.perf_counter()
            got[name] = run(arms[name])
            times[name].append(time.perf_counter() - t)
    out = {"machine": machine(), "model": model.source, "dtype": str(model.dtype),
           "queries": args.queries, "candidates": args.candidates, "distinct_images": len(ex),
           "timesteps": args.timesteps, "adaptive": args.adaptive, "rounds": args.rounds, "arms": {}}
    for name in arms:
        st = got[name].stats
        out["arms"][name] = {"unet_rows": st["unet_rows"], "vae_images": st["vae_images"],
                             "unet_rows_reused": st.get("unet_rows_reused", 0), "batch_size": st["batch_size"],
                             "batch_fill": st["batch_fill"], "accuracy": got[name].metrics.get("accuracy"),
                             "wall_s": [round(x, 2) for x in times[name]],
                             "wall_median_s": round(statistics.median(times[name]), 2)}
    a, b = (out["arms"][k] for k in arms)
    out["rows_ratio"] = round(a["unet_rows"] / b["unet_rows"], 3)
    out["wall_ratio"] = round(a["wall_median_s"] / b["wall_median_s"], 3)
    plain, cached = (got[k].items for k in arms)
    # (racing: a candidate dropped in both arms scores None in both)
    out["max_abs_score_difference"] = max(abs(x - y) for r, s in zip(plain, cached, strict=True)
                                          for x, y in zip(r["scores"], s["scores"], strict=True)
                                          if x is not None and y is not None)
    out["same_candidates_dropped"] = all([x is None for x in r["scores"]] == [y is None for y in s["scores"]]
                                         for r, s in zip(plain, cached, strict=True))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
