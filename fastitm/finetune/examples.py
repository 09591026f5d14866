"""Training examples for fine-tuning: an image, its true caption, negative captions and negative images.

Sources: ``"synthetic"`` (``fastitm.data``'s training split, hard negatives of every kind; never the
held-out combinations) or a ``.jsonl`` file in the evaluation format (``fastitm.evaluate.tasks``):
``{"image", "texts", "label"}`` gives the true text and negative texts, ``{"images", "text",
"label"}`` the true image and negative images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import data as synth
from ..evaluate.tasks import load_jsonl


@dataclass
class TrainExample:
    image: Any  # PIL image or path
    caption: str
    neg_texts: list[str] = field(default_factory=list)
    neg_images: list[Any] = field(default_factory=list)


def load_examples(data: str, n: int, seed: int = 0, size: int = 32) -> list[TrainExample]:
    """``n`` examples from ``data`` ("synthetic" or a .jsonl path; for a file, its first n items)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"the number of training examples must be an int >= 2, got {n!r}")
    if data == "synthetic":

        return [TrainExample(e.image, e.caption, list(e.negatives.values()))
                for e in synth.make_dataset(n, "train", seed=seed, size=size)]
    path = Path(data)
    if path.suffix != ".jsonl":
        raise ValueError(f"--data must be 'synthetic' or a .jsonl file (fastitm eval's format), got {data!r}")

    out = item_examples(load_jsonl(path)[:n])
    if len(out) < 2:
        raise ValueError(f"{path} has {len(out)} item(s); fine-tuning needs at least 2")
    return out


def item_examples(items) -> list[TrainExample]:
    """Evaluation items (:class:`fastitm.evaluate.items.Item`) as training examples: a text choice gives
    its true text and negative texts, an image choice its true image and negative images (a path, or
    the first existing of alternative paths)."""

    def first_existing(ref):  # a tuple names alternative layouts: the one on disk (else the first, named on load)
        return next((p for p in ref if Path(p).is_file()), ref[0]) if isinstance(ref, tuple) else ref

    out = []
    for item in items:
        if item.kind == "text":
            out.append(TrainExample(first_existing(item.images[0]), item.texts[item.label],
                                    [t for j, t in enumerate(item.texts) if j != item.label]))
        elif item.kind == "image":
            out.append(TrainExample(first_existing(item.images[item.label]), item.texts[0], [],
                                    [first_existing(p) for j, p in enumerate(item.images) if j != item.label]))
        else:
            raise ValueError(f"item {item.id}: a {item.kind} item has no single true pair to train on")
    return out
