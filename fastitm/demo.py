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
from dataclasses import replace
from pathlib import Path

from . import data, evaluate, load_model
from .core.methods import METHODS
from .models.lora import load_adapter
from .models.model import embedded_model_path
from .testing import tiny_model


def save_grid(images, captions, correct, path: Path, truths=None, cell: int = 144, cols: int = 6) -> Path:
    """Images in a grid under a legend, each with the caption the model chose (green: the true one,
    red: a hard negative, with the true caption under it in grey)."""
    from PIL import Image, ImageDraw

    truths = truths or [None] * len(images)
    rows = -(-len(images) // cols)
    text_h, legend_h = 80, 30
    grid = Image.new("RGB", (cell * cols, legend_h + (cell + text_h) * rows), "white")
    d = ImageDraw.Draw(grid)
    d.text((4, 4), "caption chosen by diffusion_itm among the true caption and hard negatives:", fill=(0, 0, 0))
    d.text((4, 16), "green = the true caption", fill=(0, 120, 0))
    d.text((150, 16), "red = a hard negative (true caption in grey)", fill=(200, 0, 0))
    for n, (img, cap, ok, truth) in enumerate(zip(images, captions, correct, truths, strict=True)):
        x, y = (n % cols) * cell, legend_h + (n // cols) * (cell + text_h)
        grid.paste(img.resize((cell - 8, cell - 8), Image.NEAREST), (x + 4, y + 4))
        lines = [(line, (0, 120, 0) if ok else (200, 0, 0)) for line in textwrap.wrap(cap, width=cell // 6)[:3]]
        if not ok and truth:
            lines += [(line, (120, 120, 120)) for line in textwrap.wrap("true: " + truth, width=cell // 6)[:3]]
        for m, (line, colour) in enumerate(lines):
            d.text((x + 4, y + cell + m * 12), line, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _table(reports, kinds) -> str:
    head = f"{'method':<26}" + "".join(f"{k:>17}" for k in kinds)
    lines = [head, "-" * len(head)]
    for r in reports:
        cells = "".join(f"{(f'{r.accuracy(k):.2f} ({r.total[k]})' if r.total.get(k) else '-'):>17}" for k in kinds)
        lines.append(f"{r.method:<26}" + cells)
    return "\n".join(lines)


# recipe -> the method its adapter is evaluated with
ADAPTER_METHODS = {"hardneg": "diffusion_itm", "discffusion": "discffusion"}


def shipped_adapters() -> dict[str, Path]:
    """The LoRA adapters shipped in fastitm/assets/adapters/<recipe> (those present)."""
    root = Path(__file__).parent / "assets" / "adapters"
    return {r: root / r for r in ADAPTER_METHODS if (root / r / "adapter_model.safetensors").is_file()}


def adapter_reports(model, model_path, examples, timesteps: int, seed: int) -> list:
    """(recipe, report) for each shipped adapter on the embedded model, scored with its method."""
    import copy

    if model_path is not None or embedded_model_path() is None:  # the adapters fit the embedded model only
        return []
    out = []
    for recipe, folder in shipped_adapters().items():
        tuned = copy.deepcopy(model)  # the loaded base model, not a second read from disk
        load_adapter(tuned, folder)
        out.append((recipe, evaluate.hard_negatives(tuned, examples, method=ADAPTER_METHODS[recipe],
                                                    timesteps=timesteps, seed=seed)))
    return out


def run_demo(out_dir: str = "fastitm-demo", timesteps: int = 10, seed: int = 0, n: int = 48,
             model_path: str | None = None) -> int:

    t_start = time.perf_counter()
    if model_path is None and embedded_model_path() is None:

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
    print("methods: diffusion_itm = Krojer et al. 2023, the caption's denoising error relative to the empty\n"
          "prompt's; diffusion_classifier = Li et al. 2023, the denoising error alone; discffusion = He et al.,\n"
          "LogSumExp-pooled cross-attention logits (fastitm defaults; preset='published' for each paper's code)\n")
    print("2-way choice, true caption vs one hard negative: accuracy (number of choices); chance is 0.50")
    reports = []
    for method in METHODS:
        reports.append(evaluate.hard_negatives(model, examples, method=method, timesteps=timesteps, seed=seed))
    print(_table(reports, data.NEGATIVE_KINDS))
    for r in reports:
        mean = sum(r.correct[k] for k in r.kinds) / max(1, sum(r.total[k] for k in r.kinds))
        if mean < 0.7:
            card = (Path(model.source) / "README.md") if model_path is None else None
            where = f" (see its model card, {card})" if card is not None and card.is_file() else ""
            print(f"note: {r.method} is near chance here ({mean:.2f} over all kinds): the embedded model is tiny and "
                  f"was trained for denoising only{where}")
    tuned = adapter_reports(model, model_path, examples, timesteps, seed)
    if tuned:
        print("\nfine-tuned LoRA adapters shipped with the package (fastitm finetune), same images and plan:")
        base = {r.method: r for r in reports}
        print(_table([x for name, r in tuned for x in (base[r.method], replace(r, method=f"{r.method} +{name}"))],
                     data.NEGATIVE_KINDS))
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
    chosen, correct, truths = [], [], []
    for row in itm.rows[:18]:
        cands = [(row["score"], row["caption"], True)] + [(x["score"], x["caption"], False) for x in row["negatives"]]
        s, cap, ok = max(cands, key=lambda c: c[0])
        chosen.append(cap)
        correct.append(ok)
        truths.append(row["caption"])
    path = save_grid([e.image for e in examples[:18]], chosen, correct, Path(out_dir) / "demo_grid.png", truths)
    print(f"saved {path}: each image with the caption diffusion_itm chose among its true caption and "
          f"negatives (green: right, red: wrong, with the true caption in grey)")
    print(f"done in {time.perf_counter() - t_start:.0f} s")
    return 0
