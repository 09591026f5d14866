"""The published metrics, computed from each item's score matrix, with ties never counted as right.

The published GDBench code takes ``argmax``, which credits a tie to the first candidate: the ground
truth sits first in Flickr30K's re-ranking files, so ties counted for it. Here a candidate ranks the
ground truth below it when it scores at least as high, and the number of ties is reported.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .tasks import Item


def candidate_scores(item: Item, matrix: torch.Tensor) -> torch.Tensor:
    """The scores the item chooses among: its texts ([1, K] matrix) or its images ([K, 1])."""
    return matrix[0] if item.kind == "text" else matrix[:, 0]


def rank_of_truth(scores: torch.Tensor, label: int) -> tuple[int, bool]:
    """(how many other candidates score at least as high as the true one, whether any ties it)."""
    others = torch.cat([scores[:label], scores[label + 1 :]])
    return int((others >= scores[label]).sum()), bool((others == scores[label]).any())


def choice_metrics(items: Sequence[Item], matrices: Sequence[torch.Tensor]) -> dict:
    """accuracy, with R@1 (the same) and R@5 where every item has at least 5 candidates, the number of
    items and of ties."""
    ranks, ties = [], 0
    for item, m in zip(items, matrices):
        r, tie = rank_of_truth(candidate_scores(item, m), item.label)
        ranks.append(r)
        ties += tie
    n = len(ranks)
    out = {"accuracy": sum(r < 1 for r in ranks) / n}
    if all(len(candidate_scores(i, m)) >= 5 for i, m in zip(items, matrices)):  # retrieval: R@1 = accuracy
        out.update({"R@1": out["accuracy"], "R@5": sum(r < 5 for r in ranks) / n})
    out.update({"items": n, "ties": ties})
    return out


def winoground_metrics(matrices: Sequence[torch.Tensor]) -> dict:
    """Text, image and group scores over 2x2 groups (strict inequalities, as the Winoground paper)."""
    from ..result import winoground

    out = winoground(torch.stack([m.float() for m in matrices]))
    return {"text": out["text"], "image": out["image"], "group": out["group"], "items": out["groups"]}


def task_metrics(items: Sequence[Item], matrices: Sequence[torch.Tensor]) -> dict:
    """The metrics of a list of items of one kind, with a breakdown by every tag the items carry."""
    if not items:
        raise ValueError("no items were scored")
    kinds = {i.kind for i in items}
    if len(kinds) != 1:
        # jsonl may mix text and image choices: both are choices, scored the same way
        if kinds - {"text", "image"}:
            raise ValueError(f"items of kinds {sorted(kinds)} cannot be scored together")
    group = items[0].kind == "group"
    main = winoground_metrics(matrices) if group else choice_metrics(items, matrices)
    by_tag: dict[str, dict] = {}
    for key in sorted({k for i in items for k in i.tags}):
        for value in sorted({i.tags[key] for i in items if key in i.tags}):
            sel = [n for n, i in enumerate(items) if i.tags.get(key) == value]
            sub_items, sub_m = [items[n] for n in sel], [matrices[n] for n in sel]
            by_tag[f"{key}={value}"] = winoground_metrics(sub_m) if group else choice_metrics(sub_items, sub_m)
    if by_tag:
        main["by_tag"] = by_tag
    return main


def headline(metrics: dict) -> dict[str, float]:
    """The top-level numbers (no counts, no breakdown): what the accuracy-vs-timesteps table shows."""
    return {k: v for k, v in metrics.items() if k not in ("items", "ties", "by_tag") and isinstance(v, float)}
