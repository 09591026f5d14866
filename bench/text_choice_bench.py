"""Text-choice evaluation with and without DiffusionITM's empty prompt's row, side by side.

    python bench/text_choice_bench.py [--images 40] [--timesteps 10] [--rounds 5] [--json out.json]

A task whose items all choose among one image's texts (ARO, SugarCrepe, Flickr30K text retrieval)
runs DiffusionITM with ``normalize=False`` unless told (:func:`fastitm.evaluate.runner.text_choice_only`):
the empty prompt's error shifts all of an image's texts alike. Here: held-out synthetic images of the
embedded model, each against its caption and one hard negative per negative kind (2-way items, as
ARO's and SugarCrepe's), written as a jsonl task. Each arm is a whole ``fastitm.evaluate.run``
(decoding, metrics and curves included), the arms alternate, and the wall time is the median of the
rounds. Reported per arm: denoiser rows, wall time, accuracy; and the largest difference between the
two arms' margins (true text minus the other), which the shift leaves unchanged.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchutil import emit, machine


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--timesteps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=23, help="the held-out scenes' seed")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.images < 1 or args.timesteps < 1 or args.rounds < 1:
        p.error("--images, --timesteps and --rounds must be positive")

    import fastitm
    from fastitm import data

    model = fastitm.load_model()
    with tempfile.TemporaryDirectory(prefix="text-choice-bench-") as folder:
        got, times, lines = _run(fastitm, data, model, Path(folder), args)
    out = {"machine": machine(), "model": model.source, "dtype": str(model.dtype), "items": len(lines),
           "images": args.images, "seed": args.seed, "timesteps": args.timesteps, "rounds": args.rounds, "arms": {}}
    for name, rep in got.items():
        out["arms"][name] = {"normalize": rep.options["normalize"], "unet_rows": rep.stats["unet_rows"],
                             "accuracy": rep.metrics["accuracy"], "wall_s": [round(x, 2) for x in times[name]],
                             "wall_median_s": round(statistics.median(times[name]), 2)}
    a, b = out["arms"].values()
    out["rows_ratio"] = round(b["unet_rows"] / a["unet_rows"], 3)
    out["wall_ratio"] = round(b["wall_median_s"] / a["wall_median_s"], 3)
    margins = [[x["scores"][0] - x["scores"][1] for x in rep.items] for rep in got.values()]
    out["max_margin_difference"] = max(abs(u - v) for u, v in zip(*margins, strict=True))
    out["same_choices"] = sum((u > 0) == (v > 0) for u, v in zip(*margins, strict=True))
    emit(out, args.json)
    return 0


def _run(fastitm, data, model, tmp: Path, args):
    """Write the jsonl task under ``tmp`` and run both arms in alternating rounds: (each arm's last
    report, each arm's wall times, the task's lines)."""
    lines = []
    for n, e in enumerate(data.make_dataset(args.images, "heldout", seed=args.seed, size=model.resolution)):
        e.image.save(tmp / f"{n}.png")
        lines += [{"image": f"{n}.png", "texts": [e.caption, neg], "label": 0, "tags": {"kind": kind}}
                  for kind, neg in e.negatives.items()]
    f = tmp / "set.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))

    arms = {"without the empty prompt's row (default)": {}, "normalize=True": {"normalize": True}}
    times: dict[str, list[float]] = {k: [] for k in arms}
    got = dict.fromkeys(arms)  # in the arms' order, whichever ran first
    for r in range(args.rounds):
        for name in arms if r % 2 == 0 else reversed(list(arms)):
            t = time.perf_counter()
            got[name] = fastitm.evaluate.run("jsonl", f, model=model, timesteps=args.timesteps, seed=0,
                                             progress=False, **arms[name])
            times[name].append(time.perf_counter() - t)
    return got, times, lines


if __name__ == "__main__":
    raise SystemExit(main())
