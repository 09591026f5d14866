"""Work shared across scoring calls: an image scored again reuses its VAE latent and its
unconditional rows.

Within one call the engine encodes each image once and runs each (image, timestep) unconditional
row once. Across calls it cannot know that an image came before, and an evaluation is many calls
whose candidates overlap. In Flickr30K text-to-image re-ranking, 1,000 captions each rank CLIP's
top 10 of the same 1,000 images, so an image is a candidate of about ten captions. In an
image-choice item under DiffusionITM, half of the rows are the candidates' unconditional rows
(one per image and timestep). Each such row is the same computation every time the image comes
back: the same latent, noise, timestep and empty prompt through the same denoiser.

:class:`ImageCache` keeps, per image (keyed by its prepared pixels), the latent and the
unconditional errors and attention terms of the timesteps computed so far. A call given the cache
encodes only the images it has not seen and skips the unconditional rows it holds. Within the call,
an image given twice (the same pixels) goes through the VAE once, and the repeats' rows come last in
each stage (the call, or each round of elimination or racing). A repeat then copies its first
occurrence's unconditional rows, if those ran in a batch before its own rows were asked for (not
when they share a batch).
``res.stats`` says what was reused: ``unet_rows_reused``, and ``vae_images`` (the encodes run).

The scores equal those without the cache to float rounding, not to the bit. A reused row was
computed in another batch, and the denoiser's kernels may sum in another order for another batch
(fp32 on the CPU here: about 1e-6 on DiffusionITM's error differences; tests/test_image_cache.py).

It applies only when the values are the same whatever the call. The latent must be the posterior
mean (``latent="mean"``, the default), because a sampled latent is seeded by the image's index in its
call. The model, method (its options included) and plan must also match. The cache binds to the first
call's model, method and plan, and a call with another is refused. So is a call after the model's
weights changed in place (a training step, a ``load_state_dict``): call :meth:`ImageCache.clear`
first.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .common import encode_images, hash_tensor, to_device


@dataclass
class _Entry:
    latent: torch.Tensor | None  # [C, h, w] scaled, on the model's device
    uncond: torch.Tensor  # [T] float32: the unconditional row's error per timestep
    attn_uncond: torch.Tensor  # [T] float32: its pooled attention term (Discffusion's mix_uncond)
    done: torch.Tensor  # [T] bool: the timesteps whose unconditional row is held


class ImageCache:
    """Latents and unconditional rows of images already scored, for calls with the same model,
    method and plan: ``cache = fastitm.ImageCache(); fastitm.score(..., image_cache=cache)`` on each
    call. At most ``max_images`` images are kept (the least recently used go first): about
    ``C*h*w*(dtype size) + 9*T`` bytes each, 32 KB for SD 2.1 at 512 px in bf16. The keys cost one
    SHA-1 over each call's prepared pixels: 2.2 ms per 512-px image on a 2-core x86-64 CPU, against
    55 ms for one image-choice candidate's 20 rows at 10 timesteps at the engine's 363 rows/s
    measured on an H200 (SD 2.1-base, bf16; bench/RESULTS.md)."""

    def __init__(self, max_images: int = 4096) -> None:
        if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
            raise ValueError(f"max_images must be a positive int, got {max_images!r}")
        self.max_images = max_images
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._key: tuple | None = None
        self._weights: _Weights | None = None
        self.hits = 0  # images found (latent reused) over all calls
        self.rows_reused = 0  # unconditional rows not run again, over all calls

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every image and the model, method and plan the cache was bound to."""
        self._entries.clear()
        self._key = self._weights = None

    def __repr__(self) -> str:
        return f"ImageCache({len(self)} of at most {self.max_images} images, {self.rows_reused} rows reused)"

    # ---- used by the engine -------------------------------------------------------------------------

    def applies(self, run) -> str | None:
        """None when this call can use the cache; otherwise why not (recorded in the result's stats)."""
        if run.plan.latent != "mean":
            return f"latent={run.plan.latent!r} draws each image's latent by its index in the call"
        return None

    def start(self, run) -> tuple[list[str], torch.Tensor]:
        """Bind to ``run``'s model, method and plan (see :meth:`bind`); its images' keys and each
        one's first index in the call (:func:`first_occurrence`)."""
        self.bind(run)
        keys = self.keys(run.pixels)
        return keys, first_occurrence(keys)

    def encode(self, run, keys: list[str], same: torch.Tensor, bs: int) -> tuple[torch.Tensor, int]:
        """The scaled latents [N, C, h, w] of ``run``'s images and how many the VAE encoded: the images
        the cache lacks, each distinct one (``same``: first indices) once, in batches of ``bs``."""

        held = self.latents(keys)
        todo = [i for i in range(len(keys)) if held[i] is None and same[i] == i]
        new = [encode_images(run.model, run.pixels[todo[a : a + bs]], run.plan) for a in range(0, len(todo), bs)]
        encoded = dict(zip(todo, torch.cat(new).unbind(0), strict=True)) if new else {}
        z = [held[i] if held[i] is not None else encoded[int(same[i])] for i in range(len(keys))]
        return torch.stack(z), len(todo)

    def bind(self, run) -> None:
        """Check that ``run`` has the model, method and plan of the calls before it."""
        key = _run_key(run)
        if self._key is None:
            self._key, self._weights = key, _Weights(run.model)
            return
        if not self._weights.same(run.model):
            raise ValueError("image_cache holds the rows of another model (or of this model before its weights "
                             "changed): call image_cache.clear() first, or use one cache per model")
        if key != self._key:
            raise ValueError("image_cache holds the rows of another method, method options or plan: use one cache "
                             "per (model, method, plan), or call image_cache.clear() first")

    def keys(self, pixels: torch.Tensor) -> list[str]:
        """pixels [N, 3, R, R] -> one digest per image."""
        out = []
        for p in pixels:
            h = hashlib.sha1()
            hash_tensor(h, p)
            out.append(h.hexdigest())
        return out

    def latents(self, keys: list[str]) -> list[torch.Tensor | None]:
        """The held latent of each image, or None."""
        out = []
        for k in keys:
            e = self._entries.get(k)
            out.append(None if e is None else e.latent)
            if e is not None:
                self._entries.move_to_end(k)
                self.hits += 1
        return out

    def prefill(self, keys: list[str], uncond: torch.Tensor, attn_uncond: torch.Tensor,
                done: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
        """Write the held unconditional rows into a call's state: ``uncond``, ``attn_uncond`` [N, T]
        and ``done`` [N, T] (the unconditional column), where not already done, for the images
        ``wanted`` [N] (those with a pair to score). Returns bool [N, T]: the cells filled here."""
        filled = torch.zeros_like(done)
        for i, k in enumerate(keys):
            if not wanted[i]:
                continue
            e = self._entries.get(k)
            if e is None or e.done.shape != done[i].shape:
                continue
            new = e.done & ~done[i]
            if not bool(new.any()):
                continue
            dev = new.to(uncond.device)
            uncond[i] = torch.where(dev, e.uncond.to(uncond.device), uncond[i])
            attn_uncond[i] = torch.where(dev, e.attn_uncond.to(attn_uncond.device), attn_uncond[i])
            done[i] |= new
            filled[i] = new
        return filled

    def store(self, keys: list[str], latents: torch.Tensor | None, uncond: torch.Tensor, attn_uncond: torch.Tensor,
              done: torch.Tensor, rows_reused: int = 0) -> None:
        """Keep each image's latent and its finished unconditional cells (merged with what is held);
        ``rows_reused``: how many rows the call did not run thanks to the cache."""
        self.rows_reused += rows_reused
        u, a = uncond.detach().to("cpu", torch.float32), attn_uncond.detach().to("cpu", torch.float32)
        for i, k in enumerate(keys):
            e = self._entries.get(k)
            if e is None:
                e = _Entry(None, torch.zeros_like(u[i]), torch.zeros_like(a[i]), torch.zeros_like(done[i]))
                self._entries[k] = e
            if latents is not None and e.latent is None:
                e.latent = latents[i].detach().clone()
            new = done[i] & ~e.done
            e.uncond = torch.where(new, u[i], e.uncond)
            e.attn_uncond = torch.where(new, a[i], e.attn_uncond)
            e.done = e.done | new
            self._entries.move_to_end(k)
        while len(self._entries) > self.max_images:
            self._entries.popitem(last=False)


def first_occurrence(keys: list[str]) -> torch.Tensor:
    """[N] int64: the first index with each image's key (itself unless it repeats an earlier image)."""
    first: dict[str, int] = {}
    return torch.tensor([first.setdefault(k, i) for i, k in enumerate(keys)], dtype=torch.long)


def repeats_last(same: torch.Tensor) -> list[int]:
    """An order of a call's images (``same`` from :func:`first_occurrence`): first the images that a
    later one repeats, then the other first occurrences, then the repeats. The rows between a repeated
    image's and its repeat's give its unconditional rows time to run before the repeat asks for them."""
    n = len(same)
    repeat = same != torch.arange(n)
    repeated = torch.zeros(n, dtype=torch.bool)
    repeated[same[repeat]] = True
    return [*repeated.nonzero().flatten().tolist(), *(~repeat & ~repeated).nonzero().flatten().tolist(),
            *repeat.nonzero().flatten().tolist()]


def copy_repeat(i: int, same: torch.Tensor, uncond: torch.Tensor, attn_uncond: torch.Tensor, done: torch.Tensor,
                reused: torch.Tensor) -> None:
    """In place: image ``i``'s unconditional cells from its first occurrence ``same[i]``'s, where that
    one's have run and ``i``'s not yet (nothing when ``i`` is a first occurrence). ``uncond``,
    ``attn_uncond`` [N, T] (on the model's device), ``done`` and ``reused`` [N, T] bool (CPU)."""
    src = int(same[i])
    if src == i:
        return
    have = done[src] & ~done[i]
    if not bool(have.any()):
        return

    mask = to_device(have, uncond.device)  # in the batch loop: a pageable copy would wait for the GPU
    for buf in (uncond, attn_uncond):
        buf[i] = torch.where(mask, buf[src], buf[i])
    done[i] |= have
    reused[i] |= have


class _Weights:
    """The model a cache's rows came from, as the objects themselves (weak references, so a new
    model at a freed one's address is not taken for it) and the version counter of every parameter
    and buffer. Every in-place change (an optimizer step, load_state_dict, merging LoRA weights) bumps
    a counter: a cheap check that the weights are those the rows came from, where hashing them would
    take seconds."""

    def __init__(self, model) -> None:
        objs, self.versions = _model_objects(model)
        self.refs = [weakref.ref(o) for o in objs]

    def same(self, model) -> bool:
        objs, versions = _model_objects(model)
        return (len(objs) == len(self.refs) and all(r() is o for r, o in zip(self.refs, objs, strict=True))
                and versions == self.versions)


def _model_objects(model) -> tuple[list, tuple]:
    """(the model, its networks, their parameters and buffers), and (dtype, device, every tensor's
    version counter)."""
    tensors = [t for part in model.networks for t in (*part.parameters(), *part.buffers())]
    return [model, *model.networks, *tensors], (model.dtype, str(model.device), *(t._version for t in tensors))


def _run_key(run) -> tuple:
    """(the method and its options, the plan): what an image's latent and unconditional rows depend
    on besides its pixels and the model (:class:`_Weights`)."""
    h = hashlib.sha1()
    for t in (run.plan.timesteps, run.plan.noise):
        hash_tensor(h, t)
    plan = (run.plan.latent, run.plan.seed, h.hexdigest())
    return (run.spec.name, repr(sorted(run.spec.options.items()))), plan
