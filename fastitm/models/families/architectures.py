"""The published denoiser architectures of each family, as configs (no weights, no downloads).

Built on the meta device they cost no memory, which lets a test check that fastitm's family code
constructs what users load (the parameter counts of the released checkpoints), and lets benchmarks
build full-size random-weight denoisers. Each config is the one saved in the released checkpoint's
``unet/config.json`` or ``transformer/config.json``, less keys equal to diffusers' defaults.
"""

from __future__ import annotations

from typing import Any

import torch

from . import get

_SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3

DENOISERS: dict[str, tuple[str, dict[str, Any]]] = {
    # (family, config); the published parameter counts are in the tests.
    "sd15": ("sd", dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), down_block_types=_SD_DOWN,
                        up_block_types=_SD_UP, layers_per_block=2, attention_head_dim=8, cross_attention_dim=768)),
    "sd21": ("sd", dict(sample_size=96, block_out_channels=(320, 640, 1280, 1280), down_block_types=_SD_DOWN,
                        up_block_types=_SD_UP, layers_per_block=2, attention_head_dim=(5, 10, 20, 20),
                        cross_attention_dim=1024, use_linear_projection=True, upcast_attention=True)),
    "sd21_base": ("sd", dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), down_block_types=_SD_DOWN,
                             up_block_types=_SD_UP, layers_per_block=2, attention_head_dim=(5, 10, 20, 20),
                             cross_attention_dim=1024, use_linear_projection=True)),
    "sdxl": ("sdxl", dict(sample_size=128, block_out_channels=(320, 640, 1280),
                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                          layers_per_block=2, transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                          cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                          addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                          projection_class_embeddings_input_dim=2816)),
    "sd3_medium": ("sd3", dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                               attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                               caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)),
}


def build_denoiser(name: str, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32):
    """The denoiser ``name`` (a key of :data:`DENOISERS`) with random weights on ``device``; on
    "meta" (the default) it takes no memory and no time, for counting and shape checks."""

    try:
        family, cfg = DENOISERS[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(DENOISERS)}") from None
    cls = get(family).denoiser_class()
    with torch.device(device):
        net = cls(**cfg)
    return net if dtype == torch.float32 else net.to(dtype)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
