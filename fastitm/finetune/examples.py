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
        from .. import data as synth

        return [TrainExample(e.image, e.caption, list(e.negatives.values()))
                for e in synth.make_dataset(n, "train", seed=seed, size=size)]
    path = Path(data)
    if path.suffix != ".jsonl":
        raise ValueError(f"--data must be 'synthetic' or a .jsonl file (fastitm eval's format), got {data!r}")
    from ..evaluate.tasks import load_jsonl

    out = []
    for item in load_jsonl(path)[:n]:
        if item.kind == "text":
            out.append(TrainExample(item.images[0], item.texts[item.label],
                                    [t for j, t in enumerate(item.texts) if j != item.label]))
        else:
            out.append(TrainExample(item.images[item.label], item.texts[0], [],
                                    [p for j, p in enumerate(item.images) if j != item.label]))
    if len(out) < 2:
        raise ValueError(f"{path} has {len(out)} item(s); fine-tuning needs at least 2")
    return out
