"""Pieces every scorer shares: argument checking, encoders, noising, the training target, errors.

These are plain diffusers calls; the reference scorer and the engine both use them, so the two can
only differ in how they organise the UNet work, which is what the parity tests compare.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .inputs import prepare_images, prepare_texts
from .methods import MethodSpec, resolve_method
from .ops._backend import BACKENDS
from .plan import Plan, make_plan


@dataclass
class Run:
    """A checked scoring request: pixels [N, 3, R, R] in [-1, 1], texts, plan, method."""

    model: Any
    pixels: torch.Tensor
    texts: list[str]
    plan: Plan
    spec: MethodSpec


def progress_disabled(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None (the default) shows a bar only on a terminal."""
    return None if progress is None else not progress


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    return backend


def prepare_run(
    images: Any,
    texts: Any,
    *,
    model: Any,
    method: str,
    timesteps: Any,
    seed: int | None,
    plan: Plan | None,
    resize: str,
    latent: str,
    scheme: str,
    options: dict,
) -> Run:
    """Validate everything before any model work, so a bad argument fails in milliseconds."""
    from .model import Model

    if model is None:
        from .model import load_model

        model = load_model()
    if not isinstance(model, Model):
        raise TypeError(f"model must be a fastitm Model (see fastitm.load_model), got {type(model).__name__}")
    spec = resolve_method(method, options)
    texts = prepare_texts(texts)
    pixels = prepare_images(images, model.resolution, resize)
    if plan is None:
        plan = make_plan(model, 10 if timesteps is None else timesteps, seed=0 if seed is None else seed,
                         scheme=scheme, latent=latent)
    else:
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a fastitm Plan (res.plan), got {type(plan).__name__}")
        if timesteps is not None or seed is not None:
            raise ValueError("pass either plan= or timesteps=/seed=, not both: the plan fixes them")
    plan.check_model(model)
    pred = model.scheduler.config.prediction_type
    if pred not in ("epsilon", "v_prediction"):
        raise ValueError(f"scheduler prediction_type {pred!r} is not supported (epsilon or v_prediction)")
    return Run(model, pixels, texts, plan, spec)


@torch.no_grad()
def encode_texts(model, texts: list[str]) -> torch.Tensor:
    """Texts -> CLIP last hidden states [M, L, D] (L = tokenizer.model_max_length, 77 for SD)."""
    tok = model.tokenizer
    ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    lengths = tok(texts, truncation=False).input_ids
    long = [j for j, t in enumerate(lengths) if len(t) > tok.model_max_length]
    if long:
        warnings.warn(f"texts {long} exceed {tok.model_max_length} tokens and were truncated", stacklevel=3)
    return model.text_encoder(ids.to(model.device))[0]


@torch.no_grad()
def encode_images(model, pixels: torch.Tensor, plan: Plan, first_index: int = 0) -> torch.Tensor:
    """pixels [n, 3, R, R] in [-1, 1] -> scaled latents [n, C, h, w] in the model's dtype.

    The posterior mean by default; with ``plan.latent == "sample"`` image ``first_index + i`` is
    sampled with a generator seeded ``plan.seed + 1 + first_index + i`` (independent of batching).
    """
    vae = model.vae
    dist = vae.encode(pixels.to(model.device, model.dtype)).latent_dist
    if plan.latent == "mean":
        z = dist.mean
    else:
        eps = torch.stack([
            torch.randn(dist.mean.shape[1:], generator=torch.Generator("cpu").manual_seed(plan.seed + 1 + first_index + i))
            for i in range(pixels.shape[0])
        ]).to(dist.mean.device, dist.mean.dtype)
        z = dist.mean + dist.std * eps
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        z = z - shift
    return z * model.scaling_factor


def noisy_latents(model, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) z + sqrt(1 - abar_t) noise, by the scheduler's own add_noise."""
    return model.scheduler.add_noise(z, noise.to(z.dtype), t)


def target(model, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict: the noise, or the velocity for v-prediction models."""
    if model.scheduler.config.prediction_type == "v_prediction":
        return model.scheduler.get_velocity(z, noise.to(z.dtype), t)
    return noise.to(z.dtype)


def cross_attention_layers(unet, which: str) -> list[tuple[str, Any]]:
    """The UNet's cross-attention modules (``attn2``), in forward order of the module tree.

    ``which="last"`` keeps the last one inside each down/mid/up block (one per block, at that
    block's resolution), as the published Discffusion code selects them.
    """
    layers = [(n, m) for n, m in unet.named_modules() if n.endswith("attn2") and getattr(m, "is_cross_attention", True)]
    if not layers:
        raise ValueError("the UNet has no cross-attention (attn2) layers")
    if which == "all":
        return layers
    last: dict[str, tuple[str, Any]] = {}
    for n, m in layers:
        parts = n.split(".")
        block = ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]
        last[block] = (n, m)
    return list(last.values())
