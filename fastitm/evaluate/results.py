"""Results that line up across runs: ``fastitm eval ... --results FILE.jsonl`` appends one record per
run (report.json's content: task, data, model source and weight digest, family, dtype, device,
versions, method, options, preset and choices, plan, metrics, stats with wall time and rows, skipped
and items), and ``fastitm results FILE.jsonl`` prints the records as one table (markdown or CSV)."""

from __future__ import annotations

import csv
import io
import json
import time
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


def read(path: str | Path) -> list[dict]:
    """The records of a results file; a line that is not a record is named with its line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON record ({e})") from None
        if not isinstance(rec, dict) or "task" not in rec or "metrics" not in rec:
            raise ValueError(f"{path}:{n}: not a fastitm eval record (no task or metrics)")
        records.append(rec)
    return records


COLUMNS = ("recorded", "task", "model", "method", "preset", "timesteps", "seed", "adaptive")


def rows(records: list[dict]) -> tuple[list[str], list[list]]:
    """(header, rows): the run's settings, then every headline metric any record has (top-level
    numbers, in first-seen order), then items, wall time and denoiser rows."""
    metric_keys: list[str] = []
    for rec in records:
        for k, v in rec["metrics"].items():
            if isinstance(v, float) and k not in metric_keys:
                metric_keys.append(k)
    header = [*COLUMNS, *metric_keys, "items", "wall_s", "unet_rows"]
    out = []
    for rec in records:
        plan = rec.get("plan") or {}
        st = rec.get("stats") or {}
        model = rec.get("model") or {}
        settings = [rec.get("recorded"), rec["task"], model.get("source"), rec.get("method"), rec.get("preset"),
                    len(plan.get("timesteps", [])) or None, plan.get("seed"),
                    "yes" if (rec.get("options") or {}).get("adaptive") else ""]
        out.append([*settings, *(rec["metrics"].get(k) for k in metric_keys), st.get("items"), st.get("wall_s"),
                    st.get("unet_rows")])
    return header, out


def table(records: list[dict], fmt: str = "markdown") -> str:
    """The records as one markdown table or as CSV."""
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

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in body]
    return "\n".join(lines) + "\n"
