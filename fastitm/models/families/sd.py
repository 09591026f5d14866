"""Stable Diffusion 1.x / 2.x: a UNet2DConditionModel conditioned on one CLIP text encoder's last
hidden states, noised by the DDPM schedule (``alphas_cumprod``); epsilon or v-prediction.

Every family module defines the same few operations the scorers need (see
:mod:`fastitm.models.families`); the conditioning of a batch of texts is a dict of tensors whose first
dimension is the text, so the engine can gather rows from it for any family.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..._user import user_stacklevel
from .base import LCM_GUIDANCE_SCALE, Family, ModelError


class StableDiffusion(Family):
    name = "sd"
    label = "SD 1.x / 2.x"
    pipelines = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
    denoiser = "unet"
    text_parts = (("text_encoder", "tokenizer"),)
    methods = ("diffusion_itm", "discffusion", "diffusion_classifier")

    # -- loading --------------------------------------------------------------------------------
    def denoiser_class(self):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel

    def text_encoder_classes(self) -> dict[str, Any]:
        from transformers import CLIPTextModel

        return {"text_encoder": CLIPTextModel}

    def tokenizer_class(self, name: str):
        from transformers import CLIPTokenizer

        return CLIPTokenizer

    def scheduler_class(self):
        # Scoring needs only alphas_cumprod and add_noise, which every training-compatible scheduler
        # of SD shares: rebuild a DDPMScheduler from the saved config, whatever class it names.
        from diffusers import DDPMScheduler

        return DDPMScheduler

    # -- checks ---------------------------------------------------------------------------------
    def check(self, model) -> None:
        unet_cfg = model.unet.config
        if getattr(unet_cfg, "addition_embed_type", None) is not None:
            raise ModelError(
                f"unet.addition_embed_type={unet_cfg.addition_embed_type!r} needs extra conditioning: this is "
                "an SDXL-style UNet; save it with its two text encoders in StableDiffusionXLPipeline layout"
            )
        hidden = model.text_encoder.config.hidden_size
        if unet_cfg.cross_attention_dim != hidden:
            raise ModelError(f"unet.cross_attention_dim={unet_cfg.cross_attention_dim} does not match the text "
                             f"encoder's hidden_size={hidden}")
        self.check_schedule(model)

    def check_schedule(self, model) -> None:
        """The latents fit the VAE, and the scheduler is a DDPM-style one with a supported prediction."""
        self.check_latents(model)
        if not hasattr(model.scheduler, "alphas_cumprod"):
            raise ModelError(f"scheduler {type(model.scheduler).__name__} has no alphas_cumprod")
        pred = model.scheduler.config.prediction_type
        if pred not in ("epsilon", "v_prediction"):
            raise ModelError(f"scheduler prediction_type {pred!r} is not supported (epsilon or v_prediction)")

    def prediction(self, model) -> str:
        return model.scheduler.config.prediction_type

    # -- text -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, model, texts: list[str]) -> dict[str, torch.Tensor]:
        """Texts -> {"hidden": CLIP last hidden states [M, 77, D]}, as StableDiffusionPipeline; for a
        Latent Consistency Model also "timestep_cond" [M, time_cond_proj_dim], the guidance embedding
        its pipeline passes (:func:`guidance_embedding`)."""
        ids = clip_ids(model.tokenizer, texts)
        cond = {"hidden": model.text_encoder(ids.to(model.device))[0]}
        emb = guidance_embedding(model)
        if emb is not None:
            cond["timestep_cond"] = emb.expand(len(texts), -1)
        return cond

    # -- denoising ------------------------------------------------------------------------------
    def forward(self, denoiser, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return denoiser(x, t, encoder_hidden_states=cond["hidden"], timestep_cond=cond.get("timestep_cond")).sample

    def noisy(self, model, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) z + sqrt(1 - abar_t) noise, by the scheduler's own add_noise."""
        return model.scheduler.add_noise(z, noise.to(z.dtype), t)

    def target(self, model, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise, or the velocity for v-prediction models."""
        if model.scheduler.config.prediction_type == "v_prediction":
            return model.scheduler.get_velocity(z, noise.to(z.dtype), t)
        return noise.to(z.dtype)

    def target_is_noise(self, model) -> bool:
        return model.scheduler.config.prediction_type == "epsilon"


def clip_ids(tokenizer, texts: list[str], max_length: int | None = None) -> torch.Tensor:
    """Token ids [M, max_length] padded to the tokenizer's length (77 for CLIP), truncated as the
    pipelines do, with a warning naming the texts that were cut."""
    n = tokenizer.model_max_length if max_length is None else max_length
    ids = tokenizer(texts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
    long = [j for j, t in enumerate(tokenizer(texts, truncation=False).input_ids) if len(t) > n]
    if long:
        warnings.warn(f"texts {long} exceed the text encoder's {n} tokens and were truncated to their first {n} "
                      "(as the diffusers pipelines do)", stacklevel=user_stacklevel())
    return ids


def guidance_embedding(model) -> torch.Tensor | None:
    """[1, time_cond_proj_dim]: the guidance-scale embedding a Latent Consistency Model's UNet takes as
    ``timestep_cond``, as LatentConsistencyModelPipeline makes it (its ``get_guidance_scale_embedding``
    of ``w - 1``, w = ``model.guidance_scale``, 8.5 by default); None for other UNets."""
    dim = getattr(model.unet.config, "time_cond_proj_dim", None)
    if dim is None:
        return None
    from diffusers import LatentConsistencyModelPipeline

    w = LCM_GUIDANCE_SCALE if model.guidance_scale is None else model.guidance_scale
    # a method of the pipeline that reads nothing of it: called unbound, so the embedding is diffusers'
    emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor([w - 1.0]), embedding_dim=dim)
    return emb.to(device=model.device, dtype=model.dtype)
