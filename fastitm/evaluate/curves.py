"""What one run's per-timestep scores say beyond its metrics, computed from them alone (no model):
the accuracy-vs-timesteps curve, each timestep alone, racing replayed on them, and what an item's
record keeps of its scores. Used by the runner when it scores and by the report when it reweights."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..core.methods import spread_order
from ..core.weights import weighted_mean
from ..engine.racing import RaceOptions, simulate
from .items import Item
from .metrics import choice_scores, headline, rank_of_truth, task_metrics


def record_scores(item: Item, matrix: torch.Tensor) -> Any:
    """What an item's record keeps of its score matrix: the candidates' scores in order (Winoground:
    the 2x2 matrix [image][text]); JSON-able (a dropped candidate's -inf as null)."""
    cands = matrix.tolist() if item.kind == "group" else (matrix[0] if item.kind == "text" else matrix[:, 0]).tolist()
    return jsonable(cands)


def curve(items: list[Item], per_t: list[torch.Tensor], w: torch.Tensor | None = None) -> list[dict]:
    """The headline metrics using the first n timesteps of :func:`fastitm.core.methods.spread_order`, for
    every n from 1 to T, from the per-timestep scores of one run (weighted by ``w`` [T] if given)."""

    T = per_t[0].shape[-1]
    order = spread_order(T)
    rows = []
    for n in range(1, T + 1):
        ks = order[:n]
        mats = [weighted_mean(p[:, :, ks], None if w is None else w[ks]) for p in per_t]
        rows.append({"timesteps": n, "metrics": headline(task_metrics(items, mats))})
    return rows


def per_timestep_diagnostics(items: list[Item], per_t: list[torch.Tensor], timesteps: list[int]) -> list[dict]:
    """Where the signal is: for each timestep of the plan (in plan order), the headline metrics from
    that timestep alone and, over the choice items, the mean margin (the true candidate's score minus
    the best other's; positive: right) and the share of items it decides rightly."""
    rows = []
    choice = [(i, p) for i, p in zip(items, per_t, strict=True) if i.kind in ("text", "image") and i.label is not None]
    for k, t in enumerate(timesteps):
        row: dict = {"timestep": int(t), "metrics": headline(task_metrics(items, [p[:, :, k] for p in per_t]))}
        if choice:
            margins = []
            for item, p in choice:
                s = choice_scores(item, p[:, :, k]).double()
                others = torch.cat([s[: item.label], s[item.label + 1 :]])
                margins.append((s[item.label] - others.max()).item())
            row["margin"] = sum(margins) / len(margins)
        rows.append(row)
    return rows


# 0.001 all but keeps the full plan's answers (settled follows alpha): the conservative end of the curve
RACING_ALPHAS = (0.001, 0.01, 0.05, 0.2)


def racing_curve(items: list[Item], per_t: list[torch.Tensor], alphas=RACING_ALPHAS,
                 w: torch.Tensor | None = None) -> list[dict]:
    """What racing (:mod:`fastitm.engine.racing`, default options but ``alpha``, which ``settled``
    follows) would have decided and spent on this run's per-timestep scores: per alpha, the accuracy
    (the true candidate survives with the highest mean, strictly), the conditional denoiser rows per item
    (candidate x timestep) and the share of items that ran to the plan's end; first the full plan's own.
    Choice items only."""

    choice = [(i, p[0] if i.kind == "text" else p[:, 0]) for i, p in zip(items, per_t, strict=True)
              if i.kind in ("text", "image") and i.label is not None]
    if not choice:
        return []
    T = choice[0][1].shape[1]

    def right(item: Item, means: torch.Tensor, live: torch.Tensor) -> bool:
        """The metrics' rule among the survivors: no other survivor (or class with one) scores at least
        as high; a dropped candidate counts as -inf, as in the engine's result."""
        s = torch.where(live, means, float("-inf"))
        return rank_of_truth(choice_scores(item, s[None] if item.kind == "text" else s[:, None]), item.label)[0] == 0

    rows = [{"alpha": None, "accuracy": sum(right(i, weighted_mean(s.double(), w), torch.ones(len(s), dtype=torch.bool))
                                            for i, s in choice) / len(choice),
             "rows_per_item": sum(s.numel() for _, s in choice) / len(choice), "plan_end": 1.0}]
    for a in alphas:
        races = [(i, simulate(s, RaceOptions(alpha=a), w=w)) for i, s in choice]
        rows.append({"alpha": a, "accuracy": sum(right(i, r.means, r.live) for i, r in races) / len(races),
                     "rows_per_item": sum(r.rows for _, r in races) / len(races),
                     "plan_end": sum(r.stopped == T for _, r in races) / len(races)})
    return rows


def jsonable(x: Any) -> Any:
    """Nested scores for JSON: -inf (eliminated) and NaN as null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    return x
