"""Evaluation on captioned images with hard negatives (the synthetic sets of :mod:`fastitm.data`,
or any examples with ``.image``, ``.caption`` and ``.negatives``).

- :func:`hard_negatives`: for each image, the 2-way choice between its true caption and each hard
  negative (GDBench / Winoground style): accuracy per negative kind.
- :func:`image_retrieval`: in groups of images with their captions, how often a caption's best image
  is its own (DiffusionITM needs the normalized score for this).

Every image is scored under one shared plan (the same timesteps and noise), so differences between
captions are paired comparisons.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..api import score
from ..core.plan import make_plan
from ..core.presets import resolve
from ..engine.common import progress_disabled


@dataclass
class NegativeReport:
    """Per kind: ``correct[kind]`` of ``total[kind]`` choices right; ``rows`` keeps, per image, the
    true caption's score and each negative's (kind, caption, score)."""

    method: str
    options: dict
    correct: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)

    def accuracy(self, kind: str) -> float:
        if not self.total.get(kind):
            raise KeyError(f"no {kind!r} negatives were scored")
        return self.correct[kind] / self.total[kind]

    @property
    def kinds(self) -> list[str]:
        return [k for k in self.total if self.total[k]]


def shared_plan(model, method: str, timesteps: int, seed: int, options: dict):
    """The one plan every example is scored under, built with the plan choices (scheme, latent,
    noise) of ``options`` or of its preset; those keys are taken out of ``options``."""

    given = {k: options.pop(k, None) for k in ("scheme", "latent", "noise")}
    choices, _ = resolve(method, options.get("preset"), given, {})
    return make_plan(model, timesteps, seed=seed, scheme=choices["scheme"], latent=choices["latent"],
                     noise=choices["noise"])


def _check_examples(examples: Sequence[Any]) -> None:
    if len(examples) == 0:
        raise ValueError("no examples to evaluate")
    for n, e in enumerate(examples):
        if not hasattr(e, "image") or not hasattr(e, "caption") or not hasattr(e, "negatives"):
            raise TypeError(f"example {n} needs .image, .caption and .negatives (see fastitm.data.Example)")


def hard_negatives(model, examples: Sequence[Any], *, method: str = "diffusion_itm", kinds: Sequence[str] | None = None,
                   timesteps: int = 10, seed: int = 0, backend: str = "auto", progress: bool | None = None,
                   group: int = 8, **options: Any) -> NegativeReport:
    """Score each image against its true caption and its negatives of ``kinds`` (default: all it
    has); a choice is right when the true caption scores strictly higher than the negative.
    ``group`` images share one scoring call (each only against its own captions)."""
    from tqdm.auto import tqdm

    _check_examples(examples)
    plan = shared_plan(model, method, timesteps, seed, options)
    report = None
    todo = []
    for e in examples:
        negs = [(k, c) for k, c in e.negatives.items() if kinds is None or k in kinds]
        if negs:
            todo.append((e, negs))
    bar = tqdm(total=len(todo), desc=f"{method} hard negatives", unit="image", disable=progress_disabled(progress))
    # Several images per call, each scored against its own captions only (pairs=): the denoiser's
    # batches stay full, and each score is what a call for that image alone gives.
    for start in range(0, len(todo), group):
        chunk = todo[start : start + group]
        texts, cols = [], []
        for e, negs in chunk:
            cols.append(list(range(len(texts), len(texts) + 1 + len(negs))))
            texts += [e.caption] + [c for _, c in negs]
        pairs = torch.zeros(len(chunk), len(texts), dtype=torch.bool)
        for i, c in enumerate(cols):
            pairs[i, c] = True
        res = score([e.image for e, _ in chunk], texts, model=model, method=method, plan=plan, backend=backend,
                    progress=False, pairs=pairs, **options)
        if report is None:
            report = NegativeReport(res.method, dict(res.options))
        for i, (e, negs) in enumerate(chunk):
            s = res.matrix[i, cols[i]].tolist()
            row = {"caption": e.caption, "score": s[0], "negatives": []}
            for (kind, cap), v in zip(negs, s[1:], strict=True):
                report.total[kind] = report.total.get(kind, 0) + 1
                report.correct[kind] = report.correct.get(kind, 0) + int(s[0] > v)
                row["negatives"].append({"kind": kind, "caption": cap, "score": v})
            report.rows.append(row)
        bar.update(len(chunk))
    bar.close()
    if report is None:
        raise ValueError(f"none of the examples has negatives of kinds {list(kinds or [])}")
    return report


def image_retrieval(model, examples: Sequence[Any], *, group: int = 10, method: str = "diffusion_itm",
                    timesteps: int = 10, seed: int = 0, backend: str = "auto", progress: bool | None = None,
                    **options: Any) -> tuple[float, int]:
    """Split the examples into groups of ``group`` with distinct captions, score each group's
    images x captions, and return (share of captions whose best image is their own, captions)."""
    from tqdm.auto import tqdm

    _check_examples(examples)
    if group < 2:
        raise ValueError(f"group must be at least 2, got {group}")
    plan = shared_plan(model, method, timesteps, seed, options)
    groups, current, seen = [], [], set()
    for e in examples:  # distinct captions within a group, so each caption has one right image
        if e.caption in seen:
            continue
        current.append(e)
        seen.add(e.caption)
        if len(current) == group:
            groups.append(current)
            current, seen = [], set()
    if not groups:
        raise ValueError(f"fewer than {group} examples with distinct captions")
    right = total = 0
    for g in tqdm(groups, desc=f"{method} image retrieval", unit="group", disable=progress_disabled(progress)):
        res = score([e.image for e in g], [e.caption for e in g], model=model, method=method, plan=plan,
                    backend=backend, progress=False, **options)
        best = res.matrix.argmax(dim=0)
        right += int((best == torch.arange(len(g))).sum())
        total += len(g)
    return right / total, total
