"""``fastitm demo``: the main job end to end on a model that needs no download.

Until the project ships its trained default model, the demo runs on the random-weight tiny model and
says so: the numbers show the pipeline working, not matching skill.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

COLORS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60), "yellow": (230, 200, 40)}


def draw(shape: str, color: str, size: int = 64):
    """A PIL image of one filled shape on a light background."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (235, 235, 235))
    d = ImageDraw.Draw(img)
    m = size // 5
    box = (m, m, size - m, size - m)
    if shape == "circle":
        d.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        d.rectangle(box, fill=COLORS[color])
    else:
        d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=COLORS[color])
    return img


def save_grid(images, captions, path: Path, cell: int = 96) -> Path:
    """Images side by side with the chosen caption under each."""
    from PIL import Image, ImageDraw

    grid = Image.new("RGB", (cell * len(images), cell + 28), "white")
    d = ImageDraw.Draw(grid)
    for i, (img, cap) in enumerate(zip(images, captions)):
        grid.paste(img.resize((cell, cell)), (i * cell, 0))
        d.text((i * cell + 3, cell + 4), cap[:16], fill="black")
        if len(cap) > 16:
            d.text((i * cell + 3, cell + 15), cap[16:32], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def run_demo(out_dir: str = "fastitm-demo", timesteps: int = 10, seed: int = 0) -> int:
    from . import score
    from .cli import format_table
    from .methods import METHODS
    from .model import embedded_model_path
    from .testing import tiny_model

    if embedded_model_path() is None:
        print("NOTE: this build ships no trained model yet; the demo runs on a RANDOM-WEIGHT tiny model\n"
              "of the Stable Diffusion architecture, so the scores below show the pipeline, not real matching.\n")
        model = tiny_model(seed=0)
    else:  # pragma: no cover - replaced when the embedded model lands
        from . import load_model

        model = load_model()
    pairs = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle")]
    images = [draw(s, c) for c, s in pairs]
    texts = [f"a {c} {s}" for c, s in pairs]
    names = [f"img{i} ({c} {s})" for i, (c, s) in enumerate(pairs)]
    gt = list(range(len(pairs)))
    for method in METHODS:
        t0 = time.perf_counter()
        res = score(images, texts, model=model, method=method, timesteps=timesteps, seed=seed, progress=False)
        dt = time.perf_counter() - t0
        print(f"== {method} {res.options}  ({len(images)}x{len(texts)} pairs, T={len(res.plan)}, {dt:.1f} s)")
        print(format_table(res.matrix, names, texts))
        wino = res.winoground(groups=[((0, 1), (0, 1)), ((2, 3), (2, 3))])
        print(f"text retrieval acc: {res.text_accuracy(gt):.2f}  image retrieval acc: {res.image_accuracy(gt):.2f}  "
              f"winoground text/image/group: {wino['text']:.2f}/{wino['image']:.2f}/{wino['group']:.2f}\n")
        if method == "diffusion_itm":
            chosen = [texts[j] for j in res.text_retrieval(1)[:, 0].tolist()]
    path = save_grid(images, chosen, Path(out_dir) / "demo_grid.png")
    print(f"saved {path} (each image with the caption diffusion_itm chose)")
    return 0
