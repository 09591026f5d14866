"""The evaluation report: metrics, per-item scores, accuracy vs number of timesteps, the plan."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..core.weights import describe, resolve, weighted_mean
from .curves import curve, jsonable, racing_curve, record_scores
from .items import Item
from .metrics import IDENTICAL_COUNTS, task_metrics


def _against_full(raced: list[dict]) -> str:
    """The raced items' rows against their full plan's (each record's ``rows_full``), for the racing
    line; empty for records made before it was kept."""
    if not all("rows_full" in i for i in raced):
        return ""
    spent, full = sum(i["rows"] for i in raced), sum(i["rows_full"] for i in raced)
    return f" against {full / len(raced):.1f} for the full plan ({full / max(spent, 1):.2f}x fewer)"


@dataclass
class EvalReport:
    """``metrics``: the task's published metrics (with ``by_tag`` breakdowns); ``items``: per item its
    id, kind, ``scores`` (the candidates' scores in order; Winoground: the 2x2 matrix [image][text]),
    ``label`` and tags; ``curve``: per number of timesteps n (the first n of a spread order over the
    plan), the headline metrics; ``skipped``: unreadable items left out with ``skip_bad``. Items that
    lost candidates identical to the true one carry ``dropped`` and ``kept`` (the original indices of
    the candidates scored); ``metrics`` counts them (``identical_dropped``, ``items_with_identical``,
    ``no_negative``: items left with no negative, not in the metrics); ``racing``: what racing would
    have decided and spent on this run's per-timestep scores, per alpha (see
    :func:`fastitm.evaluate.runner.racing_curve`)."""

    task: str
    method: str
    options: dict
    metrics: dict
    items: list[dict]
    curve: list[dict]
    plan: dict
    data: str
    preset: str | None = None
    choices: dict = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    racing: list[dict] = field(default_factory=list)
    timesteps: list[dict] = field(default_factory=list)
    model: dict = field(default_factory=dict)
    # What the command asked for (fastitm eval sets it): task, data, model, dtype, method, options,
    # timesteps, seed, split, limit, weights, adaptive. Another --out of the same evaluation is replaced;
    # one holding another evaluation is refused, naming what differs.
    evaluation: dict = field(default_factory=dict)

    def to_json(self) -> dict:

        # The header (everything before the curves and items) is the record `fastitm eval --results`
        # appends to its results file: runs line up in one table (`fastitm results`).
        return {"task": self.task, "data": self.data, "model": self.model, "method": self.method,
                "preset": self.preset, "options": self.options, "choices": self.choices, "metrics": self.metrics,
                "accuracy_vs_timesteps": self.curve, "racing_simulated": self.racing,
                "per_timestep": self.timesteps, "plan": self.plan, "skipped": self.skipped,
                "stats": self.stats, "evaluation": self.evaluation, "items": self.items, "fastitm": __version__}

    def to_markdown(self) -> str:
        lines = [f"# fastitm eval: {self.task}", "",
                 f"data: `{self.data}`; method `{self.method}` {self.options}"
                 + (f", preset `{self.preset}`" if self.preset else ""),
                 f"timesteps: {self.plan.get('timesteps')}; seed {self.plan.get('seed')}; "
                 f"{self.metrics.get('items', len(self.items))} items"
                 + (f"; {len(self.skipped)} skipped (unreadable)" if self.skipped else ""), "",
                 "| metric | value |", "|---|---|"]
        for k, v in self.metrics.items():
            if k not in ("by_tag", "confusion"):
                lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
        if "normalize" in self.choices:  # recorded only where the runner left the row out on its own
            lines += ["", "DiffusionITM without the empty prompt's row (normalize False): every item chooses among one "
                          "image's texts, and the empty prompt's error of an image and timestep shifts all its texts "
                          "alike, so the choices and metrics are those of the normalized score, at M of the M + 1 "
                          "denoiser rows (the published script also normalizes only for image retrieval). "
                          "`--option normalize=true` (`normalize=True`) for the normalized scores."]
        if "ties" in self.metrics:
            lines += ["", "Ties never count for the ground truth (the published argmax credits them to it)."]
        if self.metrics.get("identical_dropped"):
            m = self.metrics
            lines += ["", f"A candidate identical to the true one (the same text after the task's preprocessing, the "
                          f"same image file or pixels) is no negative: {m['identical_dropped']} dropped from "
                          f"{m['items_with_identical']} items; {m['no_negative']} items had no negative left and "
                          "are not in the metrics."]
        by_tag = self.metrics.get("by_tag", {})
        if by_tag:
            keys = [k for k in next(iter(by_tag.values())) if k != "items"]
            lines += ["", "| tag | items | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
            for tag, m in by_tag.items():
                lines.append(f"| {tag} | {m['items']} | " + " | ".join(
                    f"{m[k]:.4f}" if isinstance(m[k], float) else str(m[k]) for k in keys) + " |")
        if self.curve:
            keys = list(self.curve[0]["metrics"])
            lines += ["", "## Accuracy vs number of timesteps (one run: the first n of a spread order)", "",
                      "| timesteps | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
            T = len(self.curve)
            shown = sorted({n for n in (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000) if n <= T} | {T})
            for row in self.curve:
                if row["timesteps"] in shown:
                    lines.append(f"| {row['timesteps']} | " + " | ".join(f"{row['metrics'][k]:.4f}" for k in keys) + " |")
        if self.timesteps:
            keys = list(self.timesteps[0]["metrics"])
            margin = "margin" in self.timesteps[0]
            lines += ["", "## Each timestep alone (plan order)", "",
                      "The metrics from one timestep's scores" + (", and the mean margin of the choice items (true "
                                                                   "minus best other; positive: right)" if margin else "")
                      + ": where the signal is.", "",
                      "| timestep | " + " | ".join(keys) + (" | margin |" if margin else " |"),
                      "|---|" + "---|" * (len(keys) + margin)]
            for row in self.timesteps:
                lines.append(f"| {row['timestep']} | " + " | ".join(f"{row['metrics'][k]:.4f}" for k in keys)
                             + (f" | {row['margin']:.3g} |" if margin else " |"))
        if self.racing:
            lines += ["", "## Racing, simulated on this run's per-timestep scores", "",
                      "What `fastitm.engine.racing` (paired t-tests against each item's best, Bonferroni over looks and "
                      "rivals; the settled stop and drops at alpha's level too) would have decided and spent: "
                      "conditional denoiser rows per item (candidate x timestep; the full plan scores every candidate "
                      "at every timestep).", "",
                      "| | rows per item | accuracy | items run to the plan's end |", "|---|---|---|---|"]
            for r in self.racing:
                name = "full plan" if r["alpha"] is None else f"racing, alpha {r['alpha']}"
                lines.append(f"| {name} | {r['rows_per_item']:.1f} | {r['accuracy']:.4f} | {r['plan_end']:.0%} |")
        st = self.stats
        empty_row = st.get("empty_prompt_row", True)  # reports made before it was recorded: as they said
        raced = [i for i in self.items if "rows" in i]
        if raced:
            ends = sum(bool(i["plan_end"]) for i in raced)
            lines += ["", f"Racing ({self.options.get('adaptive')}): {len(raced)} items, "
                          f"{sum(i['rows'] for i in raced) / len(raced):.1f} denoiser rows per item"
                          + (" (the empty prompt's included)" if empty_row else "")
                          + _against_full(raced)
                          + f"; {ends} ran to the plan's end. Per item: `rows`, `rows_full`, `plan_end` in report.json."]
        if st.get("batches"):
            calls = st["engine_calls"]
            lines += ["", f"Engine: {st['unet_rows']} denoiser rows in {st['batches']} batch"
                          f"{'es' if st['batches'] != 1 else ''} of up to {st['batch_size']} ({calls} call"
                          f"{'s' if calls != 1 else ''}, several items each): mean batch fill {st['batch_fill']:.1%}."]
            if st.get("image_cache"):
                lines[-1] += (" Image cache: " + (f"{st['unet_rows_reused']} unconditional rows reused, "
                                                  if empty_row else "")
                              + f"{st['vae_images']} images through the VAE.")
            elif st.get("repeated_images"):
                lines[-1] += (f" {st['repeated_images']} candidate images repeat an earlier item's: "
                              "`--image-cache` (`image_cache=True`) would encode each once"
                              + (" and run its unconditional rows once" if empty_row else "")
                              + ", with the same scores to float rounding.")
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> Path | None:
        """Accuracy vs number of timesteps as a PNG (needs matplotlib; None without it or a curve)."""
        if not self.curve:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        fig = self.curve_figure()
        path = Path(path)
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
        return path

    def curve_figure(self):
        """The figure of :meth:`plot`: one line per metric, metrics with equal curves drawn once and
        named together (one would hide the other), the legend beside the axes (not over the curves),
        accuracies on a fixed 0-1 axis and effect sizes on one symmetric about 0 (a change of one item
        does not fill the plot), whole timesteps on the x axis."""
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        fig, ax = plt.subplots(figsize=(7.5, 4), dpi=100)
        xs = [row["timesteps"] for row in self.curve]
        series: dict[tuple, list[str]] = {}
        for key in self.curve[0]["metrics"]:
            ys = tuple(row["metrics"][key] for row in self.curve)
            series.setdefault(ys, []).append(key)
        for ys, keys in series.items():
            ax.plot(xs, ys, marker="o" if len(xs) <= 20 else None, label=" = ".join(keys))
        bias = self.task.startswith("bias")
        ax.set_xlabel("number of timesteps (first n of a spread order)")
        ax.set_ylabel("effect size d (positive: towards the first group)" if bias else "accuracy / recall")
        ys = [v for row in self.curve for v in row["metrics"].values() if isinstance(v, (int, float)) and v == v]
        if bias:
            top = max([2.0] + [abs(v) * 1.1 for v in ys])
            ax.set_ylim(-top, top)
            ax.axhline(0.0, color="grey", linewidth=0.8)
        elif all(0.0 <= v <= 1.0 for v in ys):
            ax.set_ylim(-0.02, 1.02)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{self.task}, {self.method}")
        ax.grid(alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
        fig.tight_layout()
        return fig

    def plot_racing(self, path: str | Path) -> Path | None:
        """Accuracy vs conditional denoiser rows per item as a PNG: the fixed plan's first n timesteps
        (from the curve) and racing at each simulated alpha (None without matplotlib or the data)."""
        if not self.racing or not self.curve or "accuracy" not in self.curve[0]["metrics"]:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        per_timestep = self.racing[0]["rows_per_item"] / len(self.curve)
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        ax.plot([row["timesteps"] * per_timestep for row in self.curve],
                [row["metrics"]["accuracy"] for row in self.curve], color="gray", label="fixed plan, first n timesteps")
        for r in self.racing[1:]:
            ax.plot(r["rows_per_item"], r["accuracy"], "o", label=f"racing, alpha {r['alpha']} (simulated)")
        ax.set_xlabel("denoiser rows per item (candidate x timestep)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{self.task}, {self.method}: accuracy vs rows")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path)
        plt.close(fig)
        return path

    def plot_timesteps(self, path: str | Path) -> Path | None:
        """Each timestep alone as a PNG: its metrics and (right axis) the mean margin, against the
        timestep (None without matplotlib or the data)."""
        if not self.timesteps:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        xs = [row["timestep"] for row in self.timesteps]
        fig, ax = plt.subplots(figsize=(7.5, 4), dpi=100)
        for key in self.timesteps[0]["metrics"]:
            ax.plot(xs, [row["metrics"][key] for row in self.timesteps], marker=".", label=key)
        ax.set_xlabel("timestep (alone)")
        ax.set_ylabel("effect size d" if self.task.startswith("bias") else "accuracy / recall")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if "margin" in self.timesteps[0]:
            right = ax.twinx()
            (line,) = right.plot(xs, [row["margin"] for row in self.timesteps], color="black", linestyle="--",
                                 label="mean margin (right axis)")
            right.axhline(0.0, color="grey", linewidth=0.8)
            right.set_ylabel("mean margin: true minus best other")
            handles, labels = handles + [line], labels + [line.get_label()]
        ax.legend(handles, labels, loc="center left", bbox_to_anchor=(1.12, 0.5), fontsize=8)
        ax.set_title(f"{self.task}, {self.method}: each timestep alone")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
        return path

    def plot_confusion(self, path: str | Path) -> Path | None:
        """The classify task's confusion matrix as a PNG, rows normalized per true class (None without
        matplotlib or a confusion matrix); class names on the axes up to 40 classes."""
        cells = self.metrics.get("confusion")
        if not cells:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            import numpy as np
        except ImportError:
            return None
        names = {int(r["label"]): str(r.get("tags", {}).get("class", r["label"])) for r in self.items}
        C = max(max(t, p) for t, p, _ in cells) + 1
        C = max(C, max(names) + 1)
        m = np.zeros((C, C))
        for t, p, n in cells:
            m[t, p] = n
        m /= np.maximum(m.sum(1, keepdims=True), 1)
        side = min(12.0, 4 + C * 0.2)
        fig, ax = plt.subplots(figsize=(side, side * 0.85), dpi=100)
        im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class's images")
        if C <= 40:
            labels = [names.get(c, str(c)) for c in range(C)]
            ax.set_xticks(range(C), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(C), labels, fontsize=7)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        acc = self.metrics.get("accuracy")
        ax.set_title(f"{self.task}, {self.method}: confusion" + (f" (top-1 {acc:.3f})" if acc is not None else ""))
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
        return path

    @classmethod
    def load(cls, path: str | Path) -> EvalReport:
        """The report written by :meth:`save` (``path``: its report.json, or the folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "report.json"
        if not path.is_file():
            raise FileNotFoundError(f"no evaluation report at {path} (fastitm eval --out writes report.json)")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            return cls(task=d["task"], method=d["method"], options=d["options"], metrics=d["metrics"],
                       items=d["items"], curve=d["accuracy_vs_timesteps"], plan=d["plan"], data=d["data"],
                       preset=d.get("preset"), choices=d.get("choices", {}), skipped=d.get("skipped", []),
                       stats=d.get("stats", {}), racing=d.get("racing_simulated", []),
                       timesteps=d.get("per_timestep", []), model=d.get("model", {}),
                       evaluation=d.get("evaluation", {}))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a fastitm evaluation report ({type(e).__name__}: {e})") from None

    def per_timestep_scores(self) -> tuple[list, list]:
        """(the items as :class:`~fastitm.evaluate.Item` records, each item's per-timestep scores
        [images, texts, T] float32) from the per-item data; raises where the report has none (racing
        and elimination runs score only some timesteps of some candidates)."""
        import torch

        if not self.items or "per_timestep" not in self.items[0]:
            why = ("its run raced or eliminated candidates, so it has no full per-timestep scores"
                   if self.options.get("adaptive") or self.options.get("elimination")
                   else "it was written by an older fastitm, which kept no per-item per-timestep scores")
            raise ValueError(f"this report of {self.task} cannot be reweighted: {why}")
        items = [Item(id=r["id"], kind=r["kind"], images=[], texts=[], label=r["label"], tags=r.get("tags", {}),
                      dropped=r.get("dropped", 0), kept=r.get("kept"), classes=r.get("classes")) for r in self.items]
        per_t = [torch.tensor(r["per_timestep"], dtype=torch.float32) for r in self.items]
        return items, per_t

    def reweight(self, weights: Any) -> EvalReport:
        """This report under other timestep weights (:mod:`fastitm.core.weights`), from the per-timestep
        scores it keeps, without the model: the metrics, the items' scores and the accuracy-vs-timesteps
        curve are what a fresh run with ``weights`` gives (the per-timestep diagnostics do not depend on
        the weights; racing is simulated on the weighted statistic, as such a run does)."""
        from dataclasses import replace

        items, per_t = self.per_timestep_scores()
        w = resolve(weights, self.plan["timesteps"], self.model.get("num_train_timesteps", 1000))
        matrices = [weighted_mean(p, w) for p in per_t]
        metrics = task_metrics(items, matrices)
        metrics.update({k: self.metrics[k] for k in IDENTICAL_COUNTS if k in self.metrics})
        records = [{**r, "scores": record_scores(i, m)} for r, i, m in zip(self.items, items, matrices, strict=True)]
        options = {k: v for k, v in self.options.items() if k != "weights"}
        if w is not None:
            options["weights"] = describe(weights)
        return replace(self, options=options, metrics=metrics, items=records, curve=curve(items, per_t, w),
                       racing=racing_curve(items, per_t, w=w))

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write report.json, report.md, accuracy_vs_timesteps.png, accuracy_vs_rows.png,
        per_timestep.png and (classify) confusion.png into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = {"json": out / "report.json", "markdown": out / "report.md"}
        written["json"].write_text(json.dumps(jsonable(self.to_json()), indent=2, allow_nan=False))
        written["markdown"].write_text(self.to_markdown())
        png = self.plot(out / "accuracy_vs_timesteps.png")
        if png is not None:
            written["plot"] = png
        png = self.plot_racing(out / "accuracy_vs_rows.png")
        if png is not None:
            written["racing_plot"] = png
        png = self.plot_timesteps(out / "per_timestep.png")
        if png is not None:
            written["timesteps_plot"] = png
        png = self.plot_confusion(out / "confusion.png")
        if png is not None:
            written["confusion_plot"] = png
        return written
