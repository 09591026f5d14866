"""Racing in the engine vs the full plan, side by side in one process (issue 19's benchmark).

    python bench/racing_bench.py [--examples 60] [--timesteps 50] [--rounds 1] [--json out.json]

The embedded model on held-out synthetic images (:func:`fastitm.data.make_dataset`), one 2-way item per
(image, hard-negative kind): the image against its caption and that negative, all five kinds. Both
arms score every item in one ``fastitm.score`` call (``pairs=``: each item's image row against its own
two captions) under the same plan; ``adaptive=True`` (or ``--alpha``) races, the other runs every
timestep. Reported: accuracy of each; on the items whose full-plan choice is clear (a paired t-test of
true minus other over all timesteps, two-sided p < 0.01) how often racing makes the same choice; the
near-tie items; denoiser rows and wall time of each (median over ``--rounds`` alternating rounds).

``--sets``: every set of issue 36 instead (2-way, 3/6-way and 24-class items, each drawn with a tuning
and a held-out seed): bench/racing_sets_bench.py with the other arguments.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from benchutil import emit, machine


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--sets" in argv:  # every set, tuned and held out: the other bench, with the arguments that follow
        import racing_sets_bench

        return racing_sets_bench.main([a for a in argv if a != "--sets"])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", action="store_true", help="every set of issue 36 instead (2-way, 3/6-way, 24-class, "
                   "tuning and held-out seeds, with the 3- and 6-way items apart): runs bench/racing_sets_bench.py "
                   "with the other arguments (its --images, --wall, --json, ...)")
    p.add_argument("--examples", type=int, default=60, help="held-out images (x 5 kinds = items)")
    p.add_argument("--timesteps", type=int, default=50)
    p.add_argument("--alpha", type=float, nargs="+", default=[0.05])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--save", default=None, help="save the full plan's per-timestep scores here (torch.save)")
    p.add_argument("--classes", action="store_true", help="the many-candidate case instead: zero-shot "
                   "classification over the 24 colour x shape captions, diffusion_classifier with racing vs with "
                   "the published elimination schedule (keep 5 after a tenth of the timesteps) vs the full plan")
    args = p.parse_args(argv)
    if args.classes:
        return classes(args)

    from scipy.stats import ttest_1samp

    import fastitm
    from fastitm import data

    model = fastitm.load_model()
    examples = data.make_dataset(args.examples, "heldout", seed=7, size=model.resolution)
    images, texts, items = [], [], []
    for e in examples:
        for kind, neg in e.negatives.items():
            images.append(e.image)
            items.append((kind, len(texts)))
            texts += [e.caption, neg]
    pairs = torch.zeros(len(images), len(texts), dtype=torch.bool)
    for i, (_, j) in enumerate(items):
        pairs[i, j : j + 2] = True
    plan = fastitm.make_plan(model, args.timesteps, seed=0)
    arms = {"full": None, **{f"alpha {a}": {"alpha": a} for a in args.alpha}}
    times: dict[str, list[float]] = {k: [] for k in arms}
    results = {}
    for _ in range(args.rounds):
        for name, adaptive in arms.items():
            t = time.perf_counter()
            results[name] = fastitm.score(images, texts, model=model, plan=plan, pairs=pairs, adaptive=adaptive,
                                          progress=False)
            times[name].append(time.perf_counter() - t)

    full = results["full"]
    if args.save:  # the full plan's per-timestep scores: racing options can be explored offline with simulate
        torch.save({"per_timestep": full.per_timestep, "items": items, "timesteps": args.timesteps}, args.save)
    choice_full, clear, near = [], [], 0
    for i, (_, j) in enumerate(items):
        d = (full.per_timestep[i, j] - full.per_timestep[i, j + 1]).double()
        pval = float(ttest_1samp(d.numpy(), 0.0).pvalue) if d.std() > 0 else (0.0 if d.mean() != 0 else 1.0)
        choice_full.append(0 if full.matrix[i, j] > full.matrix[i, j + 1] else 1)
        clear.append(pval < 0.01)
        near += pval >= 0.01
    out = {"machine": machine(),
           "model": model.source, "items": len(items), "kinds": sorted({k for k, _ in items}),
           "timesteps": args.timesteps, "rounds": args.rounds, "clear_items": sum(clear), "near_ties": near, "arms": {}}
    for name, res in results.items():
        choice = [0 if res.matrix[i, j] > res.matrix[i, j + 1] else 1 for i, (_, j) in enumerate(items)]
        acc = sum(c == 0 for c in choice) / len(items)
        same_clear = sum(c == f for c, f, cl in zip(choice, choice_full, clear, strict=True) if cl)
        per_kind = {}
        for kind in out["kinds"]:
            idx = [n for n, (k, _) in enumerate(items) if k == kind]
            per_kind[kind] = round(sum(choice[n] == 0 for n in idx) / len(idx), 4)
        out["arms"][name] = {
            "accuracy": round(acc, 4), "accuracy_by_kind": per_kind,
            "same_choice_on_clear_items": f"{same_clear}/{sum(clear)}",
            "unet_rows": res.stats["unet_rows"], "wall_s": [round(x, 2) for x in times[name]],
            "wall_median_s": round(statistics.median(times[name]), 2),
            "plan_end_items": (sum(res.stats["racing"]["plan_end"]) if "racing" in res.stats else len(items))}
    base = out["arms"]["full"]
    for arm in out["arms"].values():
        arm["rows_vs_full"] = round(base["unet_rows"] / arm["unet_rows"], 2)
        arm["wall_vs_full"] = round(base["wall_median_s"] / arm["wall_median_s"], 2)
    emit(out, args.json)
    return 0


def classes(args) -> int:
    """24-way zero-shot classification (6 colours x 4 shapes) of single-object held-out images."""
    import fastitm
    from fastitm import data

    model = fastitm.load_model()
    labels = [(c, s) for c in data.COLORS for s in data.SHAPES]
    texts = [data.Scene((data.Obj(c, s, "big"),)).caption for c, s in labels]
    ex = [e for e in data.make_dataset(8 * args.examples, "heldout", seed=11, size=model.resolution,
                                       two_object_share=0.0) if e.scene.objects[0].size == "big"][: args.examples]
    truth = [labels.index((e.scene.objects[0].color, e.scene.objects[0].shape)) for e in ex]
    T = args.timesteps
    plan = fastitm.make_plan(model, T, seed=0, scheme="midpoint")
    arms = {"full plan": {}, "published elimination": {"elimination": [(max(1, T // 10), 5)]},
            **{f"racing alpha {a}": {"adaptive": {"alpha": a}} for a in args.alpha}}
    times: dict[str, list[float]] = {k: [] for k in arms}
    results = {}
    for _ in range(args.rounds):
        for name, kw in arms.items():
            t = time.perf_counter()
            results[name] = fastitm.score([e.image for e in ex], texts, model=model, method="diffusion_classifier",
                                          plan=plan, progress=False, **kw)
            times[name].append(time.perf_counter() - t)
    out = {"machine": machine(), "model": model.source, "images": len(ex),
           "classes": len(texts), "timesteps": T, "method": "diffusion_classifier", "arms": {}}
    full_rows = results["full plan"].stats["unet_rows"]
    for name, res in results.items():
        pred = res.matrix.argmax(dim=1).tolist()
        out["arms"][name] = {"accuracy": round(sum(p == t for p, t in zip(pred, truth, strict=True)) / len(ex), 4),
                             "unet_rows": res.stats["unet_rows"],
                             "rows_vs_full": round(full_rows / res.stats["unet_rows"], 2),
                             "wall_median_s": round(statistics.median(times[name]), 2)}
    if args.save:  # per-timestep scores [images, classes, T] of the full plan, for simulate
        torch.save({"per_timestep": results["full plan"].per_timestep, "truth": truth, "timesteps": T}, args.save)
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
