"""Racing against the Diffusion Classifier's own schedule on many-class zero-shot classification (issue 36).

    python bench/classify_bench.py [--objects 24] [--compositions 8] [--thousand 1] [--json out.json]

The embedded model, ``diffusion_classifier``, one plan per task (``eval_prob_adaptive.py``'s timesteps
``range(1000 // T // 2, 1000, 1000 // T)[:T]``, noise seed 0), images drawn with ``--seed`` (23 by
default, on which no racing default was chosen; the settled stop's per-image bound came after a
240-class run of seed 23, so that set is reported on seed 31 as well). Each set runs two arms on the same images
in one engine call each: the published schedule (``elimination=`` with ``order="published"``:
``eval_prob_adaptive.py``'s ``--to_keep`` / ``--n_samples`` over the plan of ``max(n_samples)``
timesteps) and racing with its defaults (``adaptive=True``):

- ``48 objects``: the 48 one-object classes (colour x shape x size), the Oxford Pets schedule
  (``--to_keep 5 1 --n_samples 25 250``);
- ``240 compositions``: 240 two-object scenes ("a red circle left of a blue square"), the
  Food-101 / Flowers / Aircraft schedule (``--to_keep 20 10 5 1 --n_samples 20 50 100 500``);
- ``1000 compositions``: the ImageNet schedule (``--to_keep 500 50 10 1 --n_samples 50 100 500 1000``),
  whose 124,500 rows per image are counted from the schedule (running it costs about 9 minutes an
  image on this machine); racing runs.

``--memory``: peak resident memory of racing one image at 48, 240 and 1,000 classes (a subprocess each,
50 timesteps), so growth with the number of classes shows.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time

import torch
from benchutil import emit, machine

SEED = 23
SCHEDULES = {  # the published commands.md: (to_keep, n_samples)
    "pets": ((5, 1), (25, 250)),
    "food": ((20, 10, 5, 1), (20, 50, 100, 500)),
    "imagenet": ((500, 50, 10, 1), (50, 100, 500, 1000)),
}


def task(n_classes: int):
    """(scenes, texts): the 48 object classes, or n two-object compositions drawn with SEED."""
    from fastitm.evaluate.generate_classify import composition_classes, object_classes

    scenes = object_classes() if n_classes == 48 else composition_classes(n_classes, seed=SEED)
    return scenes, [s.caption for s in scenes]


def images_of(scenes, n: int, size: int, seed: int = SEED):
    """n images of distinct classes, drawn with ``seed``: (images, true class indices)."""
    from fastitm import data

    rng = random.Random(seed)
    truth = rng.sample(range(len(scenes)), n)
    return [data.render(scenes[k], rng, size=size) for k in truth], truth


def rounds(schedule: str) -> tuple[int, list[tuple[int, int]]]:
    """(the plan's length, elimination rounds) of a published schedule."""
    keep, samples = SCHEDULES[schedule]
    return max(samples), list(zip(samples, keep, strict=True))


def published_rows(n_classes: int, schedule: str) -> int:
    """Conditional rows per image of the published schedule, counted from its stages."""
    from fastitm.core.methods import published_stages

    T, r = rounds(schedule)
    live, rows = n_classes, 0
    for stage, (_, keep) in zip(published_stages(T, tuple(r)), r, strict=False):
        rows += live * len(stage)
        live = min(live, keep)
    return rows


def arm(model, images, texts, truth, plan, **how) -> dict:
    import fastitm

    t0 = time.perf_counter()
    res = fastitm.score(images, texts, model=model, method="diffusion_classifier", plan=plan, progress=False, **how)
    wall = time.perf_counter() - t0
    right = 0
    for i, k in enumerate(truth):
        s = res.matrix[i]
        right += int((s >= s[k]).sum()) == 1  # a tie is never right
    return {"rows_per_image": round(res.stats["unet_rows"] / len(images), 1), "accuracy": round(right / len(images), 4),
            "wall_s": round(wall, 1), "choices": res.matrix.argmax(dim=1).tolist()}


def compare(model, n_classes: int, schedule: str, n_images: int, run_published: bool = True,
            seed: int = SEED) -> dict:
    import fastitm

    scenes, texts = task(n_classes)
    images, truth = images_of(scenes, n_images, model.resolution, seed)
    T, r = rounds(schedule)
    n_train = model.num_train_timesteps  # the published t_to_eval: range(start, 1000, 1000 // T)[:T]
    plan = fastitm.make_plan(model, list(range(n_train // T // 2, n_train, n_train // T))[:T], seed=0)
    entry = {"classes": n_classes, "images": n_images, "image_seed": seed, "timesteps": len(plan), "schedule": schedule,
             "published_rows_per_image_counted": published_rows(n_classes, schedule)}
    if run_published:
        entry["published"] = arm(model, images, texts, truth, plan, elimination=r, order="published")
    entry["racing"] = arm(model, images, texts, truth, plan, adaptive=True)
    base = entry["published"]["rows_per_image"] if run_published else entry["published_rows_per_image_counted"]
    entry["racing_rows_vs_published"] = round(base / entry["racing"]["rows_per_image"], 2)
    if run_published:
        entry["same_choice"] = sum(a == b for a, b in zip(entry["published"]["choices"], entry["racing"]["choices"],
                                                          strict=True))
    return entry


def peak_memory(n_classes: int) -> float:
    """MiB: the peak resident memory of a process that loads the model and races one image over
    n_classes classes (50 timesteps)."""
    code = f"""
import resource, sys
sys.path.insert(0, 'bench')
import fastitm
from classify_bench import task, images_of
model = fastitm.load_model()
scenes, texts = task({n_classes})
images, truth = images_of(scenes, 1, model.resolution)
fastitm.score(images, texts, model=model, method='diffusion_classifier', timesteps=50, adaptive=True, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return round(float(out.stdout.strip().splitlines()[-1]), 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objects", type=int, default=24, help="images of the 48-class set")
    p.add_argument("--compositions", type=int, default=8, help="images of the 240-class set")
    p.add_argument("--thousand", type=int, default=1, help="images of the 1,000-class set (racing only)")
    p.add_argument("--memory", action="store_true")
    p.add_argument("--seed", type=int, default=SEED, help="the images' seed (default 23)")
    p.add_argument("--racing-only", action="store_true",
                   help="racing alone (the published arm's rows are counted from its schedule, not run)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import fastitm

    model = fastitm.load_model()
    out = {"machine": machine(), "model": model.source, "method": "diffusion_classifier", "image_seed": args.seed,
           "sets": {}}
    if args.objects:
        out["sets"]["48 objects"] = compare(model, 48, "pets", args.objects, not args.racing_only, args.seed)
        print(json.dumps(out["sets"]["48 objects"]), file=sys.stderr, flush=True)
    if args.compositions:
        out["sets"]["240 compositions"] = compare(model, 240, "food", args.compositions, not args.racing_only,
                                                  args.seed)
        print(json.dumps(out["sets"]["240 compositions"]), file=sys.stderr, flush=True)
    if args.thousand:
        out["sets"]["1000 compositions"] = compare(model, 1000, "imagenet", args.thousand, False, args.seed)
    if args.memory:
        out["peak_rss_mib"] = {n: peak_memory(n) for n in (48, 240, 1000)}
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
