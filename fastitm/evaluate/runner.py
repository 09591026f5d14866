"""``fastitm.evaluate.run``: a benchmark task end to end through the engine (:func:`fastitm.score`).

Every item is scored under one shared plan (same timesteps and noise: paired comparisons), so one
run also gives the metrics for the first 1, 2, ..., T timesteps of a spread order over the plan:
the accuracy-vs-timesteps curve the papers draw from many runs. Images are decoded by a background
thread a few items ahead, so reading and decoding overlap with scoring.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .metrics import headline, task_metrics
from .report import EvalReport, jsonable
from .synthetic import shared_plan
from .tasks import DataError, Item, load_task

PREFETCH = 4  # items decoded ahead of the one being scored


def task_defaults(task: str, timesteps: int) -> dict:
    """What a task uses unless told otherwise. Pets (37 classes) is zero-shot classification, which
    Diffusion Classifier answers with adaptive elimination: after a fifth of the timesteps the best 5
    classes go on, after half the best one."""
    if task == "pets" and timesteps >= 3:
        return {"method": "diffusion_classifier", "elimination": [(max(1, timesteps // 5), 5),
                                                                    (max(2, timesteps // 2), 1)]}
    if task == "pets":
        return {"method": "diffusion_classifier"}
    return {}


class BadImage(DataError):
    """An item's image cannot be read; the message names the path."""


def _decode(item: Item) -> list[Any]:
    """The item's images as 8-bit RGB PIL images (16-bit files as float tensors), read now."""
    from ..inputs import _load_path, _pil_decode
    from PIL import Image

    out = []
    for n, img in enumerate(item.images):
        what = f"item {item.id} image {n}"
        try:
            if isinstance(img, Image.Image):
                img = _pil_decode(img, what)
            else:
                if not Path(img).is_file():
                    raise FileNotFoundError(f"{what}: image file not found: {img}")
                img = _load_path(img, what)
        except (ValueError, OSError) as e:
            raise BadImage(str(e)) from None
        box = item.crops[n] if item.crops else None
        if box is not None:  # (left, top, right, bottom), as PIL's crop
            if isinstance(img, torch.Tensor):
                img = img[:, int(box[1]) : int(box[3]), int(box[0]) : int(box[2])]
            else:
                img = img.crop(tuple(int(v) for v in box))
        out.append(img)
    return out


def _prefetch(items: list[Item], pool: ThreadPoolExecutor):
    """Yield (item, future of its decoded images), keeping PREFETCH decodes in flight."""
    futures: list[Future] = []
    for n, item in enumerate(items):
        while len(futures) < min(PREFETCH, len(items) - n):
            futures.append(pool.submit(_decode, items[n + len(futures)]))
        yield item, futures.pop(0)


def curve(items: list[Item], per_t: list[torch.Tensor]) -> list[dict]:
    """The headline metrics using the first n timesteps of :func:`fastitm.methods.spread_order`, for
    every n from 1 to T, from the per-timestep scores of one run."""
    from ..methods import spread_order

    T = per_t[0].shape[-1]
    order = spread_order(T)
    rows = []
    for n in range(1, T + 1):
        ks = order[:n]
        mats = [p[:, :, ks].mean(dim=2) for p in per_t]
        rows.append({"timesteps": n, "metrics": headline(task_metrics(items, mats))})
    return rows


def run(task: str, data: str | Path, *, model: Any = None, method: str | None = None, timesteps: int = 10,
        seed: int = 0, split: str | None = None, limit: int | None = None, skip_bad: bool = False,
        backend: str = "auto", batch_size: int | None = None, progress: bool | None = None,
        **options: Any) -> EvalReport:
    """Evaluate ``model`` on a benchmark task read from ``data`` (see :data:`fastitm.evaluate.TASKS`).

    ``options`` are :func:`fastitm.score`'s: method options, ``preset``, ``resize``, ``latent``,
    ``scheme``, ``noise``. ``method`` defaults to diffusion_itm (pets: diffusion_classifier with
    adaptive elimination, see :func:`task_defaults`). ``limit``: score only the first N items. ``skip_bad``: an unreadable image
    skips its item (listed in ``report.skipped``) instead of stopping the run.
    """
    from tqdm.auto import tqdm

    from .. import score
    from ..common import check_arguments, progress_disabled
    from ..model import Model, load_model

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int, got {limit!r}")
    if method is None:
        defaults = task_defaults(task, timesteps)
        method = defaults.pop("method", "diffusion_itm")
        options = {**defaults, **options}
    plan_options = dict(options)
    # Check the scoring arguments before reading any data or loading a model.
    check_arguments([torch.zeros(3, 1, 1)], ["x"], method=method, timesteps=timesteps, seed=seed, plan=None,
                    resize=options.get("resize"), latent=options.get("latent"), scheme=options.get("scheme"),
                    noise=options.get("noise"), preset=options.get("preset"),
                    options={k: v for k, v in options.items()
                             if k not in ("resize", "latent", "scheme", "noise", "preset")},
                    backend=backend)
    items = load_task(task, data, split)
    if limit:
        items = items[:limit]
    if model is None:
        model = load_model()
    if not isinstance(model, Model):
        raise TypeError(f"model must be a fastitm Model (see fastitm.load_model), got {type(model).__name__}")
    plan = shared_plan(model, method, timesteps, seed, plan_options)
    if any(i.kind in ("image", "group") for i in items) and method == "diffusion_itm" \
            and plan_options.get("normalize") is False:
        raise ValueError("choosing among images needs normalize=True for diffusion_itm (the unconditional "
                         "error makes scores of different images comparable)")

    scored: list[Item] = []
    matrices: list[torch.Tensor] = []
    per_t: list[torch.Tensor] = []
    records: list[dict] = []
    skipped: list[dict] = []
    last = None
    with ThreadPoolExecutor(max_workers=2) as pool, \
            tqdm(total=len(items), desc=f"fastitm eval {task}", unit="item", disable=progress_disabled(progress),
                 dynamic_ncols=True) as bar:
        for item, fut in _prefetch(items, pool):
            try:
                images = fut.result()
            except BadImage as e:
                if not skip_bad:
                    raise BadImage(f"{e} (pass --skip-bad / skip_bad=True to skip such items)") from None
                skipped.append({"id": item.id, "error": str(e)})
                bar.update(1)
                continue
            last = score(images, item.texts, model=model, method=method, plan=plan, backend=backend,
                         batch_size=batch_size, progress=False, **plan_options)
            scored.append(item)
            matrices.append(last.matrix)
            per_t.append(last.per_timestep)
            cands = last.matrix.tolist() if item.kind == "group" else (
                last.matrix[0] if item.kind == "text" else last.matrix[:, 0]).tolist()
            records.append({"id": item.id, "kind": item.kind, "scores": jsonable(cands), "label": item.label,
                            "tags": item.tags})
            bar.update(1)
    if not scored:
        raise DataError(f"no item of {data} could be scored ({len(skipped)} skipped)")
    metrics = task_metrics(scored, matrices)
    eliminated = bool(last.options.get("elimination"))
    return EvalReport(task=task, method=last.method, options=jsonable(dict(last.options)), metrics=metrics,
                      items=records, curve=[] if eliminated else curve(scored, per_t), plan=plan.describe(),
                      data=str(data), preset=last.preset, choices=dict(last.choices), skipped=skipped,
                      stats={"items": len(scored), "skipped": len(skipped), "backend": last.backend})
