"""``fastitm.evaluate.run``: a benchmark task end to end through the engine (:func:`fastitm.score`).

Every item is scored under one shared plan (same timesteps and noise: paired comparisons), so one
run also gives the metrics for the first 1, 2, ..., T timesteps of a spread order over the plan:
the accuracy-vs-timesteps curve the papers draw from many runs. Images are decoded by a background
thread a few items ahead, so reading and decoding overlap with scoring.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..api import score
from ..core.inputs import _load_path, _pil_decode, check_not_url
from ..core.interrupts import terminate_as_interrupt
from ..core.methods import resolve_method
from ..core.weights import describe, resolve, weighted_mean
from ..engine import distributed as dist
from ..engine.common import check_arguments, hash_tensor, progress_disabled
from ..engine.engine import CheckpointError, checkpoint_lock, model_digest
from ..engine.image_cache import ImageCache
from ..engine.racing import RaceOptions, check_not_with_elimination
from ..engine.text_cache import TextCache
from ..models.families.base import lcm_record
from ..models.model import Model, load_model
from ..models.speed import auto_compile, default_batch_size
from ..ops._backend import choose
from .curves import curve, jsonable, per_timestep_diagnostics, racing_curve, record_scores  # noqa: F401
from .fewshot import fewshot as fewshot_split
from .metrics import identical_counts, task_metrics
from .report import EvalReport
from .synthetic import shared_plan
from .tasks import DataError, Item, drop_identical, load_task

PREFETCH = 4  # items decoded ahead of the one being scored


def text_choice_only(method: str, options: dict, items: list[Item]) -> bool:
    """Whether a DiffusionITM run leaves out the empty prompt's row on its own (``normalize`` not given):
    every item chooses among one image's texts. The normalized score subtracts the same image and
    timestep's empty-prompt error from each of its texts, which shifts them all alike, so every choice,
    margin and metric of such items (accuracy, MMBias's within-image differences, racing's drops and
    stops) is the same without it, at M of the M + 1 denoiser rows per image and timestep; the published
    script likewise subtracts it only with ``--img_retrieval``. Image and Winoground items need it (it
    makes scores of different images comparable)."""
    return method == "diffusion_itm" and "normalize" not in options and bool(items) and \
        all(i.kind == "text" for i in items)


def task_defaults(task: str, timesteps: int) -> dict:
    """What a task uses unless told otherwise. Pets (37 classes) and classify are zero-shot
    classification, which Diffusion Classifier answers with adaptive elimination: after a fifth of the
    timesteps the best 5 prompts go on, after half the best one."""
    if task in ("pets", "classify") and timesteps >= 3:
        return {"method": "diffusion_classifier", "elimination": [(max(1, timesteps // 5), 5),
                                                                    (max(2, timesteps // 2), 1)]}
    if task in ("pets", "classify"):
        return {"method": "diffusion_classifier"}
    return {}


class BadImage(DataError):
    """An item's image cannot be read; the message names the path."""


def _existing(ref: str | tuple[str, ...], what: str) -> str:
    """The image file a reference names: a path, or the first existing one of alternative paths."""

    paths = ref if isinstance(ref, tuple) else (ref,)
    for p in paths:
        check_not_url(p, what)
        if Path(p).is_file():
            return p
    raise FileNotFoundError(f"{what}: image file not found: " + (
        str(ref) if len(paths) == 1 else " or ".join(map(str, paths)) + " (either layout is read)"))


def _decode(item: Item) -> list[Any]:
    """The item's images as 8-bit RGB PIL images (16-bit files as float tensors), read now."""
    from PIL import Image

    out = []
    for n, img in enumerate(item.images):
        what = f"item {item.id} image {n}"
        try:
            if isinstance(img, Image.Image):
                img = _pil_decode(img, what)
            else:
                img = _load_path(_existing(img, what), what)
        except (ValueError, OSError) as e:
            raise BadImage(str(e)) from None
        box = item.crops[n] if item.crops else None
        if box is not None:  # (left, top, right, bottom); fractional edges rounded, as PIL's crop does
            left, top, right, bottom = (int(round(v)) for v in box)
            w, h = (img.shape[2], img.shape[1]) if isinstance(img, torch.Tensor) else img.size
            if right <= 0 or bottom <= 0 or left >= w or top >= h or right <= left or bottom <= top:
                # (a box partly outside is cropped as the published ARO loader does: PIL pads it black)
                raise BadImage(f"{what}: its box {tuple(box)} (left, top, right, bottom) lies outside the "
                               f"{w}x{h} image")
            if isinstance(img, torch.Tensor):
                img = img[:, top:bottom, left:right]
            else:
                img = img.crop((left, top, right, bottom))
        out.append(img)
    return out


def _same_pixels(a: Any, b: Any) -> bool:
    """Decoded images (PIL, or float tensors for 16-bit files) with the same size and pixels."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and torch.equal(a, b)
    return a.size == b.size and a.mode == b.mode and a.tobytes() == b.tobytes()


def _prepare(item: Item) -> tuple[Item, list[Any] | None]:
    """(the item as scored, its decoded images): images with the true image's pixels are dropped as
    well (:func:`~fastitm.evaluate.tasks.drop_identical`). An item without a negative is not decoded."""
    if not item.has_negative:
        return item, None
    images = _decode(item)
    if item.kind == "text":
        return item, images
    # drop by pixels on the images' indices, then map the survivors back to references and pixels
    by_index = drop_identical(replace(item, images=list(range(len(images)))),
                              lambda i, j: _same_pixels(images[i], images[j]))
    return replace(by_index, images=[item.images[i] for i in by_index.images]), [images[i] for i in by_index.images]


STREAM_BATCHES = 16  # denoiser batches per engine call in an evaluation: the last one of a call may be short


def _item_rows(item: Item, T: int, needs_uncond: bool) -> int:
    """The denoiser rows the full plan runs for an item: its images x (texts + the empty prompt's) x T."""
    return len(item.images) * (len(item.texts) + int(needs_uncond)) * T


def _windows(items: list[Item], T: int, needs_uncond: bool, per_call: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of consecutive items of at least ``per_call`` denoiser rows each (the last
    may hold fewer), counting each item's images x (texts + the unconditional row) x T."""
    out, start, rows = [], 0, 0
    for n, item in enumerate(items):
        rows += _item_rows(item, T, needs_uncond)
        if rows >= per_call:
            out.append((start, n + 1))
            start, rows = n + 1, 0
    if start < len(items):
        out.append((start, len(items)))
    return out


def _score_window(window: list, state, work: dict, score, *, model, method, plan, backend, batch_size, race,
                  options, empty_row: bool, image_cache=None, text_cache=None) -> None:
    """One engine call for the items of ``window`` [(index, item, images)]: images and texts side by side,
    each image scored against its own item's texts only (``pairs=``); each item's block into ``state``.
    With racing, text-choice items race their texts and image-choice items their images, each kind in
    a call of its own; other kinds run the full plan. ``empty_row``: whether the method runs the empty
    prompt's row (what a raced item's full plan would have spent counts it)."""
    over = {"text": "texts", "image": "images"}  # what competes in each item kind; groups run in full
    groups = [(kind, [w for w in window if race is not None and w[1].kind == kind]) for kind in over]
    groups.append((None, [w for w in window if race is None or w[1].kind not in over]))
    for kind, group in groups:
        if not group:
            continue
        images, texts, spans, seen = [], [], [], {}
        for _, item, imgs in group:
            # items with the same candidate texts (the classify task's prompts) share their columns
            j0 = seen.setdefault(tuple(item.texts), len(texts))
            if j0 == len(texts):
                texts += list(item.texts)
            spans.append((len(images), len(images) + len(imgs), j0, j0 + len(item.texts)))
            images += list(imgs)
        pairs = torch.zeros(len(images), len(texts), dtype=torch.bool)
        for i0, i1, j0, j1 in spans:
            pairs[i0:i1, j0:j1] = True
        res = score(images, texts, model=model, method=method, plan=plan, backend=backend, batch_size=batch_size,
                    progress=False, pairs=pairs, adaptive=replace(race, over=over[kind]) if kind else None,
                    image_cache=image_cache, text_cache=text_cache, **options)
        work["unet_rows"] += res.stats["unet_rows"]
        work["text_encodes"] += res.stats["text_encodes"]
        work["batches"] += res.stats["batches"]
        work["calls"] += 1
        work["vae_images"] += res.stats["vae_images"]
        work["unet_rows_reused"] += res.stats.get("unet_rows_reused", 0)
        racing = res.stats.get("racing")
        for (idx, item, _), (i0, i1, j0, j1) in zip(group, spans, strict=True):
            matrix, per_t = res.matrix[i0:i1, j0:j1].clone(), res.per_timestep[i0:i1, j0:j1].clone()
            record = {"id": item.id, "kind": item.kind, "scores": record_scores(item, matrix), "label": item.label,
                      "tags": item.tags, "dropped": item.dropped, "kept": item.kept,
                      **({"classes": item.classes} if item.classes is not None else {})}
            if racing is not None:
                record["rows"] = sum(racing["rows_per_image"][i0:i1])
                record["plan_end"] = all(racing["plan_end"][i0:i1])
                record["rows_full"] = _item_rows(item, len(plan), empty_row)
            state.done[idx] = (matrix, per_t, record)


def _prefetch(items: list[Item], pool: ThreadPoolExecutor):
    """Yield futures of (item as scored, its decoded images), keeping PREFETCH decodes in flight."""
    futures: list[Future] = []
    for n in range(len(items)):
        while len(futures) < min(PREFETCH, len(items) - n):
            futures.append(pool.submit(_prepare, items[n + len(futures)]))
        yield futures.pop(0)


def repeated_images(items: list[Item]) -> int:
    """How many of the items' images repeat an earlier one: the same file (or alternatives) and crop
    box. In-memory images (PIL) are not compared."""
    seen, repeats = set(), 0
    for item in items:
        for n, img in enumerate(item.images):
            if isinstance(img, (str, Path, tuple)):
                key = (str(img), item.crops[n] if item.crops else None)
                repeats += key in seen
                seen.add(key)
    return repeats


def _model_record(model, digest: str) -> dict:
    """What a results record says of the model: where it came from, ``digest`` of every weight (a merged
    adapter or one changed weight changes it), family, dtype, device, and the versions."""
    import platform

    return {"source": model.source, "digest": digest, "family": model.family,
            "num_train_timesteps": int(model.num_train_timesteps),
            "dtype": str(model.dtype).replace("torch.", ""), "device": str(model.device), **lcm_record(model),
            "versions": {"fastitm": __version__, "torch": torch.__version__, "python": platform.python_version()}}


class _Progress:
    """Per-item results of this rank, saved atomically to its checkpoint file and reloaded on resume.
    A file made for another task, data, options, plan or model is refused, naming what differs.

    ``fields``: the run's identity, one digest per named part (:func:`_run_fields`). ``weights`` [T] or
    None: the timestep weights the stored matrices were combined with; a resume with other weights
    recombines them from the stored per-timestep scores (what a fresh run computes, bit for bit), so
    ``--weights`` alone does not block a resume (racing and elimination put the weights in ``fields``:
    there they decided which rows ran)."""

    def __init__(self, path: Path | None, fields: dict[str, str], weights: torch.Tensor | None = None,
                 items: list | None = None) -> None:
        self.path, self.fields, self.weights = path, fields, weights
        self.done: dict[int, tuple[torch.Tensor, torch.Tensor, dict]] = {}
        self.skipped: dict[int, dict] = {}
        self.no_negative: dict[int, dict] = {}  # items whose every candidate is identical to the true one
        if path is not None and path.exists():

            try:
                data = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as e:
                raise CheckpointError(f"{path} is not a fastitm eval checkpoint ({type(e).__name__}); pass "
                                      "another --checkpoint") from None
            if not isinstance(data, dict) or not isinstance(data.get("fields"), dict):
                raise CheckpointError(f"{path} is not a fastitm eval checkpoint of this version (no run identity "
                                      "in it); pass another --checkpoint")
            theirs = data["fields"]
            differ = [k for k in sorted(set(fields) | set(theirs)) if fields.get(k) != theirs.get(k)]
            if differ:
                # "its plan differs", but "its items differ", "its options differ", "its plan, model differ"
                verb = "differs" if len(differ) == 1 and not differ[0].endswith("s") else "differ"
                raise CheckpointError(f"eval checkpoint {path} belongs to another run: its {', '.join(differ)} "
                                      f"{verb} from this one's; pass another --checkpoint, or rerun with the "
                                      "options it was made with")
            self.done, self.skipped, self.no_negative = data["done"], data["skipped"], data["no_negative"]
            if not _same_weights(data.get("weights"), weights):
                self._recombine(items)

    def _recombine(self, items) -> None:
        """The stored items' scores under this run's weights, from their per-timestep scores."""

        for idx, (_, per_t, record) in list(self.done.items()):
            matrix = weighted_mean(per_t, self.weights)
            self.done[idx] = (matrix, per_t, {**record, "scores": record_scores(items[idx], matrix)})

    def save(self) -> None:
        if self.path is None:
            return
        import os
        import tempfile

        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save({"fields": self.fields, "weights": self.weights, "done": self.done, "skipped": self.skipped,
                        "no_negative": self.no_negative}, f)
        os.replace(tmp, self.path)


def _same_weights(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _run_fields(task, data, method, options, plan, digest: str, items) -> dict[str, str]:
    """The identity of an eval run, one digest per part, so that a refusal can name what differs:
    task, data (the resolved path), method, options (method options, preset and plan choices, racing,
    and the weights where they decide which rows run), plan (timesteps, seed, scheme, latents, the
    noise), items (ids and candidates: split, limit, selection), the classify task's prompts and model
    (every weight)."""
    import hashlib

    def digest_of(*parts) -> str:
        h = hashlib.sha256()
        for part in parts:
            h.update(repr(part).encode() + b"\0")
        return h.hexdigest()

    noise = hashlib.sha256()
    hash_tensor(noise, plan.noise)
    return {"task": digest_of(task), "data": digest_of(str(Path(data).resolve())), "method": digest_of(method),
            "options": digest_of(sorted((k, repr(v)) for k, v in options.items())),
            "plan": digest_of(plan.describe(), noise.hexdigest()),
            "items": digest_of([(i.id, i.candidates, i.kept) for i in items]), "model": digest,
            # the classify task's prompts and classes (shared by every item): another prompt file differs
            **({"prompts": digest_of(items[0].texts, items[0].classes, [i.label for i in items])}
               if items and items[0].classes is not None else {})}


def run(task: str, data: str | Path, *, model: Any = None, method: str | None = None, timesteps: int = 10,
        seed: int = 0, split: str | None = None, limit: int | None = None, skip_bad: bool = False,
        backend: str = "auto", batch_size: int | None = None, progress: bool | None = None,
        checkpoint: str | Path | None = None, checkpoint_every: float = 60.0, adaptive: Any = None,
        stream: int = STREAM_BATCHES, weights: Any = None, select: Any = None, image_cache: bool = False,
        compile: bool | None = False, fewshot: float | None = None, prompts: str | Path | None = None,
        **options: Any) -> EvalReport:
    """Evaluate ``model`` on a benchmark task read from ``data`` (see :data:`fastitm.evaluate.TASKS`).

    ``options`` are :func:`fastitm.score`'s: method options, ``preset``, ``resize``, ``latent``,
    ``scheme``, ``noise``. ``method`` defaults to diffusion_itm (pets: diffusion_classifier with
    adaptive elimination, see :func:`task_defaults`); its ``normalize`` to False where every item
    chooses among one image's texts (:func:`text_choice_only`: the same choices and metrics, without
    the empty prompt's row), else True.

    Distributed: when a torch.distributed process group with several ranks is initialised
    (``torchrun``), each rank scores a contiguous shard of the items and every rank returns the same
    full report (each item exactly once). ``checkpoint``: a file (per rank: ``<file>.rank<r>-of-<n>``)
    where finished items are saved every ``checkpoint_every`` seconds, on errors and on Ctrl-C;
    rerunning resumes with only the missing items. ``limit``: score only the first N items;
    ``select``: only these items (indices into the task's item list, after ``limit``), or a function
    of that list returning them (how :func:`fastitm.evaluate.calibrate` draws its sample without
    reading the task twice).
    ``skip_bad``: an unreadable image skips its item (listed in ``report.skipped``) instead of
    stopping the run.

    Items are scored ``stream`` denoiser batches' worth at a time: one engine call over several items
    (their images and texts side by side, each image scored only against its own item's texts through
    ``pairs=``), so batches stay full across item boundaries; each item's scores are what scoring it
    alone gives (to float rounding: CPU kernels may sum in another order in another batch). The calls
    are fixed by the item list (ranks get whole calls, a resumed run recomputes whole calls), so the
    report is the same to the bit with any number of ranks and after any interruption. Checkpoints
    save per finished item; a Ctrl-C loses at most the call in flight. With sampled latents
    (``latent="sample"`` and its variant), whose seeds follow an image's position in its call, each
    item gets a call of its own.

    ``adaptive``: paired racing (``True`` or a dict, see :func:`fastitm.score`): among the texts of the
    image in text-choice items (ARO, CLEVR, SugarCrepe, Pets, ...), among the images of the text in
    image-choice items (Flickr30k image retrieval, SVO, ...); Winoground items (both directions) run the full
    plan. Each item record gets ``rows`` (denoiser rows spent), ``rows_full`` (what its full plan would
    spend) and ``plan_end`` (whether it ran every timestep); a text racing dropped scores -inf in the
    metrics and ``null`` in the record's ``scores``.

    ``prompts``: the classify task's prompt CSV (``prompt,classname,classidx``; default: "a photo of a
    <class>." from the dataset's class names; :mod:`fastitm.evaluate.tasks_classify`).

    ``fewshot``: a fraction (0.05 in the Discffusion paper): score only the task's few-shot test part,
    the items :func:`fastitm.evaluate.fewshot.fewshot` leaves out of training (``fastitm finetune
    --fewshot`` trains on the others); ``report.stats["fewshot"]`` records the split.

    ``compile``: None decides the compile lever from this rank's rows before the first is scored
    (:func:`fastitm.models.speed.auto_compile`: the command line's default; said on stderr when on, recorded in
    ``report.stats["compile"]``); False leaves the model as it is (compile it with ``load_model`` to force).

    ``image_cache``: share each image's latent and unconditional rows across the run's engine calls
    (:class:`fastitm.ImageCache`), for tasks whose items share images (Flickr30k image retrieval:
    each image is a candidate of about ten captions; ImageCoDe's sets and CLEVR's images, several
    items each). An image's rows are computed once per process instead of once per item. The reused
    rows equal recomputed ones to float rounding only, because they were computed in another batch. So
    the report no longer matches to the bit across numbers of ranks or after a resume, because which
    rows are reused depends on what the process scored before. ``report.stats`` counts
    ``unet_rows_reused`` and ``vae_images``.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int, got {limit!r}")
    if isinstance(stream, bool) or not isinstance(stream, int) or stream < 1:
        raise ValueError(f"stream must be a positive int (denoiser batches per engine call), got {stream!r}")
    race = RaceOptions.parse(adaptive)
    if method is None:
        defaults = task_defaults(task, timesteps)
        if race is not None:  # racing replaces a task's default elimination schedule (Pets)
            defaults.pop("elimination", None)
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
    if image_cache and choices["latent"] != "mean":
        why = " (the published preset's)" if preset == "published" and options.get("latent") is None else ""
        raise ValueError(f"image_cache shares posterior-mean latents only; this run samples its latents "
                         f"(latent={choices['latent']!r}{why}), seeded by each image's position, so nothing could "
                         "be reused: drop the image cache, or pass latent='mean' (--latent mean)")
    if fewshot is not None:  # the protocol's test part: never an item its training part holds

        part = fewshot_split(task, data, fewshot, split, preset=options.get("preset"))
        items, fewshot_record = part.test, part.record
    else:
        items, fewshot_record = load_task(task, data, split, preset=options.get("preset"), prompts=prompts), None
    if limit:
        items = items[:limit]
    if callable(select):
        select = select(items)
    if select is not None:
        select = sorted({int(n) for n in select})
        if not select or select[0] < 0 or select[-1] >= len(items):
            raise ValueError(f"select must name items 0..{len(items) - 1} of {task} (got {len(select)} indices"
                             + (f", {select[0]}..{select[-1]}" if select else "") + ")")
        items = [items[n] for n in select]
    if model is None:
        model = load_model()
    if not isinstance(model, Model):
        raise TypeError(f"model must be a fastitm Model (see fastitm.load_model), got {type(model).__name__}")
    model.spec.check_method(spec.name)
    auto_raw = text_choice_only(spec.name, options, items)
    if auto_raw:
        plan_options["normalize"] = False
        spec = resolve_method(spec.name, {**spec.options, "normalize": False})
    plan = shared_plan(model, method, timesteps, seed, plan_options)
    w = resolve(weights, plan.timesteps, model.num_train_timesteps)  # a bad table fails before any scoring
    if any(i.kind in ("image", "group") for i in items) and method == "diffusion_itm" \
            and plan_options.get("normalize") is False:
        raise ValueError("choosing among images needs normalize=True for diffusion_itm (the unconditional "
                         "error makes scores of different images comparable)")

    ckpt = None
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        if dist.is_distributed():
            ckpt = ckpt.with_name(f"{ckpt.name}.rank{dist.rank()}-of-{dist.world_size()}")
        if not ckpt.parent.is_dir():
            raise FileNotFoundError(f"checkpoint folder {ckpt.parent} does not exist")
    check_not_with_elimination(race, plan_options.get("elimination"))  # before any model work
    # Weights decide which rows run only under racing or elimination; otherwise a resume recombines.
    decides = race is not None or bool(plan_options.get("elimination"))
    key_options = {**plan_options, **({"adaptive": vars(race)} if race is not None else {}),
                   **({"weights": describe(weights)} if w is not None and decides else {})}
    digest = model_digest(model)  # every weight hashed once: the checkpoint's key and the report's record
    with ExitStack() as held_checkpoint:
        if ckpt is not None:  # one run per checkpoint file: a second is refused, naming the holder

            held_checkpoint.enter_context(checkpoint_lock(ckpt))
        state = _Progress(ckpt, _run_fields(task, data, method, key_options, plan, digest, items) if ckpt else {},
                          weights=w, items=items)
        last_save = time.monotonic()
        show = progress_disabled(progress) if dist.rank() == 0 else True
        bs = batch_size if batch_size is not None else default_batch_size(model)
        per_call = 1 if plan.latent != "mean" else stream * bs  # rows per engine call (sampled latents: per item)
        # Windows of consecutive items, about per_call rows each, fixed by the item list alone: each is one
        # engine call whatever the number of ranks (ranks get whole windows), and a resumed run recomputes
        # whole windows, so the floats do not depend on how the run was split or interrupted.
        _, my_windows = dist.shard_items(_windows(items, len(plan), spec.needs_uncond, per_call))
        window_of = {i: w for w, (a, b) in enumerate(my_windows) for i in range(a, b)}
        compiled = model.levers.get("compile") or None
        if compile is None:  # from the rows of this rank's engine calls, before any is scored

            rows = [sum(_item_rows(i, len(plan), spec.needs_uncond) for i in items[a:b]) for a, b in my_windows]
            compiled = auto_compile(model, rows, bs, rounds=decides, say=dist.rank() == 0)
        todo = [(i, items[i]) for i in window_of if i not in state.done and i not in state.skipped
                and i not in state.no_negative]
        work = {"unet_rows": 0, "batches": 0, "calls": 0, "vae_images": 0, "unet_rows_reused": 0, "text_encodes": 0}
        # Items that all share their texts (the classify task's prompts) encode them once per run. Only
        # then: the first call encodes every text in the same batch on every rank and after a resume, so
        # the report stays the same to the bit; texts repeated by some items only are encoded per call.
        texts_once = TextCache() if len({tuple(i.texts) for i in items}) == 1 else None
        cache = None
        if image_cache:

            cache = ImageCache()
        # the resolved table, so a weights file is read once, not at every engine call
        call_options = {**plan_options, **({"weights": dict(zip(plan.timesteps.tolist(), w.tolist(), strict=True))}
                                           if w is not None else {})}
        window: list = []

        def flush():
            if window:
                _score_window(window, state, work, score, model=model, method=method, plan=plan, backend=backend,
                              batch_size=bs, race=race, options=call_options, empty_row=spec.needs_uncond,
                              image_cache=cache,
                              text_cache=texts_once)
                bar.update(dist.world_size() * len(window))
                window.clear()

        try:
            with terminate_as_interrupt(), ThreadPoolExecutor(max_workers=2) as pool, \
                    tqdm(total=len(items), initial=max(0, len(items) - len(todo) * dist.world_size()),
                         desc=f"fastitm eval {task}", unit="item", disable=show, dynamic_ncols=True) as bar:
                for (idx, item), fut in zip(todo, _prefetch([it for _, it in todo], pool), strict=True):
                    try:
                        item, images = fut.result()
                    except BadImage as e:
                        if not skip_bad:
                            raise BadImage(f"{e} (pass --skip-bad / skip_bad=True to skip such items)") from None
                        state.skipped[idx] = {"id": item.id, "error": str(e)}
                        bar.update(dist.world_size())
                        continue
                    if not item.has_negative:  # left out of the metrics, counted
                        state.no_negative[idx] = {"id": item.id, "dropped": item.dropped}
                        bar.update(dist.world_size())
                        continue
                    if window and window_of[window[0][0]] != window_of[idx]:
                        flush()
                        if time.monotonic() - last_save >= checkpoint_every:
                            state.save()
                            last_save = time.monotonic()
                    window.append((idx, item, images))
                flush()
        finally:  # finished work is kept on errors, Ctrl-C and SIGTERM alike
            state.save()
    parts = dist.gather((state.done, state.skipped, state.no_negative, work))
    done: dict = {}
    skipped_all: dict = {}
    no_negative: dict = {}
    work = {k: sum(p[3][k] for p in parts) for k in work}  # every rank's engine work
    for d, sk, nn, _ in parts:
        done.update(d)
        skipped_all.update(sk)
        no_negative.update(nn)
    order = sorted(done)
    # as scored: the label counts the candidates left after dropping identical ones
    scored = [replace(items[n], label=done[n][2]["label"], dropped=done[n][2]["dropped"]) for n in order]
    matrices = [done[n][0] for n in order]
    per_t = [done[n][1] for n in order]
    records = [done[n][2] for n in order]
    skipped = [skipped_all[n] for n in sorted(skipped_all)]
    if not scored:
        raise DataError(f"no item of {data} could be scored ({len(skipped)} skipped as unreadable, "
                        f"{len(no_negative)} with every candidate identical to the true one)")

    opts = dict(spec.options)
    choices.update(latent=plan.latent, scheme=plan.scheme, noise=plan.noise_mode)
    if auto_raw:  # said in the report: the options show normalize False, this says why
        choices["normalize"] = "off: every item chooses among one image's texts"
    metrics = task_metrics(scored, matrices)
    if any(i.label is not None or i.kind == "group" for i in scored):
        metrics.update(identical_counts(records, [no_negative[n] for n in sorted(no_negative)]))
    eliminated = bool(opts.get("elimination")) or race is not None  # per-timestep scores are partial
    if race is not None:
        opts["adaptive"] = dict(vars(race))
    if w is not None:
        opts["weights"] = describe(weights)
    if not eliminated:  # every timestep of every candidate: report.reweight recomputes from these
        for r, p in zip(records, per_t, strict=True):
            r["per_timestep"] = p.tolist()
    fill = work["unet_rows"] / (work["batches"] * bs) if work["batches"] else None
    return EvalReport(task=task, method=spec.name, options=jsonable(opts), metrics=metrics,
                      items=records, curve=[] if eliminated else curve(scored, per_t, w), plan=plan.describe(),
                      racing=[] if eliminated else racing_curve(scored, per_t, w=w),
                      timesteps=[] if eliminated else per_timestep_diagnostics(scored, per_t,
                                                                               plan.timesteps.tolist()),
                      data=str(data), preset=preset, choices=choices, skipped=skipped,
                      stats={"items": len(scored), "skipped": len(skipped), "no_negative": len(no_negative),
                             "backend": choose(backend, [torch.empty(0, device=model.device)], "fastitm eval"),
                             "ranks": dist.world_size(), "batch_size": bs, "engine_calls": work["calls"],
                             "unet_rows": work["unet_rows"], "batches": work["batches"],
                             "vae_images": work["vae_images"], "text_encodes": work["text_encodes"],
                             "image_cache": bool(image_cache), "empty_prompt_row": spec.needs_uncond,
                             "repeated_images": repeated_images(scored),
                             **({"unet_rows_reused": work["unet_rows_reused"]} if image_cache else {}),
                             "batch_fill": None if fill is None else round(fill, 4),
                             **({"compile": compiled} if compiled else {}),
                             **({"fewshot": fewshot_record} if fewshot_record else {}),
                             "wall_s": round(time.perf_counter() - started, 2)},
                      model=_model_record(model, digest))
