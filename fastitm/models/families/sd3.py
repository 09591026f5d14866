"""Stable Diffusion 3 / 3.5: a flow-matching MMDiT transformer (StableDiffusion3Pipeline layout).

Noising and target (rectified flow): x_t = (1 - sigma) z + sigma eps, and the transformer predicts
the velocity eps - z. A plan timestep t in [0, 1000) is the noise level sigma = t / 1000 and the
transformer's timestep input is t itself (sigma * 1000, as the pipeline passes it). Sigma is linear
in t, so the plan's schemes are uniform over sigma: the scheduler's ``shift`` (3.0 for SD 3), which
concentrates *sampling* steps at high noise, is deliberately not applied. Scoring with the shifted
schedule weights the timesteps badly for matching, which is why ports of the Diffusion Classifier
that index the sampler's shifted timesteps score far below SD 1.5.

Text: as the pipeline's ``encode_prompt``: both CLIP encoders' penultimate hidden states
concatenated (768 + 1280), zero-padded to the T5 width, then the T5 encoder's states appended on
the sequence axis (77 + 256 tokens); pooled = both CLIP projections concatenated. A folder without
text_encoder_3 gets zeros for the T5 part, as the pipeline does. The empty prompt is "" encoded the
same way (the SD 3 pipeline never zeroes it).

Discffusion is not available: SD 3 has no cross-attention layer to pool (text and image tokens
attend jointly), and the published method is defined on UNet cross-attention.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Family, ModelError
from .sd import clip_ids

T5_MAX_LENGTH = 256  # the pipeline's max_sequence_length default


class StableDiffusion3(Family):
    name = "sd3"
    label = "SD 3 / 3.5"
    pipelines = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
    denoiser = "transformer"
    text_parts = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3"))
    methods = ("diffusion_itm", "diffusion_classifier")
    flow = True
    optional_encoders = ("text_encoder_3",)  # without T5 the pipeline uses zeros in its place

    def denoiser_class(self):
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel

    def text_encoder_classes(self) -> dict[str, Any]:
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        return {"text_encoder": CLIPTextModelWithProjection, "text_encoder_2": CLIPTextModelWithProjection,
                "text_encoder_3": T5EncoderModel}

    def tokenizer_class(self, name: str):
        from transformers import CLIPTokenizer, T5TokenizerFast

        return T5TokenizerFast if name == "tokenizer_3" else CLIPTokenizer

    def scheduler_class(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler

    def unsupported_reason(self, method: str) -> str:
        if method == "discffusion":
            return (" (discffusion pools UNet cross-attention maps; SD 3's joint attention has no cross-attention "
                    "layer, use an SD 1.x/2.x or SDXL model for it)")
        return ""

    def check(self, model) -> None:
        from transformers import CLIPTextModelWithProjection

        cfg = model.unet.config
        te1, te2, te3 = (model.part(f"text_encoder{s}") for s in ("", "_2", "_3"))
        for name, te in (("text_encoder", te1), ("text_encoder_2", te2)):
            if not isinstance(te, CLIPTextModelWithProjection):
                raise ModelError(f"{name} is a {type(te).__name__}; SD 3 needs a CLIPTextModelWithProjection")
        pooled = te1.config.projection_dim + te2.config.projection_dim
        if cfg.pooled_projection_dim != pooled:
            raise ModelError(f"transformer.pooled_projection_dim={cfg.pooled_projection_dim} does not match the CLIP "
                             f"projections {te1.config.projection_dim} + {te2.config.projection_dim}")
        clip_width = te1.config.hidden_size + te2.config.hidden_size
        if clip_width > cfg.joint_attention_dim:
            raise ModelError(f"the CLIP encoders' width {clip_width} exceeds transformer.joint_attention_dim="
                             f"{cfg.joint_attention_dim}")
        if te3 is not None and te3.config.d_model != cfg.joint_attention_dim:
            raise ModelError(f"text_encoder_3.d_model={te3.config.d_model} does not match "
                             f"transformer.joint_attention_dim={cfg.joint_attention_dim}")
        self.check_latents(model)
        if "num_train_timesteps" not in model.scheduler.config:
            raise ModelError(f"scheduler {type(model.scheduler).__name__} has no num_train_timesteps")

    def prediction(self, model) -> str:
        return "flow"

    @torch.no_grad()
    def encode(self, model, texts: list[str]) -> dict[str, torch.Tensor]:
        """Texts -> {"hidden" [M, 77 + 256, joint_attention_dim], "pooled" [M, P1 + P2]}."""
        hidden, pooled = [], []
        for enc, tok in self.text_parts[:2]:
            out = model.part(enc)(clip_ids(model.part(tok), texts).to(model.device), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        clip = torch.cat(hidden, dim=-1)
        width = int(model.unet.config.joint_attention_dim)
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
        t5 = model.part("text_encoder_3")
        if t5 is None:
            t5_states = torch.zeros(len(texts), T5_MAX_LENGTH, width, device=model.device, dtype=clip.dtype)
        else:
            ids = clip_ids(model.part("tokenizer_3"), texts, T5_MAX_LENGTH)
            t5_states = t5(ids.to(model.device))[0].to(clip.dtype)
        return {"hidden": torch.cat([clip, t5_states], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

    def forward(self, denoiser, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        # The pipeline passes the scheduler's float timesteps (sigma * 1000).
        return denoiser(hidden_states=x, timestep=t.to(torch.float32), encoder_hidden_states=cond["hidden"],
                        pooled_projections=cond["pooled"], return_dict=False)[0]

    def sigma(self, model, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """sigma = t / num_train_timesteps, shaped to broadcast over ``like`` [n, C, h, w]."""
        s = t.to(torch.float32) / self.num_train_timesteps(model)
        return s.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def noisy(self, model, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self.sigma(model, t, z)
        # The order of FlowMatchEulerDiscreteScheduler.scale_noise: sigma * noise + (1 - sigma) * z.
        return s * noise.to(z.dtype) + (1.0 - s) * z

    def target(self, model, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise.to(z.dtype) - z
