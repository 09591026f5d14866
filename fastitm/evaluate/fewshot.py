"""Discffusion's few-shot protocol (He et al.): prompt-learn on a small fraction of a dataset, evaluate on
the rest, in two commands: ``fastitm finetune --recipe discffusion --task TASK --data DIR --fewshot 0.05
--out adapter/`` trains on :func:`fewshot`'s ``train`` items, and ``fastitm eval TASK --data DIR --lora
adapter/ --fewshot 0.05`` scores exactly its ``test`` items. Both record the split."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .items import DataError, Item
from .tasks import load_task
from .tasks_discffusion import comvg_train, published_refcocog, published_train_items, refcocog_root, vqa_train


@dataclass
class FewShot:
    """A task's few-shot split: ``train`` items (what ``fastitm finetune --fewshot`` learns from) and
    ``test`` items (what ``fastitm eval --fewshot`` scores), never sharing an item; ``record``: how the
    split was made (reports and adapter cards keep it)."""

    train: list[Item]
    test: list[Item]
    record: dict = field(default_factory=dict)


def check_fraction(fraction: float) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"--fewshot must be a fraction in (0, 1), e.g. 0.05, got {fraction!r}")
    return float(fraction)


def fewshot(task: str, data_dir: str | Path, fraction: float, split: str | None = None,
            preset: str | None = None) -> FewShot:
    """Discffusion's protocol: train on ``fraction`` of a dataset, evaluate on the rest.

    ComVG and VQA train on a separate file (``comvg_train.csv``, ``vqa_text_train.csv``: its first
    ``fraction`` of rows in file order, as ``dsd_train.py`` reads them) and test on the whole test file.
    RefCOCOg and every other task split one item list: the first ``fraction`` of its items in file
    order train, the rest test (RefCOCOg's published list: the first ``int(fraction x pairs)`` pairs,
    rounded down to whole items)."""
    fraction = check_fraction(fraction)
    root = Path(data_dir)
    record = {"fewshot": fraction, "task": task, "split": split}
    if task == "comvg":
        train, test = comvg_train(root, fraction), load_task(task, data_dir, split, preset=preset)
        record["train_from"] = "comvg_train.csv"
    elif task == "vqa":
        train, test = vqa_train(root, fraction), load_task(task, data_dir, split, preset=preset)
        record["train_from"] = "vqa_text_train.csv"
    elif task == "refcocog" and preset == "published":
        every = published_refcocog(refcocog_root(root))
        n = published_train_items(len(every), fraction)
        train, test = every[:n], every[n:]
        record["train_from"] = "the first items of the published pooled list"
    else:
        every = load_task(task, data_dir, split, preset=preset)
        n = int(len(every) * fraction)
        train, test = every[:n], every[n:]
        record["train_from"] = "the first items in file order"
    if not train:
        raise DataError(f"{task}: a {fraction:g} few-shot split of {data_dir} has no training item")
    record.update(train_items=len(train), test_items=len(test))
    return FewShot(train, test, record)
