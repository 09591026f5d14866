"""Many GPUs and machines on torch.distributed: shard the work, score each shard with the engine on its
rank's device, gather every item exactly once.

Under ``torchrun --nproc_per_node N -m fastitm eval ...`` (or any launcher that initialises the default
process group, or sets ``WORLD_SIZE``/``RANK`` for :func:`init_from_env`), items are split into
contiguous shards (no padding, so nothing is counted twice), and ranks exchange their results with
``all_gather_object``: every rank ends with the same full result, rank 0 writes it.
"""

from __future__ import annotations

import atexit
import importlib
import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from ..core.result import ScoreResult
from .engine import score_run


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


# torch modules that take the default process group as a default argument when they are imported
# (``group=group.WORLD``): imported after init_process_group, they hold the group past
# destroy_process_group, so its gloo worker threads live on into interpreter shutdown. There a worker
# that still frees a finished collective's tensors needs the GIL, and the process aborts ("terminate
# called without an active exception", pytorch/pytorch#190489). diffusers and transformers import them
# when a model is built, so they are imported before the group exists.
_BIND_WORLD_ON_IMPORT = ("torch.distributed.nn", "torch.distributed.optim",
                         "torch.distributed.fsdp.sharded_grad_scaler")


def init_from_env(device: str = "cpu") -> bool:
    """Initialise the default process group when a launcher (torchrun) set ``WORLD_SIZE`` > 1 and
    nobody did yet: NCCL for CUDA devices, gloo otherwise. A group made here is destroyed at exit,
    before the interpreter shuts down (its worker threads joined), unless the caller destroyed it first.
    Returns whether the run is distributed."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        for name in _BIND_WORLD_ON_IMPORT:
            try:
                importlib.import_module(name)
            except ImportError:  # a torch build without that part: nothing there to hold the group
                pass
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        atexit.unregister(_destroy_at_exit)  # once, however often a script makes a group again
        atexit.register(_destroy_at_exit)
    return is_distributed()


def _destroy_at_exit() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: str) -> str:
    """``cuda`` means this rank's GPU (``LOCAL_RANK``) in a distributed run."""
    if str(device) == "cuda" and is_distributed():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', rank()))}"
    return device


def shard_bounds(n: int, ranks: int | None = None, r: int | None = None) -> tuple[int, int]:
    """The contiguous slice [start, stop) of n items for rank r of ``ranks``: sizes differ by at most
    one, every item belongs to exactly one rank."""
    ranks = world_size() if ranks is None else ranks
    r = rank() if r is None else r
    base, extra = divmod(n, ranks)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (a one-element list when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def score_sharded(run, *, backend: str, batch_size: int | None, progress: bool | None,
                  checkpoint: str | None, checkpoint_every: float):
    """``fastitm.score(..., distributed=True)``: this rank scores its contiguous shard of the images
    against every text (sampled latents seeded by the global image index), and the full result is
    assembled on every rank. With ``checkpoint``, each rank keeps its own file
    (``<checkpoint>.rank<r>-of-<n>``), so a killed rank resumes its shard."""

    N = run.pixels.shape[0]
    start, stop = shard_bounds(N)
    ckpt = f"{checkpoint}.rank{rank()}-of-{world_size()}" if checkpoint else None
    part = None
    if stop > start:
        shard = replace(run, pixels=run.pixels[start:stop], image_offset=run.image_offset + start,
                        pairs=None if run.pairs is None else run.pairs[start:stop])
        part = score_run(shard, backend=backend, batch_size=batch_size, progress=progress if rank() == 0 else False,
                         checkpoint=ckpt, checkpoint_every=checkpoint_every)
    parts = gather(None if part is None else (part.matrix, part.per_timestep, part.stats, part.backend))
    parts = [p for p in parts if p is not None]
    matrix = torch.cat([p[0] for p in parts])
    per_t = torch.cat([p[1] for p in parts])
    stats = {"ranks": world_size(), "unet_rows": sum(p[2]["unet_rows"] for p in parts),
             "batches": sum(p[2]["batches"] for p in parts),
             "per_rank": [p[2] for p in parts]}
    if run.race is not None:  # per-image lists in image order, as one process gives them
        races = [p[2]["racing"] for p in parts]
        stats["racing"] = {"options": races[0]["options"], "dropped": sum(r["dropped"] for r in races),
                           **{k: [v for r in races for v in r[k]] for k in ("rows_per_image", "timesteps_per_image",
                                                                          "plan_end")}}
    return ScoreResult(matrix=matrix, plan=run.plan, method=run.spec.name, options=dict(run.spec.options),
                       backend=parts[0][3], per_timestep=per_t, stats=stats, preset=run.preset,
                       choices=dict(run.choices), family=run.model.family, weights=run.weights)


def shard_items(items: Sequence[Any]) -> tuple[int, list[Any]]:
    """(offset, this rank's contiguous share of ``items``)."""
    start, stop = shard_bounds(len(items))
    return start, list(items[start:stop])
