"""Timestep weights: how the per-timestep scores average into a pair's score.

Every method averages its per-timestep scores uniformly by default. ``weights=`` changes that average
(the per-timestep scores themselves, the plan, checkpoints and resume are unchanged: weights apply to
the stored scores): ``"uniform"`` (the default, today's numbers bit for bit); ``{"kind": "exp",
"rate": 7}``, Clark & Jaini's family ``exp(-rate * t / T_train)`` over the timestep t; a table
``{timestep: weight}`` naming every timestep of the plan; or the path of a JSON file holding such a
table under ``"weights"`` (what a calibration writes). A pair's score is sum_k w_k s_k / sum_k w_k.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch


def describe(weights: Any) -> Any:
    """The weights as the result and report record them (JSON-able)."""
    if weights is None or weights == "uniform":
        return "uniform"
    if isinstance(weights, (str, os.PathLike)):
        return {"file": str(weights)}
    return weights


def resolve(weights: Any, timesteps: list[int] | torch.Tensor, num_train: int) -> torch.Tensor | None:
    """Per plan timestep (in plan order) its weight [T] float64, or None for uniform weights.
    Raises naming the problem: an unknown kind, a missing timestep, a negative or non-finite weight,
    weights that sum to 0."""
    if weights is None or weights == "uniform":
        return None
    ts = [int(t) for t in (timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)]
    source = "weights"
    if isinstance(weights, (str, os.PathLike)):
        path = Path(weights)
        if path.is_dir():
            raise IsADirectoryError(f"weights {path} is a folder; give a weights file (JSON with a 'weights' table, as "
                                    "fastitm calibrate writes)")
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path} (or give 'uniform', {{'kind': 'exp', "
                                    f"'rate': 7}} or a {{timestep: weight}} table)")
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"weights file {path} is not JSON ({e})") from None
        if not isinstance(loaded, dict) or not isinstance(loaded.get("weights"), dict):
            raise ValueError(f"weights file {path} has no 'weights' table ({{timestep: weight}})")
        weights, source = loaded["weights"], str(path)
    if not isinstance(weights, dict):
        raise TypeError(f"weights must be 'uniform', a dict or a file path, got {type(weights).__name__}")
    if "kind" in weights:
        if weights["kind"] != "exp" or set(weights) - {"kind", "rate"}:
            raise ValueError(f"unknown weights {weights!r}; the family is {{'kind': 'exp', 'rate': r}}")
        rate = weights.get("rate", 7.0)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate):
            raise ValueError(f"weights rate must be a finite number, got {rate!r}")
        w = torch.tensor([math.exp(-rate * t / num_train) for t in ts], dtype=torch.float64)
        if rate >= 0 and ts and not w.sum() > 0:  # the rate, not the weights, is what to change
            raise ValueError(f"weights exp rate {rate:g}: exp(-rate * t / {num_train}) underflows to 0 at every "
                             f"timestep of the plan (the smallest is {min(ts)}); use a smaller rate")
    else:
        try:
            table = {int(k): v for k, v in weights.items()}
        except (TypeError, ValueError):
            raise ValueError(f"{source}: a weights table maps timesteps (ints) to weights") from None
        missing = [t for t in ts if t not in table]
        if missing:
            raise ValueError(f"{source} has no weight for the plan's timesteps {missing[:8]}; a table must cover "
                             "every timestep of the plan")
        vals = [table[t] for t in ts]
        bad = [v for v in vals if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)]
        if bad:
            raise ValueError(f"{source}: weights must be finite numbers, got {bad[:3]}")
        w = torch.tensor(vals, dtype=torch.float64)
    if (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"{source}: weights must be non-negative and not all 0")
    return w


def nan_weighted_mean(per_t: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """``per_t`` [..., T] with NaN where a timestep was not scored (racing, elimination) -> [...]: the
    (weighted) mean over the scored ones; NaN where none was, or where their weights sum to 0."""
    if w is None:
        return per_t.nanmean(dim=-1)
    ok = ~torch.isnan(per_t)
    w = w.to(per_t.device)
    num = (torch.where(ok, per_t.double(), 0.0) * w).sum(dim=-1)
    return (num / (ok.double() * w).sum(dim=-1)).to(per_t.dtype)


def weighted_mean(per_t: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """``per_t`` [..., T] -> [...]: the plain mean when ``w`` is None (bit for bit), else
    sum_k w_k s_k / sum_k w_k (in float64, returned in per_t's dtype)."""
    if w is None:
        return per_t.mean(dim=-1)
    w = w.to(per_t.device)
    return ((per_t.double() * w).sum(dim=-1) / w.sum()).to(per_t.dtype)
