"""``fastitm.Scorer``: the scorer as a ``torch.nn.Module`` (options fixed at construction), and
``fastitm.scorer.DiffusionScore``: a torchmetrics ``Metric`` over matched image-text pairs.

A module owns its networks as submodules, so ``.to(device)``, ``state_dict`` and wrappers that walk
modules (DDP, FSDP) see them; calling it runs :func:`fastitm.score` on the model it holds.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .api import score
from .engine.common import prepare_run
from .engine.image_cache import ImageCache
from .models.model import Model, check_device, keep_vae_fp32, load_model, resolve_dtype


class Scorer(torch.nn.Module):
    """``scorer = fastitm.Scorer(model, method="diffusion_itm", timesteps=10, seed=0, **options)``.

    ``model``: a :class:`fastitm.Model`, a folder, a hub id, a loaded pipeline, another Scorer (its
    model, shared), or None (the embedded model); ``dtype``/``device`` as in :func:`fastitm.load_model` when it is loaded here. Every other
    keyword is a :func:`fastitm.score` argument fixed for every call (method options, ``preset``,
    ``batch_size``, ``adaptive``, ...). ``scorer(images, texts)`` returns the [N, M] float32 matrix (CPU);
    ``scorer.score(images, texts, **overrides)`` the whole :class:`~fastitm.ScoreResult`."""

    def __init__(self, model: Any = None, *, method: str = "diffusion_itm", timesteps: int | None = 10,
                 seed: int | None = 0, dtype: Any = None, device: Any = None, **score_kwargs: Any) -> None:
        super().__init__()
        if isinstance(model, Scorer):  # another scorer's model, shared (its options are not taken)
            model = model.model
        if not isinstance(model, Model):
            model = load_model(model, dtype=dtype, device=device if device is not None else "cpu")
        elif dtype is not None or device is not None:

            target = check_device(device) if device is not None else model.device
            model.to(device=target, dtype=resolve_dtype(dtype, target) if dtype is not None else None)
        self.model = model
        # The networks as submodules (one object with the model: moving one moves the other).
        self.networks = torch.nn.ModuleDict({n: m for n, m in self._named_networks() if isinstance(m, torch.nn.Module)})
        if score_kwargs.get("plan") is not None:  # a plan fixes the timesteps and the seed
            timesteps = seed = None
        self.options = {"method": method, "timesteps": timesteps, "seed": seed, **score_kwargs}
        self._check()

    def _check(self) -> None:
        """Bad options fail at construction, not at the first call: every check :func:`fastitm.score`
        makes before any model work (the plan, the method and its options, racing, the weights against
        the plan's timesteps), run on a one-pixel image with this model."""

        opts = dict(self.options)
        cache = opts.pop("image_cache", None)
        if cache is not None and not isinstance(cache, ImageCache):
            raise TypeError(f"image_cache must be a fastitm.ImageCache, got {type(cache).__name__}")
        for k in ("batch_size", "progress", "pairs", "checkpoint", "checkpoint_every", "distributed"):
            opts.pop(k, None)
        named = {k: opts.pop(k, None) for k in ("timesteps", "seed", "plan", "preset", "resize", "latent", "scheme",
                                                "noise", "adaptive", "weights")}
        prepare_run([torch.zeros(3, 1, 1)], ["a"], model=self.model, method=opts.pop("method"),
                    backend=opts.pop("backend", "auto"), options=opts, **named)

    def _named_networks(self):
        m = self.model
        yield "unet", m.unet
        yield "vae", m.vae
        yield "text_encoder", m.text_encoder
        yield from m.parts.items()

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        keep_vae_fp32(self.model)  # a fp16 cast keeps SDXL's VAE in fp32, as load_model does
        return out

    def score(self, images: Any, texts: list[str], **overrides: Any):

        return score(images, texts, model=self.model, **{"progress": False, **self.options, **overrides})

    def forward(self, images: Any, texts: list[str]) -> torch.Tensor:
        return self.score(images, texts).matrix

    def extra_repr(self) -> str:
        return f"model={self.model.source!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())


def _metric_base():
    try:
        from torchmetrics import Metric
    except ImportError:  # an optional extra
        return None
    return Metric


_Metric = _metric_base()


if _Metric is not None:

    class DiffusionScore(_Metric):
        """The mean score of matched image-text pairs (torchmetrics ``Metric``, as ``CLIPScore``):
        ``update(images, texts)`` scores image i against text i only (``pairs=`` the diagonal: no other
        cell is computed); ``compute()`` is the mean over every pair seen, on every rank.

        The state is the per-pair scores themselves (reduced by concatenation across ranks) and the
        mean is taken with ``math.fsum`` (exactly rounded whatever the order), so 2 ranks give the
        one-process mean of the same pair scores bit for bit. Arguments are :class:`Scorer`'s."""

        higher_is_better = True
        is_differentiable = False
        full_state_update = False

        def __init__(self, model: Any = None, **scorer_kwargs: Any) -> None:
            super().__init__()
            self.scorer = Scorer(model, **scorer_kwargs)
            self.add_state("scores", default=[], dist_reduce_fx="cat")

        def update(self, images: Any, texts: list[str]) -> None:
            n = len(texts)
            if len(images) != n:
                raise ValueError(f"DiffusionScore.update takes matched pairs: {len(images)} images, {n} texts")
            res = self.scorer.score(images, list(texts), pairs=torch.eye(n, dtype=torch.bool))
            self.scores.append(res.matrix.diagonal().to(torch.float64))

        def compute(self) -> torch.Tensor:
            s = self.scores
            flat = torch.cat(s) if isinstance(s, list) and s else (s if isinstance(s, torch.Tensor) else torch.empty(0))
            if flat.numel() == 0:
                raise ValueError("DiffusionScore.compute() before any update()")
            return torch.tensor(math.fsum(flat.tolist()) / flat.numel(), dtype=torch.float64)
