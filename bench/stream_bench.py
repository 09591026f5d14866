"""Cross-item streaming vs one engine call per item, side by side (issue 19's batch-fill benchmark).

    python bench/stream_bench.py [--items 64] [--batch-size 64] [--timesteps 10] [--rounds 3]

Winoground-shaped items (2 images x 2 captions each, DiffusionITM with the unconditional row: 2 x 3 x T
rows per item) on the embedded model, held-out synthetic images. ``per item``: one ``fastitm.score``
call per item, as the evaluation runner did; ``streamed``: calls of ``--stream`` batches' worth of
items with a block-diagonal ``pairs=`` (each image against its own item's captions), as it does now.
Reported: mean batch fill (rows / (batches x batch size)), engine calls, wall time (median of
alternating rounds) and the largest score difference between the two.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from benchutil import machine


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--timesteps", type=int, default=10)
    p.add_argument("--stream", type=int, default=16, help="batches' worth of rows per streamed call")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    import fastitm
    from fastitm import data

    model = fastitm.load_model()
    ex = data.make_dataset(2 * args.items, "heldout", seed=3, size=model.resolution)
    items = [([ex[2 * n].image, ex[2 * n + 1].image], [ex[2 * n].caption, ex[2 * n + 1].caption])
             for n in range(args.items)]
    plan = fastitm.make_plan(model, args.timesteps, seed=0)
    bs = args.batch_size
    rows_item = 2 * 3 * args.timesteps

    def per_item():
        out, batches = [], 0
        for imgs, caps in items:
            res = fastitm.score(imgs, caps, model=model, plan=plan, batch_size=bs, progress=False)
            out.append(res.matrix)
            batches += -(-res.stats["unet_rows"] // bs)
        return out, batches, len(items)

    def streamed():
        out, batches, calls = [], 0, 0
        per_call = max(1, (args.stream * bs) // rows_item)
        for start in range(0, len(items), per_call):
            chunk = items[start : start + per_call]
            imgs = [im for i, _ in chunk for im in i]
            caps = [c for _, c in chunk for c in c]
            pairs = torch.block_diag(*[torch.ones(2, 2) for _ in chunk]).bool()
            res = fastitm.score(imgs, caps, model=model, plan=plan, batch_size=bs, pairs=pairs, progress=False)
            out += [res.matrix[2 * n : 2 * n + 2, 2 * n : 2 * n + 2] for n in range(len(chunk))]
            batches += -(-res.stats["unet_rows"] // bs)
            calls += 1
        return out, batches, calls

    arms = {"per item": per_item, "streamed": streamed}
    times = {k: [] for k in arms}
    got = {}
    for _ in range(args.rounds):
        for name, fn in arms.items():
            t = time.perf_counter()
            got[name] = fn()
            times[name].append(time.perf_counter() - t)
    rows = rows_item * len(items)
    out = {"machine": machine(), "model": model.source, "items": len(items),
           "rows": rows, "batch_size": bs, "timesteps": args.timesteps, "rounds": args.rounds, "arms": {}}
    for name in arms:
        _, batches, calls = got[name]
        out["arms"][name] = {"calls": calls, "batches": batches, "batch_fill": round(rows / (batches * bs), 4),
                             "wall_s": [round(x, 2) for x in times[name]],
                             "wall_median_s": round(statistics.median(times[name]), 2)}
    out["streamed_speedup"] = round(out["arms"]["per item"]["wall_median_s"] / out["arms"]["streamed"]["wall_median_s"], 3)
    out["max_abs_score_difference"] = max(float((a - b).abs().max()) for a, b in zip(got["per item"][0],
                                                                                     got["streamed"][0], strict=True))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
