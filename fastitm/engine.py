"""The scoring engine: the reference computation, reorganised to share work and use the fused ops.

- Each image is encoded by the VAE once, each text and the empty prompt by the text encoder once.
- UNet rows (image i, timestep k, text j or the unconditional row) are packed across images,
  timesteps and texts into batches of ``batch_size``; the unconditional row of (i, k) is computed
  once and reused by every text, and only when the method needs it.
- Errors go through the fused error reduction straight into the per-timestep score buffer;
  Discffusion's pooling comes from the fused cross-attention processor, never from attention maps.
- On CUDA the UNet forward is a replayed CUDA graph (:mod:`fastitm.cuda_graphs`).
- Diffusion Classifier's adaptive elimination computes only the rows its rounds need.
- Long runs: a progress bar in rows per second; Ctrl-C finishes the batch in flight and stops with
  :class:`Interrupted`; with ``checkpoint=path`` the finished cells are saved as the run goes and a
  rerun with the same inputs and plan resumes without recomputing them.
Memory is bounded by the batch size, whatever the numbers of images, texts and timesteps.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import torch

from .attention import lse_pooling
from .common import Run, encode_images, encode_texts, noisy_latents, progress_disabled, target
from .cuda_graphs import UNetRunner, graphs_enabled
from .methods import check_rounds, spread_order
from .ops.error_reduce import error_reduce
from .result import ScoreResult

CHECKPOINT_VERSION = 1


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


def default_batch_size(device: torch.device) -> int:
    return 32 if device.type == "cuda" else 8


def image_rows(i: int, texts: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """[len(ks) * len(texts), 3] int64 rows (image i, text or -1, timestep), grouped by timestep
    with the texts in the given order (the unconditional -1 first when present)."""
    k, j = torch.meshgrid(ks, texts, indexing="ij")
    return torch.stack([torch.full_like(k, i).flatten(), j.flatten(), k.flatten()], dim=1)


def stage_chunks(alive: torch.Tensor, ks: list[int], needs_uncond: bool) -> Iterator[torch.Tensor]:
    """Rows for the texts ``alive[i]`` of every image on timesteps ``ks``, one image at a time, so
    no table of all N * M * T rows is ever built."""
    ks_t = torch.tensor(ks, dtype=torch.long)
    if not len(ks_t):
        return
    for i in range(alive.shape[0]):
        texts = alive[i].nonzero().flatten()
        if needs_uncond:
            texts = torch.cat([torch.tensor([-1]), texts])
        if len(texts):
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
    model's dtype, schedule and (a sample of) its weights. A checkpoint resumes only on a match."""
    h = hashlib.sha256()

    def add(x) -> None:
        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu", torch.float32 if x.is_floating_point() else torch.int64).contiguous()
            h.update(str(tuple(x.shape)).encode())
            h.update(x.numpy().tobytes())
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
    add((plan.latent, plan.seed))
    add((str(m.dtype), m.scheduler.config.prediction_type, m.scaling_factor))
    add(m.scheduler.alphas_cumprod)
    for module in (m.unet, m.vae, m.text_encoder):
        params = list(module.parameters())
        for p in (params[0], params[len(params) // 2], params[-1]):
            add(p.flatten()[:4096])
    return h.hexdigest()


class _State:
    """What a run has computed: per-timestep scores [N, M, T], unconditional errors [N, T], and
    which cells are finished, done [N, M + 1, T] (column M: the unconditional row)."""

    def __init__(self, N: int, M: int, T: int, device: torch.device) -> None:
        self.per_t = torch.zeros(N, M, T, dtype=torch.float32, device=device)
        self.uncond = torch.zeros(N, T, dtype=torch.float32, device=device)
        self.done = torch.zeros(N, M + 1, T, dtype=torch.bool)

    def save(self, path: Path, key: str) -> None:
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"version": CHECKPOINT_VERSION, "fingerprint": key, "per_t": self.per_t.cpu(),
                    "uncond": self.uncond.cpu(), "done": self.done}, tmp)
        os.replace(tmp, path)  # atomic: an interruption never leaves a half-written checkpoint

    def load(self, path: Path, key: str) -> int:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file
            raise ValueError(f"checkpoint {path} cannot be read ({e}); delete it to start over") from None
        if not isinstance(data, dict) or data.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{path} is not a fastitm checkpoint of this version; delete it to start over")
        if data["fingerprint"] != key or data["done"].shape != self.done.shape:
            raise ValueError(f"checkpoint {path} belongs to another run (different images, texts, method, "
                             f"options, plan or model); use another path or delete it")
        self.per_t.copy_(data["per_t"])
        self.uncond.copy_(data["uncond"])
        self.done.copy_(data["done"])
        return int(self.done.sum())


@contextmanager
def _deferred_interrupt() -> Iterator[list[bool]]:
    """While inside, a first Ctrl-C only sets a flag (the loop stops after its batch); a second one
    interrupts at once. Outside the main thread signals cannot be caught, so nothing changes."""
    flag = [False]
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if flag[0]:
            raise KeyboardInterrupt
        flag[0] = True

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _stages(run: Run, state: _State) -> Iterator[Iterator[torch.Tensor]]:
    """The rows to compute, stage by stage, each a stream of per-image chunks. Without elimination,
    one stage of every row. With it, one stage per round; each is generated after the previous
    stage's errors are in ``state``."""
    N, M, T = run.pixels.shape[0], len(run.texts), len(run.plan)
    spec = run.spec
    rounds = spec.options.get("elimination")
    alive = torch.ones(N, M, dtype=torch.bool)
    if not rounds:
        yield stage_chunks(alive, list(range(T)), spec.needs_uncond)
        return
    order = spread_order(T)
    start = 0
    for steps, keep in rounds:
        yield stage_chunks(alive, order[start:steps], spec.needs_uncond)
        alive = survivors(state.per_t[:, :, order[:steps]].cpu().mean(dim=2), alive, keep)
        start = steps
    yield stage_chunks(alive, order[start:], spec.needs_uncond)


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
    done = state.done[:, :M, :]
    per_t[~done] = float("nan")
    finished = done.all(dim=2)
    matrix = per_t.mean(dim=2)
    if run.spec.options.get("elimination") and complete:
        matrix = matrix.masked_fill(~finished, float("-inf"))  # eliminated candidates
    else:
        matrix = matrix.masked_fill(~finished, float("nan"))
    return ScoreResult(matrix=matrix, plan=run.plan, method=run.spec.name, options=dict(run.spec.options),
                       backend=backend, per_timestep=per_t, stats=stats)


@torch.no_grad()
def score_run(run: Run, *, backend: str = "auto", batch_size: int | None = None, progress: bool | None = None,
              checkpoint: str | os.PathLike | None = None, checkpoint_every: float = 60.0) -> ScoreResult:
    from tqdm.auto import tqdm

    model, plan, spec = run.model, run.plan, run.spec
    device, dtype = model.device, model.dtype
    N, M, T = run.pixels.shape[0], len(run.texts), len(plan)
    bs = default_batch_size(device) if batch_size is None else batch_size
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ValueError(f"batch_size must be a positive int, got {bs!r}")
    check_rounds(spec.options.get("elimination"), T)

    state = _State(N, M, T, device)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and not ckpt.parent.is_dir():
        raise FileNotFoundError(f"checkpoint folder {ckpt.parent} does not exist")
    key = fingerprint(run) if ckpt is not None else ""
    resumed = state.load(ckpt, key) if ckpt is not None and ckpt.exists() else 0

    # Work sharing: every encoder call happens once.
    z = torch.cat([encode_images(model, run.pixels[a : a + bs], plan, first_index=a) for a in range(0, N, bs)])
    emb = encode_texts(model, run.texts + ([""] if spec.needs_uncond else []))  # [M (+1), L, D]
    noise = plan.noise.to(device=device, dtype=dtype)
    timesteps = plan.timesteps.to(device)
    v_pred = model.scheduler.config.prediction_type == "v_prediction"
    flat_noise = noise.flatten(1)
    opts = spec.options
    full_rows = N * T * (M + (1 if spec.needs_uncond else 0))
    computed = 0
    use_graph = graphs_enabled(device)
    stats = {"unet_rows": 0, "unet_rows_full": full_rows, "resumed_cells": resumed, "vae_images": N,
             "text_encodes": M + (1 if spec.needs_uncond else 0), "batch_size": bs, "cuda_graphs": use_graph}

    with ExitStack() as stack:
        stop = stack.enter_context(_deferred_interrupt())
        bar = stack.enter_context(tqdm(total=full_rows, desc=f"fastitm {spec.name}", unit="row",
                                       disable=progress_disabled(progress), dynamic_ncols=True))
        sink = None
        if spec.needs_attention:
            sink = stack.enter_context(lse_pooling(model.unet, opts["layers"], opts["pool"], opts["lam"], backend))
        runner = UNetRunner(model.unet, sink, bucket=bs, use_graph=use_graph)
        last_save = time.monotonic()
        bar.update(resumed)  # resumed work counts as done on the bar

        def cells(rows):  # index of the rows' cells in state.done (the unconditional row is column M)
            return rows[:, 0], rows[:, 1].where(rows[:, 1] >= 0, M), rows[:, 2]

        def todo(chunks):
            for c in chunks:  # skip the cells a checkpoint already holds
                yield c[~state.done[cells(c)]]

        for stage in _stages(run, state):
            for rc in pack(todo(stage), bs):
                r = rc.to(device)
                i, j, k = r[:, 0], r[:, 1], r[:, 2]
                t = timesteps[k]
                zi, nk = z[i], noise[k]
                x = noisy_latents(model, zi, nk, t)
                cond = emb[torch.where(j < 0, M, j)]
                pred, pooled = runner(x, t, cond)
                if spec.needs_error:
                    if v_pred:
                        tgt, row_target = target(model, zi, nk, t).flatten(1), torch.arange(len(r), device=device)
                    else:  # the target is the plan's noise row: no per-row copy
                        tgt, row_target = flat_noise, k
                    error_reduce(pred.flatten(1), tgt, row_target, i, j, k, state.uncond, per_t=state.per_t,
                                 err=spec.err, normalize=spec.needs_uncond, backend=backend)
                if pooled is not None:
                    text_rows = j >= 0
                    state.per_t[i[text_rows], j[text_rows], k[text_rows]] += pooled[text_rows]
                state.done[cells(rc)] = True
                computed += len(r)
                bar.update(len(r))
                if ckpt is not None and time.monotonic() - last_save >= checkpoint_every:
                    state.save(ckpt, key)
                    last_save = time.monotonic()
                if stop[0]:
                    stats["unet_rows"] = computed
                    if ckpt is not None:
                        state.save(ckpt, key)
                    partial = _result(run, state, backend, stats, complete=False)
                    raise Interrupted(partial, str(ckpt) if ckpt else None, int(state.done.sum()), full_rows)
        bar.total = bar.n  # adaptive elimination skips rows: end the bar at what was needed
        bar.refresh()
    if ckpt is not None:
        state.save(ckpt, key)
    stats["unet_rows"] = computed
    stats["unet_rows_saved"] = full_rows - int(state.done.sum())
    if use_graph:
        stats["graph_replays"] = runner.replays
    return _result(run, state, backend, stats, complete=True)
