"""Timestep weights fitted from a few labelled items of a task (``fastitm calibrate``).

The per-timestep scores of one run are enough: a weighting changes only how they average
(:mod:`fastitm.core.weights`), so every candidate weighting is tried on stored scores and the denoiser runs
once. What is fitted, and how it is judged:

- candidates: ``uniform`` (today's average); Clark & Jaini's family ``exp(-rate t / T_train)`` over a
  grid of rates (:data:`EXP_RATES`); a free weight per timestep from a regularised logistic model
  (:func:`fit_logistic`) at a few penalty strengths (:data:`PENALTIES`);
- the logistic model: for every comparison the task's metric makes (the true candidate against each
  other one; a Winoground group's four), ``d_k`` is the true candidate's score minus the other's at
  timestep k, and P(right) = sigmoid(sum_k w_k d_k), with ``w >= 0`` (a weighted mean: the decision
  is sum_k w_k d_k > 0, so no intercept) and an L2 penalty pulling the weights towards uniform ones,
  measured on the standardised differences (each timestep's divided by their root mean square, so a
  timestep's scale does not decide its penalty);
- the choice: by ``folds``-fold cross-validation over items (every comparison of an item in the same
  fold), uniform weights unless a candidate's held-out gain over them is significant (a one-sided
  paired test over items at level :data:`ALPHA`, Bonferroni-corrected for the candidates tried:
  :func:`beats_uniform`); among those that are, the simplest whose held-out task metric is within
  one standard error of the best one's (exp, then logistic from the strongest penalty): weights
  move away from uniform only where the data supports it beyond the noise of a few items;
- the figure reported: nested cross-validation (the choice and the fit redone inside each outer
  training part, judged on its held-out fold), so "after" is what the whole procedure gives on
  items it did not see, beside "before" (uniform) on the same items. The written weights are the
  choice refitted on all the items scored.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..core.weights import resolve, weighted_mean
from .items import Item
from .metrics import headline, task_metrics
from .runner import run

EXP_RATES = (1.0, -1.0, 2.0, -2.0, 4.0, -4.0, 7.0, 10.0, 15.0)  # nearest uniform first
PENALTIES = (100.0, 10.0, 1.0, 0.1, 0.01)  # strongest (nearest uniform) first: the simpler fit
MIN_ITEMS = 10
ALPHA = 0.05  # non-uniform weights need a held-out gain over uniform significant at this level (Bonferroni)


@dataclass
class Calibration:
    """``weights``: {timestep: weight} (mean 1) for every timestep of the plan; ``fitted``: which
    candidate was chosen (``kind``: uniform, exp or logistic, with its ``rate`` or ``penalty``);
    ``before`` / ``after``: the task's metrics on held-out folds (nested cross-validation) with
    uniform weights and with the procedure's weights; ``cv``: every candidate's cross-validated
    metric on all the items (``score``) and whether its gain over uniform is significant
    (``beats_uniform``); ``items``: how many were scored (their ids in ``item_ids``)."""

    weights: dict[int, float]
    fitted: dict
    before: dict
    after: dict
    cv: list[dict]
    items: int
    item_ids: list[str] = field(default_factory=list)
    task: str = ""
    data: str = ""
    plan: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    metric: str = "accuracy"

    def to_json(self) -> dict:

        return {"weights": {str(t): w for t, w in self.weights.items()},
                "fitted": {**self.fitted, "metric": self.metric, "items": self.items, "task": self.task,
                           "data": self.data, "plan": self.plan, "model": self.model, "fastitm": __version__},
                "before": self.before, "after": self.after, "cv": self.cv, "item_ids": self.item_ids}

    def save(self, path: str | Path) -> Path:
        """Write the weights file ``--weights FILE`` / ``weights=FILE`` reads (JSON, the table under
        ``"weights"``, how it was fitted beside it)."""
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2, allow_nan=False))
        return path

    def to_markdown(self) -> str:
        m = self.metric
        lines = [f"# fastitm calibrate: {self.task}", "",
                 f"{self.items} items scored at {len(self.weights)} timesteps; chosen: {describe_fit(self.fitted)}",
                 "", f"Held-out {m} (nested {self.fitted['folds']}-fold cross-validation: each fold judged with "
                     "weights chosen and fitted without it):", "",
                 "| | before (uniform) | after |", "|---|---|---|",
                 f"| {m} | {self.before[m]:.4f} | {self.after[m]:.4f} |"]
        for tag in self.before.get("by_tag", {}):
            b, a = self.before["by_tag"][tag], self.after["by_tag"][tag]
            lines.append(f"| {tag} ({b['items']} items) | {b[m]:.4f} | {a[m]:.4f} |")
        lines += ["", "Cross-validated on all the items, per candidate (significant: its gain over uniform, at level "
                      f"{ALPHA:g} corrected for {len(self.cv) - 1} candidates):", "",
                  f"| weights | {m} | significant |", "|---|---|---|"]
        lines += [f"| {describe_fit(c)} | {c['score']:.4f} | {'yes' if c.get('beats_uniform') else '-'} |"
                  for c in self.cv]
        lines += ["", "| timestep | weight |", "|---|---|"]
        lines += [f"| {t} | {w:.4g} |" for t, w in self.weights.items()]
        return "\n".join(lines) + "\n"


def describe_fit(fit: dict) -> str:
    if fit["kind"] == "exp":
        return f"exp, rate {fit['rate']:g}"
    if fit["kind"] == "logistic":
        return f"logistic, penalty {fit['penalty']:g}"
    return "uniform"


def comparisons(items: Sequence[Item], per_t: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The comparisons the task's metric makes, as per-timestep score differences: ([P, T] float64, the
    right candidate's score minus the other's; [P] the item of each). Choice items: the true candidate
    against each other one; Winoground groups: both texts of each image and both images of each text.
    Raises for items without a right answer (the bias tasks)."""
    diffs, owner = [], []
    for n, (item, p) in enumerate(zip(items, per_t, strict=True)):
        p = p.double()
        if item.kind == "group":
            pairs = [((0, 0), (0, 1)), ((1, 1), (1, 0)), ((0, 0), (1, 0)), ((1, 1), (0, 1))]
            rows = [p[a] - p[b] for a, b in pairs]
        elif item.label is not None:
            s = p[0] if item.kind == "text" else p[:, 0]
            rows = [s[item.label] - s[c] for c in range(s.shape[0]) if c != item.label]
        else:
            raise ValueError(f"item {item.id} has no right answer (a bias task): calibration needs labelled items")
        diffs += rows
        owner += [n] * len(rows)
    return torch.stack(diffs), torch.tensor(owner)


def fit_logistic(diffs: torch.Tensor, penalty: float) -> torch.Tensor:
    """Non-negative per-timestep weights [T] (float64, mean 1) maximising the penalised likelihood of
    P(right) = sigmoid(sum_k w_k d_k) over the comparisons ``diffs`` [P, T] (see the module's notes).

    In the standardised differences z_k = d_k / s_k (s_k: their root mean square) the weights are
    v_k = w_k s_k, and the penalty ``penalty`` / 2 ||v - a s||^2 pulls them towards uniform weights
    (w_k = a, the scale a fitted freely): a large penalty gives the uniform mean, a small one the free
    fit, and cross-validation picks between them."""
    import numpy as np
    from scipy.optimize import minimize
    from scipy.special import expit

    d = diffs.double()
    scale = d.pow(2).mean(0).sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    z = (d / scale).numpy()
    s = scale.numpy()
    P, T = z.shape

    def loss(x):
        v, a = x[:T], x[T]
        m = z @ v
        r = v - a * s
        # mean log(1 + exp(-m)) (logaddexp: no overflow); d/dm = -sigmoid(-m)
        value = np.logaddexp(0.0, -m).mean() + 0.5 * penalty * (r @ r)
        grad_v = z.T @ -expit(-m) / P + penalty * r
        return value, np.concatenate([grad_v, [-penalty * (r @ s)]])

    a0 = 1.0 / float(s.sum())
    res = minimize(loss, x0=np.concatenate([a0 * s, [a0]]), jac=True, method="L-BFGS-B",
                   bounds=[(0.0, None)] * (T + 1))
    w = torch.from_numpy(res.x[:T]).clamp_min(0) / scale
    if not w.sum() > 0:
        return torch.ones(T, dtype=torch.float64)
    return w / w.mean()


def candidate_weights(fit: dict, diffs: torch.Tensor, timesteps: list[int], num_train: int) -> torch.Tensor | None:
    """The weights [T] of one candidate (None: uniform); logistic ones fitted on ``diffs``."""
    if fit["kind"] == "uniform":
        return None
    if fit["kind"] == "exp":
        return resolve({"kind": "exp", "rate": fit["rate"]}, timesteps, num_train)
    return fit_logistic(diffs, fit["penalty"])


CANDIDATES = ([{"kind": "uniform"}] + [{"kind": "exp", "rate": r} for r in EXP_RATES]
              + [{"kind": "logistic", "penalty": lam} for lam in PENALTIES])


def objective(metrics: dict) -> str:
    """The metric a fit maximises: accuracy for choice tasks, the group score for Winoground."""
    return "accuracy" if "accuracy" in metrics else "group"


class _Folds:
    """Items split into ``k`` folds, deterministic from ``seed``."""

    def __init__(self, n: int, k: int, seed: int):
        order = list(range(n))
        random.Random(seed).shuffle(order)
        self.fold = [0] * n
        for pos, i in enumerate(order):
            self.fold[i] = pos % k
        self.k = k

    def split(self, f: int, among: Sequence[int]) -> tuple[list[int], list[int]]:
        return [i for i in among if self.fold[i] != f], [i for i in among if self.fold[i] == f]


class _Data:
    """Items, per-timestep scores and comparisons, with the metric of any subset under any weights."""

    def __init__(self, items, per_t, timesteps, num_train):
        self.items, self.per_t, self.timesteps, self.num_train = list(items), list(per_t), timesteps, num_train
        self.diffs, self.owner = comparisons(self.items, self.per_t)
        self.metric = objective(task_metrics(self.items[:1], [self.per_t[0].mean(-1)]))

    def rows_of(self, idx: Sequence[int]) -> torch.Tensor:
        mask = torch.zeros(len(self.items), dtype=torch.bool)
        mask[list(idx)] = True
        return self.diffs[mask[self.owner]]

    def matrices(self, idx: Sequence[int], w: torch.Tensor | None) -> list[torch.Tensor]:
        return [weighted_mean(self.per_t[i], w) for i in idx]

    def weights(self, fit: dict, train: Sequence[int]) -> torch.Tensor | None:
        return candidate_weights(fit, self.rows_of(train), self.timesteps, self.num_train)

    def cross_validate(self, among: Sequence[int], folds: _Folds) -> list[dict]:
        """Each candidate's metric pooled over the held-out folds of ``among`` (every item judged once,
        by weights fitted without its fold), and ``right``: per item of ``among`` whether it was right
        (the per-item metric), for the standard error of a difference."""
        out = []
        for fit in CANDIDATES:
            held: list[int] = []
            mats: list[torch.Tensor] = []
            for f in range(folds.k):
                train, test = folds.split(f, among)
                if not train or not test:
                    continue
                w = self.weights(fit, train)
                held += test
                mats += self.matrices(test, w)
            items = [self.items[i] for i in held]
            value = headline(task_metrics(items, mats))[self.metric]
            right = [headline(task_metrics([i], [m]))[self.metric] for i, m in zip(items, mats, strict=True)]
            out.append({**fit, "score": value, "right": right})
        return out

    def choose(self, among: Sequence[int], folds: _Folds) -> tuple[dict, list[dict]]:
        """Uniform weights unless some candidate beats them on the held-out folds by more than the noise
        (:func:`beats_uniform`); among those that do, the simplest (CANDIDATES' order) within one
        standard error of the best one's cross-validated metric (the standard error of the paired
        per-item difference): a free fit must beat the simpler weights by more than the noise of a few
        items."""
        cv = self.cross_validate(among, folds)
        uniform = cv[0]
        for c in cv:
            c["beats_uniform"] = c is not uniform and beats_uniform(c["right"], uniform["right"], len(cv) - 1)
        passing = [uniform] + [c for c in cv if c["beats_uniform"]]
        best = max(passing, key=lambda c: c["score"])
        chosen = best
        for c in passing:
            if c["score"] >= best["score"] - _paired(best["right"], c["right"])[1]:
                chosen = c
                break
        return ({k: v for k, v in chosen.items() if k not in ("score", "right", "beats_uniform")},
                [{k: v for k, v in c.items() if k != "right"} for c in cv])


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """The mean of the per-item differences a - b and its standard error."""
    diff = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    return float(diff.mean()), float(diff.std()) / math.sqrt(len(diff)) if len(diff) > 1 else 0.0


def beats_uniform(right: Sequence[float], uniform: Sequence[float], tried: int, alpha: float = ALPHA) -> bool:
    """Whether a weighting's held-out per-item results ``right`` beat uniform weights' on the same items:
    a one-sided paired z-test of the mean difference at level ``alpha``, Bonferroni-corrected for the
    ``tried`` weightings compared with uniform. Why: with many candidates the best cross-validated one
    beats uniform by luck alone on a small labelled part (a method near chance moved a few held-out
    items either way), and a user should only get non-uniform weights when the data shows they help."""
    from statistics import NormalDist

    mean, se = _paired(right, uniform)
    return mean > 0 and mean > NormalDist().inv_cdf(1 - alpha / max(1, tried)) * se


def check_size(n: int, folds: int, got: str) -> None:
    """Refuse fewer folds than 2, or fewer items than :data:`MIN_ITEMS` and two per fold; ``got`` says
    how many there are, and where from."""
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    need = max(MIN_ITEMS, 2 * folds)
    if n < need:
        raise ValueError(f"calibration needs at least {need} labelled items ({folds} folds), {got}; score more "
                         "items (--fraction / --limit) or use fewer --folds")


def fit_weights(items: Sequence[Item], per_t: Sequence[torch.Tensor], timesteps: list[int], *, num_train: int = 1000,
                folds: int = 5, seed: int = 0) -> Calibration:
    """Choose and fit timestep weights on scored items (per-timestep scores [images, texts, T] each),
    with the held-out before/after figures of nested cross-validation (see the module's notes)."""
    n = len(items)
    check_size(n, folds, f"got {n}")
    data = _Data(items, per_t, [int(t) for t in timesteps], num_train)
    outer = _Folds(n, folds, seed)
    held: list[int] = []
    before: list[torch.Tensor] = []
    after: list[torch.Tensor] = []
    for f in range(folds):
        train, test = outer.split(f, range(n))
        inner = _Folds(n, folds, seed + 1 + f)
        fit, _ = data.choose(train, inner)
        w = data.weights(fit, train)
        held += test
        before += data.matrices(test, None)
        after += data.matrices(test, w)
    held_items = [items[i] for i in held]
    fit, cv = data.choose(range(n), outer)
    w = data.weights(fit, range(n))
    w = torch.ones(len(timesteps), dtype=torch.float64) if w is None else w / w.mean()
    return Calibration(weights={int(t): float(x) for t, x in zip(timesteps, w.tolist(), strict=True)},
                       fitted={**fit, "folds": folds, "seed": seed},
                       before=task_metrics(held_items, before), after=task_metrics(held_items, after), cv=cv,
                       items=n, item_ids=[i.id for i in items], metric=data.metric)


def calibrate(task: str, data: str | Path, *, model: Any = None, method: str | None = None, timesteps: int = 20,
              seed: int = 0, split: str | None = None, fraction: float | None = None, limit: int | None = None,
              folds: int = 5, sample_seed: int = 0, out: str | Path | None = None, progress: bool | None = None,
              **options: Any) -> Calibration:
    """Fit timestep weights for ``task`` from a small labelled part of it (``fastitm calibrate``).

    Scores ``limit`` items (at most), or a ``fraction`` of the task's items (default 0.05, at least
    :data:`MIN_ITEMS`), drawn at random with ``sample_seed``, once with :func:`fastitm.evaluate.run`
    (``options``: its scoring options, e.g. ``batch_size``, ``preset``); then :func:`fit_weights`.
    ``out``: write the weights file there (``fastitm eval --weights FILE`` reads it; its timesteps are
    this plan's, so evaluate with the same ``timesteps`` and scheme).
    """

    if fraction is not None and limit is not None:
        raise ValueError("give fraction or limit, not both")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int, got {limit!r}")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if options.get("adaptive") or options.get("elimination"):
        raise ValueError("calibration needs every timestep of every candidate: no adaptive or elimination")
    if out is not None:
        out = Path(out)
        if out.is_dir() or not out.parent.is_dir():
            raise ValueError(f"out {out}: give a file path in an existing folder")
    def sample(items: list[Item]) -> list[int]:
        # Called by run on the task's items once they are read, before any model or scoring.
        n = len(items)
        unlabelled = [i.id for i in items if i.label is None and i.kind != "group"]
        if unlabelled:
            raise ValueError(f"{task} items have no right answer (e.g. {unlabelled[0]}): calibration needs "
                             "labelled items")
        if items and items[0].classes is not None and items[0].classes != list(range(len(items[0].classes))):
            # a class scoring as its best prompt is no per-timestep difference the weights could be fitted on
            raise ValueError(f"{task}: calibration needs one prompt per class, in class order; these prompts give "
                             "some class several (or list them out of order)")
        k = min(limit, n) if limit is not None else min(n, max(MIN_ITEMS, math.ceil((fraction or 0.05) * n)))
        check_size(k, folds, f"{task} at {data} gives {k} (of {n})")
        return sorted(random.Random(sample_seed).sample(range(n), k))

    report = run(task, data, model=model, method=method, timesteps=timesteps, seed=seed, split=split,
                 select=sample, progress=progress, **options)
    items, per_t = report.per_timestep_scores()
    cal = fit_weights(items, per_t, report.plan["timesteps"], num_train=report.model["num_train_timesteps"],
                      folds=folds, seed=sample_seed)
    cal.task, cal.data, cal.plan, cal.model = task, str(data), report.plan, report.model
    cal.fitted["method"] = report.method
    cal.fitted["options"] = report.options
    cal.fitted["sample_seed"] = sample_seed
    if out is not None:
        cal.save(out)
    return cal
