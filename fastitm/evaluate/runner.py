"""``fastitm.evaluate.run``: a benchmark task end to end through the engine (:func:`fastitm.score`).

Every item is scored under one shared plan (same timesteps and noise: paired comparisons), so one
run also gives the metrics for the first 1, 2, ..., T timesteps of a spread order over the plan:
the accuracy-vs-timesteps curve the papers draw from many runs. Images are decoded by a background
thread a few items ahead, so reading and decoding overlap with scoring.
"""

from __future__ import annotations

import time
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


class _Progress:
    """Per-item results of this rank, saved atomically to its checkpoint file and reloaded on resume.
    A file made for another task, data, options, plan or model is refused."""

    def __init__(self, path: Path | None, key: str) -> None:
        self.path, self.key = path, key
        self.done: dict[int, tuple[torch.Tensor, torch.Tensor, dict]] = {}
        self.skipped: dict[int, dict] = {}
        if path is not None and path.exists():
            from ..engine import CheckpointError

            try:
                data = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as e:
                raise CheckpointError(f"{path} is not a fastitm eval checkpoint ({type(e).__name__}); pass "
                                      "another --checkpoint") from None
            if not isinstance(data, dict) or data.get("key") != key:
                raise CheckpointError(f"eval checkpoint {path} belongs to another run (task, data, options, plan "
                                      "or model); pass another --checkpoint")
            self.done, self.skipped = data["done"], data["skipped"]

    def save(self) -> None:
        if self.path is None:
            return
        import os
        import tempfile

        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save({"key": self.key, "done": self.done, "skipped": self.skipped}, f)
        os.replace(tmp, self.path)


def _run_key(task, data, method, options, plan, model, items) -> str:
    import hashlib

    from ..engine import hash_tensor, model_digest

    h = hashlib.sha256()
    for part in (task, str(Path(data).resolve()), method, sorted((k, repr(v)) for k, v in options.items()),
                 plan.describe(), [i.id for i in items], model_digest(model)):
        h.update(repr(part).encode() + b"\0")
    hash_tensor(h, plan.noise)
    return h.hexdigest()


def run(task: str, data: str | Path, *, model: Any = None, method: str | None = None, timesteps: int = 10,
        seed: int = 0, split: str | None = None, limit: int | None = None, skip_bad: bool = False,
        backend: str = "auto", batch_size: int | None = None, progress: bool | None = None,
        checkpoint: str | Path | None = None, checkpoint_every: float = 60.0, **options: Any) -> EvalReport:
    """Evaluate ``model`` on a benchmark task read from ``data`` (see :data:`fastitm.evaluate.TASKS`).

    ``options`` are :func:`fastitm.score`'s: method options, ``preset``, ``resize``, ``latent``,
    ``scheme``, ``noise``. ``method`` defaults to diffusion_itm (pets: diffusion_classifier with
    adaptive elimination, see :func:`task_defaults`).

    Distributed: when a torch.distributed process group with several ranks is initialised
    (``torchrun``), each rank scores a contiguous shard of the items and every rank returns the same
    full report (each item exactly once). ``checkpoint``: a file (per rank: ``<file>.rank<r>-of-<n>``)
    where finished items are saved every ``checkpoint_every`` seconds, on errors and on Ctrl-C;
    rerunning resumes with only the missing items. ``limit``: score only the first N items.
    ``skip_bad``: an unreadable image skips its item (listed in ``report.skipped``) instead of
    stopping the run.
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
    preset, choices, spec, _ = check_arguments([torch.zeros(3, 1, 1)], ["x"], method=method, timesteps=timesteps, seed=seed, plan=None,
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
    model.spec.check_method(spec.name)
    plan = shared_plan(model, method, timesteps, seed, plan_options)
    if any(i.kind in ("image", "group") for i in items) and method == "diffusion_itm" \
            and plan_options.get("normalize") is False:
        raise ValueError("choosing among images needs normalize=True for diffusion_itm (the unconditional "
                         "error makes scores of different images comparable)")

    from .. import distributed as dist

    offset, mine = dist.shard_items(items)
    ckpt = None
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        if dist.is_distributed():
            ckpt = ckpt.with_name(f"{ckpt.name}.rank{dist.rank()}-of-{dist.world_size()}")
        if not ckpt.parent.is_dir():
            raise FileNotFoundError(f"checkpoint folder {ckpt.parent} does not exist")
    state = _Progress(ckpt, _run_key(task, data, method, plan_options, plan, model, items) if ckpt else "")
    last_save = time.monotonic()
    todo = [(offset + n, item) for n, item in enumerate(mine) if offset + n not in state.done
            and offset + n not in state.skipped]
    show = progress_disabled(progress) if dist.rank() == 0 else True
    try:
        with ThreadPoolExecutor(max_workers=2) as pool, \
                tqdm(total=len(items), initial=max(0, len(items) - len(todo) * dist.world_size()),
                     desc=f"fastitm eval {task}", unit="item", disable=show, dynamic_ncols=True) as bar:
            for (idx, _), (item, fut) in zip(todo, _prefetch([it for _, it in todo], pool)):
                try:
                    images = fut.result()
                except BadImage as e:
                    if not skip_bad:
                        raise BadImage(f"{e} (pass --skip-bad / skip_bad=True to skip such items)") from None
                    state.skipped[idx] = {"id": item.id, "error": str(e)}
                    bar.update(dist.world_size())
                    continue
                res = score(images, item.texts, model=model, method=method, plan=plan, backend=backend,
                            batch_size=batch_size, progress=False, **plan_options)
                cands = res.matrix.tolist() if item.kind == "group" else (
                    res.matrix[0] if item.kind == "text" else res.matrix[:, 0]).tolist()
                state.done[idx] = (res.matrix, res.per_timestep,
                                   {"id": item.id, "kind": item.kind, "scores": jsonable(cands), "label": item.label,
                                    "tags": item.tags})
                bar.update(dist.world_size())
                if time.monotonic() - last_save >= checkpoint_every:
                    state.save()
                    last_save = time.monotonic()
    finally:  # finished work is kept on errors and Ctrl-C alike
        state.save()
    parts = dist.gather((state.done, state.skipped))
    done: dict = {}
    skipped_all: dict = {}
    for d, sk in parts:
        done.update(d)
        skipped_all.update(sk)
    order = sorted(done)
    scored = [items[n] for n in order]
    matrices = [done[n][0] for n in order]
    per_t = [done[n][1] for n in order]
    records = [done[n][2] for n in order]
    skipped = [skipped_all[n] for n in sorted(skipped_all)]
    if not scored:
        raise DataError(f"no item of {data} could be scored ({len(skipped)} skipped)")
    from ..ops._backend import choose

    opts = dict(spec.options)
    choices.update(latent=plan.latent, scheme=plan.scheme, noise=plan.noise_mode)
    metrics = task_metrics(scored, matrices)
    eliminated = bool(opts.get("elimination"))
    return EvalReport(task=task, method=spec.name, options=jsonable(opts), metrics=metrics,
                      items=records, curve=[] if eliminated else curve(scored, per_t), plan=plan.describe(),
                      data=str(data), preset=preset, choices=choices, skipped=skipped,
                      stats={"items": len(scored), "skipped": len(skipped),
                             "backend": choose(backend, [torch.empty(0, device=model.device)], "fastitm eval"),
                             "ranks": dist.world_size()})
