"""Stable Diffusion XL: a UNet conditioned on two CLIP text encoders (StableDiffusionXLPipeline).

The conditioning follows the pipeline's ``encode_prompt``: each encoder's penultimate hidden states,
concatenated on the feature axis (768 + 1280 = 2048 for SDXL base); the pooled text embedding of the
second encoder (CLIPTextModelWithProjection); and ``add_time_ids`` = (original size, crop top-left,
target size) = (R, R, 0, 0, R, R) for the R-pixel images scored. The empty prompt is zeros where the
folder's ``force_zeros_for_empty_prompt`` is true (SDXL base), else "" encoded like a caption.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import ModelError
from .sd import StableDiffusion, clip_ids


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    label = "SDXL"
    pipelines = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
    text_parts = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))

    def text_encoder_classes(self) -> dict[str, Any]:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        return {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}

    def pipeline_config(self, index: dict) -> dict:
        # The SDXL pipeline registers force_zeros_for_empty_prompt=True unless the folder says otherwise.
        return {"force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True))}

    def check(self, model) -> None:
        from transformers import CLIPTextModelWithProjection

        cfg = model.unet.config
        te1, te2 = model.part("text_encoder"), model.part("text_encoder_2")
        if te2 is None or not isinstance(te2, CLIPTextModelWithProjection):
            raise ModelError("an SDXL model needs text_encoder_2 to be a CLIPTextModelWithProjection (refiner-only "
                             "folders without the first text encoder are not supported)")
        if getattr(cfg, "addition_embed_type", None) != "text_time":
            raise ModelError(f"unet.addition_embed_type={getattr(cfg, 'addition_embed_type', None)!r}; an SDXL UNet "
                             "has 'text_time'")
        width = te1.config.hidden_size + te2.config.hidden_size
        if cfg.cross_attention_dim != width:
            raise ModelError(f"unet.cross_attention_dim={cfg.cross_attention_dim} does not match the two text "
                             f"encoders' concatenated width {te1.config.hidden_size} + {te2.config.hidden_size}")
        expected = model.unet.add_embedding.linear_1.in_features
        passed = cfg.addition_time_embed_dim * 6 + te2.config.projection_dim
        if expected != passed:
            raise ModelError(f"the UNet's added embedding takes {expected} features but 6 time ids x "
                             f"{cfg.addition_time_embed_dim} + the pooled text's {te2.config.projection_dim} = "
                             f"{passed} (a refiner with aesthetic-score ids is not supported)")
        self.check_schedule(model)

    @torch.no_grad()
    def encode(self, model, texts: list[str]) -> dict[str, torch.Tensor]:
        """Texts -> {"hidden" [M, 77, D1 + D2], "pooled" [M, P], "time_ids" [M, 6]}."""
        hidden = []
        pooled = None
        for enc, tok in self.text_parts:
            out = model.part(enc)(clip_ids(model.part(tok), texts).to(model.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the projected pooled output: the second encoder's
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return {"hidden": torch.cat(hidden, dim=-1), "pooled": pooled, "time_ids": self.time_ids(model, len(texts))}

    def encode_empty(self, model) -> dict[str, torch.Tensor]:
        cond = self.encode(model, [""])
        if model.pipeline_config.get("force_zeros_for_empty_prompt", True):
            cond["hidden"] = torch.zeros_like(cond["hidden"])
            cond["pooled"] = torch.zeros_like(cond["pooled"])
        return cond

    def time_ids(self, model, n: int) -> torch.Tensor:
        r = model.resolution
        return torch.tensor([[r, r, 0, 0, r, r]], dtype=model.dtype, device=model.device).expand(n, 6).clone()

    def forward(self, denoiser, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
        return denoiser(x, t, encoder_hidden_states=cond["hidden"], added_cond_kwargs=added).sample
