"""Timestep weights fitted on training items, judged on held-out items (issue 22's benchmark).

    python bench/calibrate_bench.py [--train-images 800] [--heldout-images 60] [--timesteps 30]
                                    [--method diffusion_itm ...] [--json out.json]

The embedded model and its synthetic sets (:func:`fastitm.data.make_dataset`): one 2-way item per
(image, hard-negative kind), the image against its caption and that negative, all five kinds, written
as a jsonl task (the kind as its tag). ``fastitm.evaluate.calibrate`` scores 5% of the *training*
split's items (at most 200) once and fits the weights; the held-out items are scored once with uniform
weights, and every other weighting is applied to that run's stored per-timestep scores
(``EvalReport.reweight``, equal to a fresh run with those weights: tests/test_calibrate.py). Reported
per method: held-out accuracy per kind with uniform weights, the fitted weights and each rate of the
exp family; the calibration's own nested cross-validated before/after on its training items.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchutil import emit, machine

EXP_RATES = (1, 2, 4, 7, 10, 15)


def write_task(folder: Path, name: str, examples) -> Path:
    lines = []
    for n, e in enumerate(examples):
        path = folder / f"{name}_{n}.png"
        e.image.save(path)
        for kind, neg in e.negatives.items():
            lines.append({"image": path.name, "texts": [e.caption, neg], "label": 0, "tags": {"kind": kind}})
    f = folder / f"{name}.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines))
    return f


def accuracies(report) -> dict:
    m = report.metrics
    return {"all": round(m["accuracy"], 4),
            **{k.removeprefix("kind="): round(v["accuracy"], 4) for k, v in m["by_tag"].items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-images", type=int, default=800, help="training-split images (one item per negative kind each)")
    p.add_argument("--heldout-images", type=int, default=200, help="held-out images (one item per negative kind each)")
    p.add_argument("--timesteps", type=int, default=30)
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--max-items", type=int, default=200)
    p.add_argument("--method", nargs="+", default=["diffusion_itm"])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import fastitm
    from fastitm import data
    from fastitm.evaluate import calibrate, run
    from fastitm.evaluate.calibrate import describe_fit

    model = fastitm.load_model()
    folder = Path(tempfile.mkdtemp(prefix="fastitm-calibrate-"))
    train = write_task(folder, "train", data.make_dataset(args.train_images, "train", seed=5, size=model.resolution))
    held = write_task(folder, "heldout", data.make_dataset(args.heldout_images, "heldout", seed=7,
                                                            size=model.resolution))
    n_train = sum(1 for _ in train.open())
    n_held = sum(1 for _ in held.open())
    limit = min(args.max_items, max(10, round(args.fraction * n_train)))
    out = {"machine": machine(),
           "model": model.source, "timesteps": args.timesteps, "train_items": n_train, "calibration_items": limit,
           "heldout_items": n_held, "methods": {}}
    for method in args.method:
        t0 = time.perf_counter()
        cal = calibrate("jsonl", train, model=model, method=method, timesteps=args.timesteps, limit=limit,
                        progress=False, out=folder / f"weights_{method}.json")
        t_cal = time.perf_counter() - t0
        t0 = time.perf_counter()
        uniform = run("jsonl", held, model=model, method=method, timesteps=args.timesteps, progress=False)
        t_eval = time.perf_counter() - t0
        arms = {"uniform": accuracies(uniform),
                "fitted": accuracies(uniform.reweight(folder / f"weights_{method}.json")),
                **{f"exp {r}": accuracies(uniform.reweight({"kind": "exp", "rate": r})) for r in EXP_RATES}}
        out["methods"][method] = {
            "fitted": describe_fit(cal.fitted),
            "weights": {t: round(w, 3) for t, w in cal.weights.items()},
            "calibration_nested_cv": {"before": round(cal.before["accuracy"], 4),
                                      "after": round(cal.after["accuracy"], 4)},
            "heldout_accuracy": arms,
            "worst_kind_change_points": round(100 * min(arms["fitted"][k] - arms["uniform"][k]
                                                        for k in arms["uniform"] if k != "all"), 1),
            "wall_s": {"calibrate": round(t_cal, 1), "heldout_eval": round(t_eval, 1)}}
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
