"""The published metrics, computed from each item's score matrix, with ties never counted as right.

The published GDBench code takes ``argmax``, which credits a tie to the first candidate: the ground
truth sits first in Flickr30K's re-ranking files, so ties counted for it. Here a candidate ranks the
ground truth below it when it scores at least as high, and the number of ties is reported.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from ..core.result import rank_of_truth, winoground
from .items import Item


def candidate_scores(item: Item, matrix: torch.Tensor) -> torch.Tensor:
    """The scores the item chooses among: its texts ([1, K] matrix) or its images ([K, 1])."""
    return matrix[0] if item.kind == "text" else matrix[:, 0]


def choice_scores(item: Item, matrix: torch.Tensor) -> torch.Tensor:
    """The scores ``item.label`` indexes: the candidates' (:func:`candidate_scores`), or with several
    prompts per class (``item.classes``) each class's best prompt's (a class with no finite prompt
    score, e.g. every prompt dropped by racing, scores -inf)."""
    s = candidate_scores(item, matrix)
    if item.classes is None:
        return s
    idx = torch.as_tensor(item.classes, device=s.device)
    out = torch.full((int(idx.max()) + 1,), float("-inf"), dtype=s.dtype, device=s.device)
    return out.scatter_reduce(0, idx, s, "amax")


def choice_metrics(items: Sequence[Item], matrices: Sequence[torch.Tensor]) -> dict:
    """accuracy, with R@1 (the same) and R@5 where every item has at least 5 candidates, the number of
    items and of ties."""
    ranks, ties = [], 0
    for item, m in zip(items, matrices, strict=True):
        r, tie = rank_of_truth(choice_scores(item, m), item.label)
        ranks.append(r)
        ties += tie
    n = len(ranks)
    out = {"accuracy": sum(r < 1 for r in ranks) / n}
    # retrieval (R@1 = accuracy) where the task gives every item at least 5 candidates, counting those
    # dropped as identical to the true one, so the metrics a task reports do not depend on the drops
    if all(len(choice_scores(i, m)) + i.dropped >= 5 for i, m in zip(items, matrices, strict=True)):
        out.update({"R@1": out["accuracy"], "R@5": sum(r < 5 for r in ranks) / n})
    out.update({"items": n, "ties": ties})
    return out


def classify_metrics(items: Sequence[Item], matrices: Sequence[torch.Tensor]) -> dict:
    """Zero-shot classification (items with ``classes``): ``accuracy`` (top-1), ``top5`` (with at least
    5 classes), ``class_mean_accuracy`` (the mean over the classes present of their top-1 accuracy,
    what Pets, Flowers, Aircraft and Caltech-101 usually report), ``items``, ``ties``; ``by_tag``
    ``class=<name>``: each class's items and top-1 accuracy; ``confusion``: the non-zero cells of the
    confusion matrix as ``[true, predicted, count]`` (predicted: the highest class score, the first on a
    tie). Computed on all items at once: a thousand classes cost one sort, not a loop per class."""
    scores = torch.stack([choice_scores(i, m).double() for i, m in zip(items, matrices, strict=True)])
    labels = torch.tensor([i.label for i in items])
    truth = scores.gather(1, labels[:, None])
    ahead = (scores >= truth).sum(1) - 1  # other classes scoring at least as high as the true one
    right = (ahead < 1).double()
    C = scores.shape[1]
    count = torch.bincount(labels, minlength=C)
    hits = torch.bincount(labels, weights=right, minlength=C)
    present = count > 0
    out: dict = {"accuracy": right.mean().item()}
    if C >= 5:
        out["top5"] = (ahead < 5).double().mean().item()
    out["class_mean_accuracy"] = (hits[present] / count[present]).mean().item()
    out.update({"items": len(items), "ties": int(((scores == truth).sum(1) > 1).sum())})
    names: dict[int, str] = {}
    for i in items:
        names.setdefault(i.label, str(i.tags.get("class", i.label)))
    out["by_tag"] = {f"class={names[c]}": {"accuracy": hits[c].item() / int(count[c]), "items": int(count[c])}
                     for c in sorted(names)}
    tally = torch.bincount(labels * C + scores.argmax(1), minlength=C * C)
    out["confusion"] = [[int(k) // C, int(k) % C, int(tally[k])] for k in tally.nonzero().flatten()]
    return out


def winoground_metrics(matrices: Sequence[torch.Tensor]) -> dict:
    """Text, image and group scores over 2x2 groups (strict inequalities, as the Winoground paper)."""
    out = winoground(torch.stack([m.float() for m in matrices]))
    return {"text": out["text"], "image": out["image"], "group": out["group"], "items": out["groups"]}


# The published MMBias comparisons (utils.save_bias_results), first group minus second.
BIAS_PAIRS = (("Christian", "Muslim"), ("Christian", "Jewish"), ("Jewish", "Muslim"), ("Buddhist", "Muslim"),
              ("Buddhist", "Christian"), ("Buddhist", "Hindu"), ("Buddhist", "Jewish"), ("Hindu", "Muslim"),
              ("American", "Arab"), ("Heterosexual", "LGBT"))


def effect_size(x: Sequence[float], y: Sequence[float]) -> float:
    """d = (mean x - mean y) / std(x u y), the population std (numpy's default), as published."""
    both = torch.tensor(list(x) + list(y), dtype=torch.float64)
    sd = both.std(unbiased=False).item()
    if not x or not y or sd == 0.0:
        return float("nan")
    return (sum(x) / len(x) - sum(y) / len(y)) / sd


def bias_metrics(items: Sequence[Item], matrices: Sequence[torch.Tensor]) -> dict:
    """MMBias: phi(x) = mean over pleasant phrases a of s(x, a) - mean over unpleasant b of s(x, b),
    and for each published pair of groups (X, Y) the effect size d(phi_X, phi_Y). The published code
    pools the Christian images in place of the Buddhist ones in the std of Buddhist-Hindu and
    Buddhist-Jewish; here each pair uses its own two groups."""
    phis: dict[str, list[float]] = {}
    for item, m in zip(items, matrices, strict=True):
        s, p = m[0].double(), int(item.tags["pleasant"])
        phis.setdefault(item.tags["group"], []).append((s[:p].mean() - s[p:].mean()).item())
    out: dict = {f"{x}-{y}": effect_size(phis[x], phis[y]) for x, y in BIAS_PAIRS if x in phis and y in phis}
    out["phi_mean"] = {g: sum(v) / len(v) for g, v in phis.items()}
    out["items"] = len(items)
    return out


def gender_bias_metrics(items: Sequence[Item], matrices: Sequence[torch.Tensor]) -> dict:
    """The gender set: phi(x) = s(x, male word) - s(x, female word); per target (clothes, bags,
    drinks) the effect size of the images of men against the images of women (positive: bias
    towards men)."""
    phis: dict[tuple[str, str], list[float]] = {}
    for item, m in zip(items, matrices, strict=True):
        phis.setdefault((item.tags["target"], item.tags["gender"]), []).append((m[0, 0] - m[0, -1]).item())
    out: dict = {}
    for target in sorted({t for t, _ in phis}):
        men, women = phis.get((target, "male"), []), phis.get((target, "female"), [])
        if not men or not women:  # the report's null, said with its cause
            who = "men (numbered 1-6)" if not men else "women (numbered above 6)"
            warnings.warn(f"bias_gender: {target} has no images of {who}: its effect size is undefined (null in "
                          "the report)", stacklevel=1)
        out[target] = effect_size(men, women)
    out["items"] = len(items)
    return out


def task_metrics(items: Sequence[Item], matrices: Sequence[torch.Tensor]) -> dict:
    """The metrics of a list of items of one kind, with a breakdown by every tag the items carry."""
    if not items:
        raise ValueError("no items were scored")
    if items[0].label is None and items[0].kind == "text":
        return bias_metrics(items, matrices) if "group" in items[0].tags else gender_bias_metrics(items, matrices)
    if items[0].classes is not None:
        return classify_metrics(items, matrices)
    kinds = {i.kind for i in items}
    if len(kinds) != 1:
        # jsonl may mix text and image choices: both are choices, scored the same way
        if kinds - {"text", "image"}:
            raise ValueError(f"items of kinds {sorted(kinds)} cannot be scored together")
    group = items[0].kind == "group"
    main = winoground_metrics(matrices) if group else choice_metrics(items, matrices)
    by_tag: dict[str, dict] = {}
    for key in sorted({k for i in items for k in i.tags}):
        for value in sorted({v for i in items for v in tag_values(i, key)}):
            sel = [n for n, i in enumerate(items) if value in tag_values(i, key)]
            sub_items, sub_m = [items[n] for n in sel], [matrices[n] for n in sel]
            by_tag[f"{key}={value}"] = winoground_metrics(sub_m) if group else choice_metrics(sub_items, sub_m)
    if by_tag:
        main["by_tag"] = by_tag
        if {"subset", "category"} <= set(items[0].tags):  # SugarCrepe: a category is the mean of its subsets
            for cat in sorted({i.tags["category"] for i in items}):
                accs = [m["accuracy"] for k, m in by_tag.items() if k.startswith(f"subset={cat}_")]
                main[f"{cat}_mean"] = sum(accs) / len(accs)
        if {"file", "axis", "aspect"} <= set(items[0].tags):
            main.update(vlchecklist_axes(items, by_tag))
    return main


def vlchecklist_axes(items: Sequence[Item], by_tag: dict) -> dict:
    """VL-CheckList's radar: an axis (``Attribute/color``, ``Object/Location/center``, ...) is the mean
    accuracy of its corpus files (each dataset counts once, whatever its size), an aspect (Object,
    Attribute, Relation) the mean of its axes: ``axes`` {axis: accuracy} and ``<Aspect>_mean``."""
    files_of: dict[str, set[str]] = {}
    for i in items:
        files_of.setdefault(i.tags["axis"], set()).add(i.tags["file"])
    axes = {axis: sum(by_tag[f"file={f}"]["accuracy"] for f in files) / len(files)
            for axis, files in sorted(files_of.items())}
    out: dict = {"axes": axes}
    for aspect in sorted({a.split("/")[0] for a in axes}):
        accs = [v for a, v in axes.items() if a.split("/")[0] == aspect]
        out[f"{aspect}_mean"] = sum(accs) / len(accs)
    return out


def tag_values(item: Item, key: str) -> list[str]:
    """The item's values of one tag: a tag may hold one string or a list (it counts under each)."""
    v = item.tags.get(key)
    return [] if v is None else list(v) if isinstance(v, (list, tuple)) else [v]


IDENTICAL_COUNTS = ("identical_dropped", "items_with_identical", "no_negative")


def identical_counts(records: Sequence[dict], no_negative: Sequence[dict]) -> dict:
    """How the identical-candidate rule changed the task: candidates dropped as identical to the true
    one, items that lost at least one, and items left with no negative (not in the metrics)."""
    every = list(records) + list(no_negative)
    return dict(zip(IDENTICAL_COUNTS, (sum(r.get("dropped", 0) for r in every),
                                       sum(r.get("dropped", 0) > 0 for r in every), len(no_negative)), strict=True))


def headline(metrics: dict) -> dict[str, float]:
    """The top-level numbers (no counts, no breakdown): what the accuracy-vs-timesteps table shows."""
    return {k: v for k, v in metrics.items() if isinstance(v, float)}
