"""Results that line up across runs: ``fastitm eval ... --results FILE.jsonl`` appends one record per
run (report.json's content: task, data, model source and weight digest, family, dtype, device,
versions, method, options, preset and choices, plan, metrics, stats with wall time and rows, skipped
and items), and ``fastitm results FILE.jsonl`` prints the records as one table (markdown or CSV)."""

from __future__ import annotations

import csv
import io
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from .report import EvalReport, jsonable


def append(path: str | Path, report: EvalReport) -> dict:
    """Append ``report``'s record as one JSON line (under an exclusive lock: concurrent runs may share a
    file) and return it."""
    data = report.to_json()
    # per-item scores stay; their per-timestep scores (what report.reweight needs, T times larger) are
    # report.json's alone
    data["items"] = [{k: v for k, v in i.items() if k != "per_timestep"} for i in data["items"]]
    record = {"recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **jsonable(data)}
    line = json.dumps(record, allow_nan=False) + "\n"
    path = Path(path)
    with open(path, "a", encoding="utf-8") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # no POSIX locks: one line written in one call
            pass
        f.write(line)
    return record


def read(path: str | Path, on_bad: Callable[[str], None] | None = None) -> list[dict]:
    """The records of a results file. A line that is not a record (a run killed mid-write, a line from
    another tool) is left out and named with its line number (``on_bad(message)``; a warning by
    default), so the good records still line up; a file with no record at all is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    records, bad = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append(f"{path}:{n}: not a JSON record ({e})")
            continue
        if not isinstance(rec, dict) or "task" not in rec or not isinstance(rec.get("metrics"), dict):
            bad.append(f"{path}:{n}: not a fastitm eval record (no task or metrics)")
            continue
        records.append(rec)
    if not records:
        raise ValueError(bad[0] if bad else f"{path}: no records (fastitm eval --results {path} appends them)")
    for why in bad:
        if on_bad is None:
            warnings.warn(f"{why}; left out", stacklevel=2)
        else:
            on_bad(f"{why}; left out")
    return records


# The settings that tell runs apart, each a column (CSV: all; markdown: those that differ between runs,
# the ones every run shares said once above the table).
COLUMNS = ("recorded", "task", "data", "split", "limit", "model", "dtype", "method", "options", "preset", "resize",
           "latent", "scheme", "noise", "timesteps", "seed", "weights", "adaptive", "image_cache")


def _settings(rec: dict) -> list:
    plan, model = rec.get("plan") or {}, rec.get("model") or {}
    options, choices = dict(rec.get("options") or {}), rec.get("choices") or {}
    evaluation, stats = rec.get("evaluation") or {}, rec.get("stats") or {}
    adaptive, weights = options.pop("adaptive", None), options.pop("weights", None)

    def compact(v):
        return None if v in (None, {}, "") else (v if isinstance(v, (str, int, float)) else json.dumps(v, sort_keys=True))

    return [rec.get("recorded"), rec["task"], rec.get("data"), evaluation.get("split"), evaluation.get("limit"),
            model.get("source"), model.get("dtype"), rec.get("method"), compact(options), rec.get("preset"),
            choices.get("resize"), plan.get("latent", choices.get("latent")), plan.get("scheme", choices.get("scheme")),
            plan.get("noise", choices.get("noise")), len(plan.get("timesteps", [])) or None, plan.get("seed"),
            compact(weights) or "uniform", compact(adaptive), "yes" if stats.get("image_cache") else ""]


def rows(records: list[dict]) -> tuple[list[str], list[list]]:
    """(header, rows): the run's settings (:data:`COLUMNS`), then every headline metric any record has
    (top-level numbers, in first-seen order), then items, wall time and denoiser rows."""
    metric_keys: list[str] = []
    for rec in records:
        for k, v in rec["metrics"].items():
            if isinstance(v, float) and k not in metric_keys:
                metric_keys.append(k)
    header = [*COLUMNS, *metric_keys, "items", "wall_s", "unet_rows"]
    out = []
    for rec in records:
        st = rec.get("stats") or {}
        out.append([*_settings(rec), *(rec["metrics"].get(k) for k in metric_keys), st.get("items"),
                    st.get("wall_s"), st.get("unet_rows")])
    return header, out


def table(records: list[dict], fmt: str = "markdown") -> str:
    """The records as CSV (every column) or as one markdown table: where there are several runs, a
    setting every run shares is said once above the table instead of in a column."""
    header, body = rows(records)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(header)
        w.writerows(["" if v is None else v for v in r] for r in body)
        return buf.getvalue()

    def cell(v) -> str:
        if v is None:
            return ""
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = []
    if len(body) > 1:
        keep = [n for n, name in enumerate(header)
                if name not in COLUMNS or name in ("recorded", "task") or len({cell(r[n]) for r in body}) > 1]
        same = [f"{header[n]} {cell(body[0][n])}" for n in range(len(header)) if n not in keep and cell(body[0][n])]
        if same:
            lines += ["every run: " + "; ".join(same), ""]
        header, body = [header[n] for n in keep], [[r[n] for n in keep] for r in body]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in body]
    return "\n".join(lines) + "\n"
