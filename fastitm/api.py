"""The public scorer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .core.plan import Plan
from .core.result import ScoreResult
from .engine import engine
from .engine.common import prepare_run
from .engine.distributed import is_distributed, score_sharded
from .engine.image_cache import ImageCache
from .engine.text_cache import TextCache


def score(
    images: Any,
    texts: Sequence[str],
    *,
    model: Any = None,
    method: str = "diffusion_itm",
    timesteps: int | Sequence[int] | None = None,
    seed: int | None = None,
    plan: Plan | None = None,
    preset: str | None = None,
    resize: str | None = None,
    latent: str | None = None,
    scheme: str | None = None,
    noise: str | None = None,
    backend: str = "auto",
    batch_size: int | None = None,
    progress: bool | None = None,
    checkpoint: str | None = None,
    checkpoint_every: float = 60.0,
    distributed: bool = False,
    pairs: Any = None,
    adaptive: Any = None,
    weights: Any = None,
    image_cache: Any = None,
    text_cache: Any = None,
    **options: Any,
) -> ScoreResult:
    """Score every image against every text: ``res.matrix`` [len(images), len(texts)], higher = better.

    images: PIL images, file paths, [H, W, 3] numpy arrays (uint8, uint16 or float in [0, 1]),
        [3, H, W] tensors, or a float tensor [N, 3, H, W] in [0, 1]; resized to the model's
        resolution when H, W differ (``resize="squash"``, ``"squash_pil"`` or ``"center_crop"``,
        see :mod:`fastitm.core.inputs`).
    texts: a list of captions.
    model: a :class:`fastitm.Model` (``fastitm.load_model(...)``); None loads the embedded default.
    method: "diffusion_itm" | "diffusion_classifier" | "discffusion"; its options as keywords
        (see :mod:`fastitm.core.methods`).
    preset: None (fastitm's clean per-pair definitions) or ``"published"``: every choice set to what
        the method's published code does (see :mod:`fastitm.core.presets`); explicit arguments override it.
    timesteps, seed, scheme, latent, noise: build the plan (default 10 timesteps on the published
        grid, seed 0, posterior-mean latents, noise per timestep); or pass ``plan=res.plan`` to
        reproduce a result exactly. ``timesteps`` is a count (int) or an explicit list.
    backend: "auto" | "triton" | "native" | "reference" for the fused ops.
    batch_size: denoiser rows per forward pass (default from the device, :func:`fastitm.models.speed.default_batch_size`:
        on CUDA what fits half the free memory, on the CPU 32 for small latents); memory is bounded by it.
    pairs: bool [len(images), len(texts)]: score only these pairs (the others are NaN), e.g. each image
        against its own candidate captions in one call, so the denoiser's batches stay full.
    progress: show a progress bar with rows per second (default: only on a terminal).
    checkpoint: a file where finished cells are saved every ``checkpoint_every`` seconds, on Ctrl-C
        and at the end; rerunning with the same inputs, plan and path resumes without recomputing
        them (a checkpoint of another run is refused). Ctrl-C finishes the batch in flight and raises
        :class:`fastitm.engine.Interrupted` (a KeyboardInterrupt) carrying the partial result.

    distributed: shard the images over the ranks of an initialised torch.distributed process group
        (``torchrun``): each rank scores its share against every text with the engine on its own
        device, and every rank gets the full result (see :mod:`fastitm.engine.distributed`). Without a
        process group the call runs in this process alone.

    adaptive: paired racing (:mod:`fastitm.engine.racing`), for every method: True, or a dict of ``alpha``
        (0.05: per image, the largest probability of dropping its best text), ``min_timesteps`` (5),
        ``round_size`` (3) and ``keep`` (1: the image stops when this many texts are left). The plan's
        timesteps run in rounds in a spread order; after each round a text worse than the image's best
        by a paired test is dropped (its score is -inf; ``res.partial_means`` keeps its mean over the
        timesteps it ran). The candidates of an image are its requested texts (``pairs=``).

    weights: how the per-timestep scores average into each score (:mod:`fastitm.core.weights`):
        ``"uniform"`` (default), ``{"kind": "exp", "rate": 7}`` (Clark & Jaini), a ``{timestep: weight}``
        table or a JSON file with one; recorded in ``res.stats["weights"]``. ``res.per_timestep`` is
        unweighted; not with ``adaptive=`` or ``elimination=`` (they decide on plain means).

    image_cache: a :class:`fastitm.ImageCache` shared by calls with the same model, method and plan:
        an image seen in an earlier call (the same pixels) reuses its VAE latent and its unconditional
        rows, with the same scores (:mod:`fastitm.engine.image_cache`; posterior-mean latents only).
    text_cache: a :class:`fastitm.engine.text_cache.TextCache` shared by calls with the same model: each text is
        encoded once across them (``stats["text_encodes"]`` counts the new ones).

    ``res.stats`` counts the work: UNet rows computed, VAE images, text encodes, rows saved by
    adaptive elimination (``diffusion_classifier``, ``elimination=[(T_1, keep_1), ...]``) or racing
    (``stats["racing"]``: rows and timesteps per image, and whether it ran to the plan's end).
    """

    if image_cache is not None and not isinstance(image_cache, ImageCache):
        raise TypeError(f"image_cache must be a fastitm.ImageCache, got {type(image_cache).__name__}")
    if text_cache is not None and not isinstance(text_cache, TextCache):
        raise TypeError(f"text_cache must be a fastitm.engine.text_cache.TextCache, got {type(text_cache).__name__}")
    run = prepare_run(images, texts, model=model, method=method, timesteps=timesteps, seed=seed, plan=plan,
                      resize=resize, latent=latent, scheme=scheme, noise=noise, preset=preset, options=options,
                      backend=backend, pairs=pairs, adaptive=adaptive, weights=weights)
    if image_cache is not None or text_cache is not None:
        run = replace(run, image_cache=image_cache, text_cache=text_cache)
    if distributed:

        if is_distributed():  # with one process (no process group) the same call just runs here
            return score_sharded(run, backend=backend, batch_size=batch_size, progress=progress,
                                 checkpoint=checkpoint, checkpoint_every=checkpoint_every)
    return engine.score_run(run, backend=backend, batch_size=batch_size, progress=progress,
                            checkpoint=checkpoint, checkpoint_every=checkpoint_every)
