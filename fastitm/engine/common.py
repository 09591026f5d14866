"""Pieces every scorer shares: argument checking, encoders, noising, the training target, errors.

These are plain diffusers calls; the reference scorer and the engine both use them, so the two can
only differ in how they organise the UNet work, which is what the parity tests compare.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..core import presets
from ..core.inputs import check_images, check_resize, prepare_images, prepare_texts
from ..core.methods import MethodSpec, check_rounds, elimination_stages, resolve_method
from ..core.plan import Plan, cell_seed, check_plan_args, make_plan
from ..core.weights import describe, resolve
from ..models.families import concat_cond
from ..models.model import Model, load_model
from ..ops._backend import BACKENDS, reasons_against
from .racing import RaceOptions, check_not_with_elimination


@dataclass
class Run:
    """A checked scoring request: pixels [N, 3, R, R] in [-1, 1], texts, plan, method, and the
    preset with the run-level choices it resolved to (resize, latent, scheme, noise)."""

    model: Any
    pixels: torch.Tensor
    texts: list[str]
    plan: Plan
    spec: MethodSpec
    preset: str | None = None
    choices: dict = field(default_factory=dict)
    # Global index of pixels[0]: seeds of sampled latents follow the image's index in the whole
    # request, so a shard of a distributed run draws what one process would.
    image_offset: int = 0
    # Which (image, text) pairs to score, bool [N, M]; None: all of them.
    pairs: torch.Tensor | None = None
    # Paired racing (fastitm.engine.racing.RaceOptions), or None: every requested pair on every timestep.
    race: Any = None
    # Timestep weights [T] (fastitm.core.weights), or None: the plain mean; ``weights_spec`` as given.
    weights: torch.Tensor | None = None
    weights_spec: Any = "uniform"
    # Latents and unconditional rows shared with earlier calls (fastitm.engine.image_cache.ImageCache), or None.
    image_cache: Any = None
    # Texts' conditioning rows shared with earlier calls (fastitm.engine.text_cache.TextCache), or None.
    text_cache: Any = None

    def requested(self) -> torch.Tensor:
        """bool [N, M]: the pairs to score."""
        if self.pairs is not None:
            return self.pairs
        return torch.ones(self.pixels.shape[0], len(self.texts), dtype=torch.bool)


def progress_disabled(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None (the default) shows a bar only on a terminal."""
    return None if progress is None else not progress


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    return backend


def check_backend_runs(backend: str, device: torch.device) -> None:
    """A backend named explicitly must be able to run on the model's device: say why not up front,
    not after the encoders have run."""

    if backend in ("auto", "reference"):
        return
    why = reasons_against(backend, [torch.empty(0, device=device)])
    if why:
        raise ValueError(f"backend {backend!r} cannot run on {device}: " + "; ".join(why))


def prepare_run(
    images: Any,
    texts: Any,
    *,
    model: Any,
    method: str,
    timesteps: Any,
    seed: Any,
    plan: Plan | None,
    resize: str | None,
    latent: str | None,
    scheme: str | None,
    options: dict,
    noise: str | None = None,
    preset: str | None = None,
    backend: str = "auto",
    pairs: Any = None,
    adaptive: Any = None,
    weights: Any = None,
) -> Run:
    """Validate everything before any model work, so a bad argument fails in milliseconds: the
    arguments first, then (loading the embedded model only now when ``model`` is None) what needs
    the model."""

    race = RaceOptions.parse(adaptive)
    preset, choices, spec, texts = check_arguments(images, texts, method=method, timesteps=timesteps, seed=seed,
                                                   plan=plan, resize=resize, latent=latent, scheme=scheme,
                                                   noise=noise, preset=preset, options=options, backend=backend)
    if model is None:

        model = load_model()
    if not isinstance(model, Model):
        raise TypeError(f"model must be a fastitm Model (see fastitm.load_model), got {type(model).__name__}")
    model.spec.check_method(spec.name)
    check_backend_runs(backend, model.device)
    pixels = prepare_images(images, model.resolution, choices["resize"])
    if plan is None:
        plan = make_plan(model, 10 if timesteps is None else timesteps, seed=0 if seed is None else seed,
                         scheme=choices["scheme"], latent=choices["latent"], noise=choices["noise"])
        if spec.options.get("elimination") and spec.options.get("order") == "published":
            plan = evaluation_order_noise(plan, spec)
    else:  # the plan fixes these: record what it holds
        choices.update(latent=plan.latent, scheme=plan.scheme, noise=plan.noise_mode)
    plan.check_model(model)
    check_rounds(spec.options.get("elimination"), len(plan))
    check_not_with_elimination(race, spec.options.get("elimination"))

    w = resolve(weights, plan.timesteps, model.num_train_timesteps)
    if w is not None and spec.options.get("elimination"):
        raise ValueError("weights= with elimination= is not supported: its schedule ranks by plain means; give "
                         "weights= alone, or adaptive= (racing decides on the weighted means)")
    return Run(model, pixels, texts, plan, spec, preset, choices,
               pairs=None if pairs is None else check_pairs(pairs, pixels.shape[0], len(texts)), race=race,
               weights=w, weights_spec=describe(weights))


def check_pairs(pairs: Any, n_images: int, n_texts: int) -> torch.Tensor:
    """``pairs``: which (image, text) cells to score, a bool [N_images, N_texts] tensor or nested list."""
    try:
        mask = torch.as_tensor(pairs)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"pairs must be a bool [images, texts] tensor or nested list, got {type(pairs).__name__}") from None
    if mask.dtype != torch.bool:
        raise TypeError(f"pairs must be boolean (True: score this image-text pair), got dtype {mask.dtype}")
    if tuple(mask.shape) != (n_images, n_texts):
        raise ValueError(f"pairs must have shape [images, texts] = [{n_images}, {n_texts}], got {tuple(mask.shape)}")
    if not bool(mask.any()):
        raise ValueError("pairs selects no image-text pair")
    return mask.cpu().clone()


def check_arguments(images: Any, texts: Any, *, method: str, timesteps: Any, seed: Any, plan: Plan | None,
                    resize: str | None, latent: str | None, scheme: str | None, noise: str | None,
                    preset: str | None, options: dict, backend: str) -> tuple[str | None, dict, MethodSpec, list[str]]:
    """Every check that needs no model: the backend's name, the preset and the choices it resolves
    to (explicit > preset > default), the method and its options, the texts, the plan's arguments,
    the images' types and paths. Returns (preset, choices, method spec, texts)."""

    check_backend(backend)
    preset = presets.check_preset(preset)
    choices, options = presets.resolve(method, preset, {"resize": resize, "latent": latent, "scheme": scheme,
                                                        "noise": noise}, options)
    spec = resolve_method(method, options)
    texts = prepare_texts(texts)
    check_resize(choices["resize"])
    if plan is None:
        check_plan_args(timesteps, seed, choices["scheme"], choices["latent"], choices["noise"])
    else:
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a fastitm Plan (res.plan), got {type(plan).__name__}")
        if timesteps is not None or seed is not None:
            raise ValueError("pass either plan= or timesteps=/seed=, not both: the plan fixes them")
    check_images(images)
    return preset, choices, spec, texts


def evaluation_order_noise(plan: Plan, spec: MethodSpec) -> Plan:
    """The published adaptive script draws its noise tensors in the order timesteps are evaluated
    (the r-th evaluated timestep gets draw r); give the plan's draws to its timesteps in that order,
    so the same draws give the same pairing."""
    order = [k for stage in elimination_stages(len(plan), spec.options["elimination"], "published") for k in stage]
    noise = torch.empty_like(plan.noise)
    noise[torch.tensor(order)] = plan.noise
    return replace(plan, noise=noise)


# Texts per text-encoder call: the encoder's activations for all of a 1,000-class task's prompts at
# once (attention over 77 tokens per layer) took 395 MiB more peak memory than the rows they produce.
TEXT_CHUNK = 64


@torch.no_grad()
def encode_chunked(model, texts: list[str]) -> dict[str, torch.Tensor]:
    """``model.spec.encode`` of ``texts`` (non-empty) in calls of at most :data:`TEXT_CHUNK` texts, the rows
    concatenated: the same rows, with the encoder's peak memory that of one chunk whatever the number of
    texts."""
    return concat_cond(*(model.spec.encode(model, texts[i : i + TEXT_CHUNK]) for i in range(0, len(texts), TEXT_CHUNK)))


@torch.no_grad()
def encode_texts(model, texts: list[str]) -> torch.Tensor:
    """Texts -> the text encoder's hidden states [M, L, D] (SD 1.x/2.x: CLIP's last hidden states,
    L = 77); the denoiser's ``encoder_hidden_states``. Other families need more than this tensor:
    use :func:`encode_conditioning`."""
    return encode_chunked(model, texts)["hidden"]


@torch.no_grad()
def encode_conditioning(model, texts: list[str], empty: bool = False) -> dict[str, torch.Tensor]:
    """Texts -> the family's conditioning, a dict of tensors with one row per text (hidden states,
    and for SDXL / SD 3 the pooled embeddings and time ids); with ``empty``, the empty prompt's row
    (as the family's pipeline makes it) is appended last."""
    spec = model.spec
    cond = encode_chunked(model, texts) if texts else None
    if not empty:
        return cond
    uncond = spec.encode_empty(model)
    return uncond if cond is None else concat_cond(cond, uncond)


@torch.no_grad()
def encode_posterior(model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pixels [n, 3, R, R] in [-1, 1] -> the VAE posterior's mean and std [n, C, h, w] (unscaled)."""
    # The VAE may run in float32 while the model is in fp16 (force_upcast, as SDXL's pipeline does).
    dist = model.vae.encode(pixels.to(model.device, model.vae.dtype)).latent_dist
    return dist.mean.to(model.dtype), dist.std.to(model.dtype)


def scale_latents(model, z: torch.Tensor) -> torch.Tensor:
    shift = getattr(model.vae.config, "shift_factor", None)
    if shift is not None:
        z = z - shift
    return z * model.scaling_factor


@torch.no_grad()
def encode_images(model, pixels: torch.Tensor, plan: Plan, first_index: int = 0) -> torch.Tensor:
    """pixels [n, 3, R, R] in [-1, 1] -> scaled latents [n, C, h, w] in the model's dtype.

    The posterior mean by default; with ``plan.latent == "sample"`` image ``first_index + i`` is
    sampled with a generator seeded ``plan.seed + 1 + first_index + i`` (independent of batching).
    ``"sample_per_timestep"`` draws per timestep: use :func:`encode_posterior` and
    :func:`timestep_latents`.
    """
    if plan.latent == "sample_per_timestep":
        raise ValueError("latent='sample_per_timestep' has one latent per timestep: use timestep_latents")
    mean, std = encode_posterior(model, pixels)
    if plan.latent == "mean":
        z = mean
    else:
        eps = torch.stack([
            torch.randn(mean.shape[1:], generator=torch.Generator("cpu").manual_seed(plan.seed + 1 + first_index + i))
            for i in range(pixels.shape[0])
        ]).to(mean.device, mean.dtype)
        z = mean + std * eps
    return scale_latents(model, z)


def to_device(x: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A CPU tensor on ``device`` (in ``dtype``). To a GPU through pinned memory, without blocking: a
    copy from pageable memory synchronizes the stream, so the CPU would wait for all the GPU work it
    queued (the engine's previous batch) before preparing the next."""
    if x.device.type == "cpu" and torch.device(device).type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    return x.to(device=device, dtype=dtype)


def timestep_latents(model, mean: torch.Tensor, std: torch.Tensor, plan: Plan, images: torch.Tensor,
                     ks: torch.Tensor) -> torch.Tensor:
    """``latent="sample_per_timestep"``: the scaled posterior sample of each row's (image, timestep
    index), [n, C, h, w], from ``mean``/``std`` [n, C, h, w] (already gathered per row) and a
    generator seeded :func:`fastitm.core.plan.cell_seed` (plan.seed, image, k)."""
    eps = torch.stack([
        torch.randn(mean.shape[1:], generator=torch.Generator("cpu").manual_seed(cell_seed(plan.seed, int(i), int(k))))
        for i, k in zip(images.tolist(), ks.tolist(), strict=True)
    ])
    eps = to_device(eps, mean.device, mean.dtype)
    return scale_latents(model, mean + std * eps)


def noisy_latents(model, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The noised latent at plan timesteps ``t`` [n]: sqrt(abar_t) z + sqrt(1 - abar_t) noise by the
    scheduler's add_noise (SD, SDXL), or (1 - sigma) z + sigma noise (flow matching)."""
    return model.spec.noisy(model, z, noise, t)


def target(model, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the denoiser is trained to predict: the noise, the velocity (v-prediction), or the
    flow velocity noise - z."""
    return model.spec.target(model, z, noise, t)


def denoise(model, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """The denoiser's prediction for latents ``x`` [n, C, h, w] at timesteps ``t`` [n] with the
    conditioning rows ``cond`` (see :func:`encode_conditioning`)."""
    return model.spec.forward(model.unet, x, t, cond)


def _block_of(name: str) -> str:
    """"down_blocks.1.attentions.0.transformer_blocks.0.attn2" -> "down_blocks.1"; mid -> "mid_block"."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]


def _attention_of(name: str) -> str:
    """The Transformer2D an attn2 belongs to: "down_blocks.1.attentions.0"."""
    return name.split(".transformer_blocks.")[0]


def cross_attention_layers(unet, which: str) -> list[tuple[str, Any]]:
    """The UNet's cross-attention modules (``attn2``), in forward order of the module tree.

    - ``"all"``: every one (the Discffusion paper);
    - ``"last"``: the last one inside each down/mid/up block (one per block, at its resolution);
    - ``"published"``: the published Discffusion UNet's choice: of each of the down, mid and up
      stages, the last block that has cross-attention, and in it every attention (Transformer2D),
      each by the attn2 of its last transformer block (4 layers on the embedded model, 6 on SD 2.1).
    """
    layers = [(n, m) for n, m in unet.named_modules() if n.endswith("attn2") and getattr(m, "is_cross_attention", True)]
    if not layers:
        raise ValueError("the UNet has no cross-attention (attn2) layers")
    # diffusers registers up_blocks before mid_block: put them in the order the forward pass runs.
    stage_rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    layers.sort(key=lambda nm: stage_rank.get(nm[0].split(".")[0], 3))
    if which == "all":
        return layers
    if which == "last":
        last: dict[str, tuple[str, Any]] = {}
        for n, m in layers:
            last[_block_of(n)] = (n, m)
        return list(last.values())
    if which != "published":
        raise ValueError(f"unknown layer choice {which!r}; choose 'all', 'last' or 'published'")
    stage_last_block: dict[str, str] = {}
    for n, _ in layers:
        stage_last_block[n.split(".")[0]] = _block_of(n)
    keep = set(stage_last_block.values())
    per_attention: dict[str, tuple[str, Any]] = {}
    for n, m in layers:
        if _block_of(n) in keep:
            per_attention[_attention_of(n)] = (n, m)  # the last transformer block's attn2 wins
    return list(per_attention.values())


def hash_tensor(h, x: torch.Tensor) -> None:
    """Feed a tensor's shape, dtype and every byte of its data into the hash ``h``."""
    x = x.detach()
    h.update(f"{tuple(x.shape)}{x.dtype}".encode())
    if x.dtype == torch.bfloat16:  # numpy has no bfloat16: hash its bits
        x = x.view(torch.int16)
    x = x.to("cpu").contiguous().reshape(-1)
    h.update(memoryview(x.numpy()).cast("B"))  # no copy: ~1 GB/s, a few seconds for SD 2.1
