"""The scoring engine: the reference computation, reorganised to share work and use the fused ops.

- Each image is encoded by the VAE once, each text and the empty prompt by the text encoder once.
- UNet rows (image i, timestep k, text j or the unconditional row) are packed across images,
  timesteps and texts into batches of ``batch_size``; the unconditional row of (i, k) is computed
  once and reused by every text, and only when the method needs it.
- Errors go through the fused error reduction straight into the per-timestep score buffer;
  Discffusion's pooling comes from the fused cross-attention processor, never from attention maps.
- On CUDA the UNet forward can be a replayed CUDA graph (:mod:`fastitm.engine.cuda_graphs`, off by default).
- Diffusion Classifier's adaptive elimination computes only the rows its rounds need.
- With an :class:`fastitm.ImageCache`, images seen in earlier calls skip the VAE and their held
  unconditional rows; an image repeated within the call is encoded once and its rows copied.
- Long runs: a progress bar in rows per second; Ctrl-C finishes the batch in flight and stops with
  :class:`Interrupted`; with ``checkpoint=path`` the finished cells are saved as the run goes and a
  rerun with the same inputs and plan resumes without recomputing them.
Memory is bounded by the batch size, whatever the numbers of images, texts and timesteps.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch

from ..core.interrupts import deferred
from ..core.locks import held
from ..core.methods import check_rounds, elimination_stages, spread_order
from ..core.result import ScoreResult
from ..core.weights import nan_weighted_mean, weighted_mean
from ..models.families import take_cond
from ..models.speed import default_batch_size
from ..ops._backend import choose
from ..ops.error_reduce import error_reduce
from . import sharing
from .attention import lse_pooling
from .common import (
    Run,
    encode_conditioning,
    encode_images,
    encode_posterior,
    hash_tensor,
    noisy_latents,
    progress_disabled,
    target,
    timestep_latents,
    to_device,
)
from .cuda_graphs import UNetRunner, graphs_enabled
from .image_cache import copy_repeat, repeats_last
from .racing import look

CHECKPOINT_VERSION = 3
_CHECKPOINT_KEYS = ("version", "fingerprint", "per_t", "uncond", "attn_uncond", "done")


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C after finishing the batch in flight.

    ``partial``: a :class:`ScoreResult` whose matrix holds the pairs finished on every timestep (NaN
    elsewhere); ``checkpoint``: where the finished cells were saved (None without ``checkpoint=``);
    ``rows_done`` / ``rows_total``: UNet rows computed so far / in all.
    """

    def __init__(self, partial: ScoreResult, checkpoint: str | None, rows_done: int, rows_total: int) -> None:
        where = f"; finished cells saved to {checkpoint}, rerun with the same checkpoint to resume" if checkpoint \
            else "; pass checkpoint=PATH (--checkpoint) to keep partial work across runs"
        super().__init__(f"interrupted after {rows_done} of {rows_total} UNet rows{where}")
        self.partial, self.checkpoint, self.rows_done, self.rows_total = partial, checkpoint, rows_done, rows_total


def image_rows(i: int, texts: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """[len(ks) * len(texts), 3] int64 rows (image i, text or -1, timestep), grouped by timestep
    with the texts in the given order (the unconditional -1 first when present)."""
    k, j = torch.meshgrid(ks, texts, indexing="ij")
    return torch.stack([torch.full_like(k, i).flatten(), j.flatten(), k.flatten()], dim=1)


def stage_chunks(alive: torch.Tensor, ks: list[int], needs_uncond: bool, order: list[int] | None = None,
                 before: Callable[[int], None] | None = None) -> Iterator[torch.Tensor]:
    """Rows for the texts ``alive[i]`` of every image on timesteps ``ks``, one image at a time (in
    ``order``, default 0..N-1), so no table of all N * M * T rows is ever built. ``before(i)`` runs
    when image i's rows are asked for, after every batch before them has run."""
    ks_t = torch.tensor(ks, dtype=torch.long)
    if not len(ks_t):
        return
    for i in range(alive.shape[0]) if order is None else order:
        texts = alive[i].nonzero().flatten()
        if not len(texts):  # nothing asked of this image (pairs=) or nothing left: not even its empty row
            continue
        if before is not None:
            before(i)
        if needs_uncond:
            texts = torch.cat([torch.tensor([-1]), texts])
        yield image_rows(i, texts, ks_t)


def pack(chunks: Iterator[torch.Tensor], bs: int) -> Iterator[torch.Tensor]:
    """Re-cut a stream of row chunks into batches of exactly ``bs`` rows (the last may be short)."""
    buf: list[torch.Tensor] = []
    n = 0
    for c in chunks:
        if not len(c):
            continue
        buf.append(c)
        n += len(c)
        if n >= bs:
            rows = torch.cat(buf)
            full = (n // bs) * bs
            yield from rows[:full].split(bs)
            buf, n = [rows[full:]], n - full
    if n:
        yield torch.cat(buf)


def fingerprint(run: Run) -> str:
    """A digest of everything a score depends on: pixels, texts, method and options, the plan, the
    model's dtype and schedule, and every byte of every parameter and buffer of its three networks
    (a merged LoRA or a fine-tuned layer changes it). A checkpoint resumes only on a match."""
    h = hashlib.sha256()

    def add(x) -> None:
        if isinstance(x, torch.Tensor):
            hash_tensor(h, x)
        else:
            h.update(repr(x).encode())
        h.update(b"\0")

    m, plan = run.model, run.plan
    add(CHECKPOINT_VERSION)
    add(run.pixels)
    add(run.texts)
    add((run.spec.name, sorted(run.spec.options.items())))
    add(plan.timesteps)
    add(plan.noise)
    add((plan.latent, plan.seed, plan.noise_mode))
    add(run.pairs)
    if run.race is not None:  # racing computes other cells (added only then: other runs' keys are unchanged)
        add(("race", sorted(vars(run.race).items())))
    add((m.family, str(m.dtype), m.prediction, m.scaling_factor))
    add(sorted((k, v) for k, v in m.scheduler.config.items() if not k.startswith("_")))
    add(model_digest(m))
    return h.hexdigest()


def model_digest(model) -> str:
    """sha256 over every byte of every parameter and buffer of the denoiser, VAE and text encoders
    (with their names), the family and the dtype: a merged LoRA or one fine-tuned weight changes it."""
    h = hashlib.sha256(f"{model.family}:{model.dtype}".encode())
    for module in model.networks:
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            h.update(name.encode())
            hash_tensor(h, p)
    return h.hexdigest()


class CheckpointError(ValueError):
    """A checkpoint file cannot be used for this run; the message says why and what to do."""


class _State:
    """What a run has computed: per-timestep scores [N, M, T], unconditional errors [N, T], the
    unconditional rows' attention terms [N, T] (``mix_uncond``), and which cells are finished,
    done [N, M + 1, T] (column M: the unconditional row)."""

    def __init__(self, N: int, M: int, T: int, device: torch.device) -> None:
        self.per_t = torch.zeros(N, M, T, dtype=torch.float32, device=device)
        self.uncond = torch.zeros(N, T, dtype=torch.float32, device=device)
        self.attn_uncond = torch.zeros(N, T, dtype=torch.float32, device=device)
        self.done = torch.zeros(N, M + 1, T, dtype=torch.bool)
        self.live: torch.Tensor | None = None  # racing's survivors [N, M] (derived from per_t: not saved)
        self.reused: torch.Tensor | None = None  # [N, T] unconditional cells from an ImageCache (not computed)

    def save(self, path: Path, key: str) -> None:
        # A temporary file of our own in the same folder, then an atomic rename: an interruption
        # never leaves a half-written checkpoint, and two writers never share a temporary file.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save({"version": CHECKPOINT_VERSION, "fingerprint": key, "per_t": self.per_t.cpu(),
                            "uncond": self.uncond.cpu(), "attn_uncond": self.attn_uncond.cpu(),
                            "done": self.done}, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self, path: Path, key: str) -> int:
        try:
            with warnings.catch_warnings():  # torch's own notes on foreign pickles are noise here
                warnings.simplefilter("ignore")
                data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file
            raise CheckpointError(f"{path} is not a fastitm checkpoint (it cannot be read as one: "
                                  f"{type(e).__name__}); pass another checkpoint path") from None
        if not isinstance(data, dict) or any(k not in data for k in _CHECKPOINT_KEYS):
            missing = [k for k in _CHECKPOINT_KEYS if not isinstance(data, dict) or k not in data]
            raise CheckpointError(f"{path} is not a fastitm checkpoint (missing {missing}); pass another "
                                  "checkpoint path")
        if data["version"] != CHECKPOINT_VERSION:
            raise CheckpointError(f"{path} is a fastitm checkpoint of format {data['version']!r}, this version "
                                  f"reads format {CHECKPOINT_VERSION}; pass another checkpoint path")
        if data["fingerprint"] != key or tuple(data["done"].shape) != tuple(self.done.shape):
            raise CheckpointError(f"checkpoint {path} belongs to another run (different images, texts, method, "
                                  f"options, plan or model weights); pass another checkpoint path")
        self.per_t.copy_(data["per_t"])
        self.uncond.copy_(data["uncond"])
        self.attn_uncond.copy_(data["attn_uncond"])
        self.done.copy_(data["done"])
        return int(self.done.sum())


def checkpoint_lock(path: Path):
    """Hold ``<path>.lock`` for the run: a second run on the same checkpoint is refused at once."""
    return held(path.with_name(path.name + ".lock"), lambda holder: CheckpointError(
        f"checkpoint {path} is in use by another run (process {holder}); wait for it to finish or pass another "
        "checkpoint path"))


def _stages(run: Run, state: _State, same: torch.Tensor | None = None) -> Iterator[Iterator[torch.Tensor]]:
    """The rows to compute, stage by stage, each a stream of per-image chunks. Without elimination,
    one stage of every row. With it, one stage per round (:func:`fastitm.core.methods.elimination_stages`)
    and a last one for the survivors; each is generated after the previous stage's errors are in
    ``state``, and survivors are ranked by the mean over every timestep evaluated so far.

    ``same`` [N] (with an ImageCache): the first index of each image's pixels in the call. Then every
    stage runs the images that others repeat first and the repeats last, and a repeat's unconditional
    cells are copied from its first occurrence's where those have run by the time its rows are asked
    for (:func:`fastitm.engine.image_cache.copy_repeat`); they run again otherwise."""
    hook: dict = {}
    if same is not None:
        def copy(i: int) -> None:
            copy_repeat(i, same, state.uncond, state.attn_uncond, state.done[:, -1, :], state.reused)

        hook = {"order": repeats_last(same), "before": copy}
    if run.race is not None:
        yield from _race_stages(run, state, hook)
        return
    T = len(run.plan)
    spec = run.spec
    rounds = spec.options.get("elimination")
    alive = run.requested().clone()
    stages = elimination_stages(T, rounds, spec.options.get("order", "spread"))
    seen: list[int] = []
    for r, ks in enumerate(stages):
        yield stage_chunks(alive, ks, spec.needs_uncond, **hook)
        if r < len(stages) - 1:
            seen += ks
            alive = survivors(state.per_t[:, :, seen].cpu().mean(dim=2), alive, rounds[r][1])


def _race_stages(run: Run, state: _State, hook: dict) -> Iterator[Iterator[torch.Tensor]]:
    """Racing (:mod:`fastitm.engine.racing`): the plan's timesteps in spread order, one stage per round; after
    each, :func:`fastitm.engine.racing.look` (as :func:`fastitm.engine.racing.simulate` does) decides each
    race on the per-timestep scores computed so far: an image's requested texts (``over="texts"``) or a text's
    requested images (``over="images"``). A race stops when ``keep`` candidates are left, when settled or
    for futility. Decisions are a function of those scores alone (what a race's settled drops spent
    follows from the looks before), so batching, resuming and sharding take the same ones.
    ``state.live``: the survivors.
    ``hook``: :func:`stage_chunks`' ``order`` and ``before`` for every round (see :func:`_stages`)."""

    opts, T = run.race, len(run.plan)
    order = spread_order(T)
    w_eval = None if run.weights is None else run.weights[order]  # the timestep weights in evaluation order
    requested = run.requested()
    state.live = requested.clone()
    by_image = opts.over == "texts"

    def races(x: torch.Tensor) -> torch.Tensor:
        """[images, texts, ...] -> [races, candidates, ...]: a view (writes go through)."""
        return x if by_image else x.transpose(0, 1)

    req, live_v = races(requested), races(state.live)
    racing = req.sum(dim=1) > opts.keep  # races with something to decide
    # A race with nothing to decide (no more candidates than `keep`: one text per image, a matched
    # pair) has no test that could stop it: it runs the whole plan, as without racing.
    stopped = torch.zeros_like(racing)
    spent = [0.0] * len(racing)  # per race: what its settled drops risked (racing.settled_drops)
    start = 0
    for stop in opts.looks(T) + [T]:
        # Every round runs the live candidates of every race not stopped by a decision.
        alive = state.live & (~stopped[:, None] if by_image else ~stopped[None, :])
        yield stage_chunks(alive, order[start:stop], run.spec.needs_uncond, **hook)
        start = stop
        if stop == T:
            break
        seen = torch.tensor(order[:stop])
        per_t = races(state.per_t.cpu())
        done = races(state.done[:, : state.per_t.shape[1]].cpu())  # the text cells computed (not the empty prompt's)
        w_seen = None if w_eval is None else w_eval[:stop]
        for g in racing.nonzero().flatten().tolist():
            cand = req[g].nonzero().flatten()
            live_v[g, cand], spent[g], stop_now = look(per_t[g, cand][:, seen], live_v[g, cand], T, opts,
                                                       done[g, cand][:, seen], w_seen, w_eval, spent[g])
            if stop_now:
                racing[g] = False
                stopped[g] = True


def racing_stats(run: Run, state: _State) -> dict:
    """Per image: denoiser rows spent (the unconditional row included), the timesteps it ran and
    whether that was the plan's end; the options; texts dropped in all."""
    T = len(run.plan)
    done = state.done
    if state.reused is not None:  # rows an ImageCache supplied were not spent here
        done = done.clone()
        done[:, -1, :] &= ~state.reused
    steps = done.any(dim=1).sum(dim=1)
    live = state.live if state.live is not None else run.requested()
    return {"options": dict(vars(run.race)), "rows_per_image": done.sum(dim=(1, 2)).tolist(),
            "timesteps_per_image": steps.tolist(), "plan_end": (steps == T).tolist(),
            "dropped": int((run.requested() & ~live).sum())}


def survivors(scores: torch.Tensor, alive: torch.Tensor, keep: int) -> torch.Tensor:
    """[N, M] partial scores (higher better) -> the ``keep`` best alive texts of each image (ties:
    the lower index)."""
    s = scores.masked_fill(~alive, float("-inf"))
    # A stable descending sort keeps the lower index first among equal scores.
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :keep]
    out = torch.zeros_like(alive)
    out.scatter_(1, order, True)
    return out & alive


def _result(run: Run, state: _State, backend: str, stats: dict, complete: bool) -> ScoreResult:
    M = len(run.texts)
    per_t = state.per_t.cpu().clone()
    if run.spec.mix_uncond:  # each text's term is (A_text + A_empty) / 2; the text half is in per_t
        per_t += 0.5 * state.attn_uncond.cpu()[:, None, :]
    done = state.done[:, :M, :] & state.done[:, M : M + 1, :] if run.spec.mix_uncond else state.done[:, :M, :]
    per_t[~done] = float("nan")
    finished = done.all(dim=2)
    matrix = weighted_mean(per_t, run.weights)
    requested = run.requested()
    matrix = matrix.masked_fill(~finished, float("nan"))  # unfinished, or not asked for (pairs=)
    if run.spec.options.get("elimination") and complete:
        matrix = matrix.masked_fill(~finished & requested, float("-inf"))  # eliminated candidates
    if run.race is not None:
        stats["racing"] = racing_stats(run, state)
        if complete:  # survivors: their (weighted) mean over the timesteps they ran; dropped texts: -inf
            partial = nan_weighted_mean(per_t, run.weights)
            matrix = torch.where(state.live, partial, torch.where(requested, float("-inf"), float("nan")))
    if complete:
        bad = int(torch.isnan(matrix[requested]).sum())
        if bad:  # never silently: NaN scores mean the model overflowed (e.g. fp16) or had NaN weights
            warnings.warn(f"{bad} of {int(requested.sum())} scores are NaN (the UNet or the pooling produced NaN or "
                          "inf: try dtype fp32/bf16, or check the model's weights)", RuntimeWarning, stacklevel=3)
    if run.weights is not None:
        stats["weights"] = run.weights_spec
    return ScoreResult(matrix=matrix, plan=run.plan, method=run.spec.name, options=dict(run.spec.options),
                       backend=backend, per_timestep=per_t, stats=stats, preset=run.preset,
                       choices=dict(run.choices), family=run.model.family, weights=run.weights)


@torch.no_grad()
def score_run(run: Run, *, backend: str = "auto", batch_size: int | None = None, progress: bool | None = None,
              checkpoint: str | os.PathLike | None = None, checkpoint_every: float = 60.0) -> ScoreResult:
    spec, device = run.spec, run.model.device
    N, M, T = run.pixels.shape[0], len(run.texts), len(run.plan)
    bs = default_batch_size(run.model) if batch_size is None else batch_size
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ValueError(f"batch_size must be a positive int, got {bs!r}")
    check_rounds(spec.options.get("elimination"), T)

    state = _State(N, M, T, device)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None:
        check_checkpoint_path(ckpt)
    # The backend the fused ops run on ("auto" resolved), recorded in the result.
    ran = choose(backend, [torch.empty(0, device=device, dtype=run.model.dtype)], "fastitm.score")
    with ExitStack() as outer:
        if ckpt is not None:
            outer.enter_context(checkpoint_lock(ckpt))
        key = fingerprint(run) if ckpt is not None else ""
        resumed = state.load(ckpt, key) if ckpt is not None and ckpt.exists() else 0
        return _score(run, state, ran, bs, progress, ckpt, key, resumed, checkpoint_every)


def check_checkpoint_path(ckpt: Path) -> None:
    """Refuse, before any work, a checkpoint path that cannot be written."""
    if ckpt.is_dir():
        raise CheckpointError(f"checkpoint path {ckpt} is a folder; give a file path, e.g. {ckpt / 'run.pt'}")
    if not ckpt.parent.is_dir():
        raise FileNotFoundError(f"checkpoint folder {ckpt.parent} does not exist")


@torch.no_grad()
def _score(run: Run, state: _State, backend: str, bs: int, progress: bool | None, ckpt: Path | None, key: str,
           resumed: int, checkpoint_every: float) -> ScoreResult:
    from tqdm.auto import tqdm

    model, plan, spec = run.model, run.plan, run.spec
    device, dtype = model.device, model.dtype
    N, M, T = run.pixels.shape[0], len(run.texts), len(plan)
    # Work sharing: every encoder call happens once. With latent="sample_per_timestep" the
    # posterior's mean and std are kept and each row's sample is drawn from them.
    per_timestep_latent = plan.latent == "sample_per_timestep"
    cache = run.image_cache
    why_not = cache.applies(run) if cache is not None else None
    cache_keys, first = cache.start(run) if cache is not None and why_not is None else (None, None)
    if per_timestep_latent:
        parts = [encode_posterior(model, run.pixels[a : a + bs]) for a in range(0, N, bs)]
        z_mean, z_std = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        vae_images = N
    elif cache_keys is not None:
        z, vae_images = cache.encode(run, cache_keys, first, bs)
    else:
        off = run.image_offset
        z = torch.cat([encode_images(model, run.pixels[a : a + bs], plan, first_index=off + a) for a in range(0, N, bs)])
        vae_images = N
    # rows: the M texts (+ the empty prompt); with a text cache only the texts it has not seen are encoded
    encoded = run.text_cache.encoded if run.text_cache is not None else 0
    emb = (run.text_cache.encode(model, run.texts, empty=spec.needs_uncond) if run.text_cache is not None
           else encode_conditioning(model, run.texts, empty=spec.needs_uncond))
    noise = plan.noise.to(device=device, dtype=dtype)
    timesteps = plan.timesteps.to(device)
    noise_target = model.spec.target_is_noise(model)
    flat_noise = noise.flatten(1)
    opts = spec.options
    text_weight = 0.5 if spec.mix_uncond else 1.0
    requested = run.requested()
    full_rows = T * (int(requested.sum()) + (int(requested.any(dim=1).sum()) if spec.needs_uncond else 0))
    computed = batches = 0
    use_graph = graphs_enabled(device)
    stats = {"unet_rows": 0, "unet_rows_full": full_rows, "resumed_cells": resumed, "vae_images": vae_images,
             "text_encodes": (run.text_cache.encoded - encoded if run.text_cache is not None
                              else M + (1 if spec.needs_uncond else 0)),
             "batch_size": bs, "cuda_graphs": use_graph}
    if cache is not None:
        stats["image_cache"] = why_not or "on"
    same = None  # with an image cache: each image's first index in the call (its repeats run last in each stage)
    if cache_keys is not None and spec.needs_uncond:  # the held unconditional cells are done before the first batch
        state.reused = cache.prefill(cache_keys, state.uncond, state.attn_uncond, state.done[:, M, :],
                                     requested.any(dim=1))
        same = first

    with ExitStack() as stack:
        stop = stack.enter_context(deferred())
        bar = stack.enter_context(tqdm(total=full_rows, desc=f"fastitm {spec.name}", unit="row",
                                       disable=progress_disabled(progress), dynamic_ncols=True))
        sink = None
        if spec.needs_attention:
            sink = stack.enter_context(lse_pooling(model.unet, opts["layers"], opts["pool"], opts["lam"], backend))
        runner = UNetRunner(model.unet, sink, bucket=bs, use_graph=use_graph, forward=model.spec.forward)
        # rows of one (image, timestep) cell share the UNet's text-free prefix, rows of one text the
        # cross-attention keys and values: computed once per batch (fastitm.engine.sharing)
        stats["row_sharing"] = sharing.disabled_reason(model.unet, use_graph=use_graph) or "on"
        share = stack.enter_context(sharing.RowSharing(model.unet)) if stats["row_sharing"] == "on" else None
        last_save = time.monotonic()
        bar.update(resumed + (0 if state.reused is None else int(state.reused.sum())))  # done: resumed, reused

        def cells(rows):  # index of the rows' cells in state.done (the unconditional row is column M)
            return rows[:, 0], rows[:, 1].where(rows[:, 1] >= 0, M), rows[:, 2]

        def todo(chunks):
            for c in chunks:  # skip the cells a checkpoint already holds
                yield c[~state.done[cells(c)]]

        for stage in _stages(run, state, same):
            for rc in pack(todo(stage), bs):
                r = to_device(rc, device)  # without waiting for the previous batch
                i, j, k = r[:, 0], r[:, 1], r[:, 2]
                t = timesteps[k]
                nk = noise[k]
                if per_timestep_latent:
                    zi = timestep_latents(model, z_mean[i], z_std[i], plan, rc[:, 0] + run.image_offset, rc[:, 2])
                else:
                    zi = z[i]
                x = noisy_latents(model, zi, nk, t)
                cond = take_cond(emb, torch.where(j < 0, M, j))
                if share is not None:  # keys: each row's (image, timestep) cell and its text
                    ci, cj, ck = cells(rc)
                    share.batch(ci * T + ck, cj, device)
                pred, pooled = runner(x, t, cond)
                if spec.needs_error:
                    if noise_target:  # the target is the plan's noise row: no per-row copy
                        tgt, row_target = flat_noise, k
                    else:
                        tgt, row_target = target(model, zi, nk, t).flatten(1), torch.arange(len(r), device=device)
                    if pred.dtype != tgt.dtype:  # under a caller's torch.autocast: compare in the target's dtype
                        pred = pred.to(tgt.dtype)
                    error_reduce(pred.flatten(1), tgt, row_target, i, j, k, state.uncond, per_t=state.per_t,
                                 err=spec.err, normalize=spec.needs_uncond, backend=backend)
                if pooled is not None:
                    # Every row adds into a cell, the other kind of row adding an exact zero: selecting
                    # rows by a mask would make the CPU wait for the GPU to count them.
                    text_rows = j >= 0
                    state.per_t.index_put_((i, j.clamp(min=0), k), torch.where(text_rows, text_weight * pooled, 0.0),
                                           accumulate=True)
                    if spec.mix_uncond:  # each cell's empty-prompt row runs once: adding to its 0 sets it
                        state.attn_uncond.index_put_((i, k), torch.where(text_rows, 0.0, pooled), accumulate=True)
                state.done[cells(rc)] = True
                computed += len(r)
                batches += 1
                bar.update(len(r))
                if ckpt is not None and time.monotonic() - last_save >= checkpoint_every:
                    state.save(ckpt, key)
                    last_save = time.monotonic()
                if stop[0]:
                    stats["unet_rows"], stats["batches"] = computed, batches
                    if ckpt is not None:
                        state.save(ckpt, key)
                    partial = _result(run, state, backend, stats, complete=False)
                    raise Interrupted(partial, str(ckpt) if ckpt else None, int(state.done.sum()), full_rows)
        bar.total = bar.n  # adaptive elimination skips rows: end the bar at what was needed
        bar.refresh()
    if ckpt is not None:
        state.save(ckpt, key)
    if state.reused is not None:
        # an empty-prompt row counts as reused where the call ran a text row of its image and timestep
        # (held cells of timesteps a race or an elimination never reached saved nothing)
        unused = state.reused & ~state.done[:, :M, :].any(dim=1)
        state.done[:, M, :] &= ~unused  # and are not this call's work: neither done nor saved
        state.reused &= ~unused
        stats["unet_rows_reused"] = int(state.reused.sum())
    if cache_keys is not None:
        cache.store(cache_keys, z, state.uncond, state.attn_uncond, state.done[:, M, :],
                    stats.get("unet_rows_reused", 0))
    stats["unet_rows"], stats["batches"] = computed, batches  # denoiser calls (stages re-cut their batches)
    if share is not None:  # the rows the shared parts ran, of unet_rows
        stats["prefix_rows"], stats["kv_rows"] = share.rows["prefix"], share.rows["kv"]
    stats["unet_rows_saved"] = full_rows - int(state.done.sum())
    if runner.pad or runner.padded_rows:  # a compiled denoiser: the short batches' padding rows (never read)
        stats["padded_rows"] = runner.padded_rows
    if runner.fallback and not use_graph:
        stats["compile_fallback"] = runner.fallback
    if use_graph:
        stats["cuda_graphs"] = runner.use_graph
        stats["graph_replays"] = runner.replays
        if runner.fallback:
            stats["cuda_graph_fallback"] = runner.fallback
    return _result(run, state, backend, stats, complete=True)
