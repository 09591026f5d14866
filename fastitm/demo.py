"""``fastitm demo``: the main job end to end on the embedded model, with no download.

Loads the model shipped in the package (trained by ``python -m fastitm.train`` on the synthetic data
of :mod:`fastitm.data`), scores held-out images (combinations never seen in training) against their
true captions and hard negatives with each method, prints the 2-way accuracy per negative kind, image
retrieval with the normalized score and a few example rows, and saves a picture of images with the
captions DiffusionITM chose.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

from . import data


def save_grid(images, captions, correct, path: Path, cell: int = 128, cols: int = 6) -> Path:
    """Images in a grid, each with the chosen caption under it (green: the true one, red: a negative)."""
    from PIL import Image, ImageDraw

    rows = -(-len(images) // cols)
    text_h = 40
    grid = Image.new("RGB", (cell * cols, (cell + text_h) * rows), "white")
    d = ImageDraw.Draw(grid)
    for n, (img, cap, ok) in enumerate(zip(images, captions, correct)):
        x, y = (n % cols) * cell, (n // cols) * (cell + text_h)
        grid.paste(img.resize((cell - 8, cell - 8), Image.NEAREST), (x + 4, y + 4))
        for m, line in enumerate(textwrap.wrap(cap, width=cell // 6)[:3]):
            d.text((x + 4, y + cell + m * 12), line, fill=(0, 120, 0) if ok else (200, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _table(reports, kinds) -> str:
    head = f"{'method':<22}" + "".join(f"{k:>17}" for k in kinds)
    lines = [head, "-" * len(head)]
    for r in reports:
        cells = "".join(f"{(f'{r.accuracy(k):.2f} ({r.total[k]})' if r.total.get(k) else '-'):>17}" for k in kinds)
        lines.append(f"{r.method:<22}" + cells)
    return "\n".join(lines)


def run_demo(out_dir: str = "fastitm-demo", timesteps: int = 10, seed: int = 0, n: int = 48,
             model_path: str | None = None) -> int:
    from . import evaluate, load_model
    from .methods import METHODS
    from .model import embedded_model_path

    t_start = time.perf_counter()
    if model_path is None and embedded_model_path() is None:
        from .testing import tiny_model

        print("NOTE: this build ships no trained model; the demo runs on a RANDOM-WEIGHT tiny model of the\n"
              "Stable Diffusion architecture, so the scores below show the pipeline, not real matching.\n")
        model = tiny_model(seed=0)
    else:
        model = load_model(model_path)
    size = model.resolution
    examples = data.make_dataset(n, "heldout", seed=seed, size=size)
    print(f"model: {model.source}")
    print(f"data: {n} held-out synthetic images (fastitm.data, split 'heldout', seed {seed}): colour/shape/"
          f"relation combinations never seen in training; {timesteps} timesteps, one shared plan\n")
    print("2-way choice, true caption vs one hard negative: accuracy (number of choices); chance is 0.50")
    reports = []
    for method in METHODS:
        reports.append(evaluate.hard_negatives(model, examples, method=method, timesteps=timesteps, seed=seed))
    print(_table(reports, data.NEGATIVE_KINDS))
    acc, count = evaluate.image_retrieval(model, examples, group=8, timesteps=timesteps, seed=seed)
    print(f"\nimage retrieval, diffusion_itm normalized, groups of 8 images: {acc:.2f} of {count} captions "
          f"find their own image (chance 0.125)")

    itm = reports[0]
    print("\nexamples (diffusion_itm score, higher = better; * = chosen):")
    for row in itm.rows[:4]:
        best = max([row["score"]] + [x["score"] for x in row["negatives"]])
        mark = "*" if row["score"] == best else " "
        print(f"  {mark} {row['score']:9.3f}  {row['caption']}   (true)")
        for x in row["negatives"]:
            mark = "*" if x["score"] == best else " "
            print(f"  {mark} {x['score']:9.3f}  {x['caption']}   ({x['kind']})")
        print()
    chosen, correct = [], []
    for row in itm.rows[:18]:
        cands = [(row["score"], row["caption"], True)] + [(x["score"], x["caption"], False) for x in row["negatives"]]
        s, cap, ok = max(cands, key=lambda c: c[0])
        chosen.append(cap)
        correct.append(ok)
    path = save_grid([e.image for e in examples[:18]], chosen, correct, Path(out_dir) / "demo_grid.png")
    print(f"saved {path}: each image with the caption diffusion_itm chose among its true caption and "
          f"negatives (green: right, red: wrong)")
    print(f"done in {time.perf_counter() - t_start:.0f} s")
    return 0
