"""Helpers for tests and benchmarks: a random-weight tiny model and an explaining allclose."""

from __future__ import annotations

import torch

from .model import Model

# One character per byte, as CLIP's byte-level BPE sees it (GPT-2's printable mapping of bytes).
def _byte_alphabet() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


# A few whole words so that common captions tokenize to words, not only characters.
_TINY_WORDS = (
    "a an the dog cat red blue green yellow circle square triangle left right of above below "
    "small big and photo on in"
).split()


def tiny_tokenizer(words=_TINY_WORDS):
    """A CLIP tokenizer over a small vocabulary: all bytes, their word-final forms, and merges that
    build ``words`` left to right (most become one token; a word can stay in pieces where an earlier
    word's merge outranks its own, e.g. "green" after "red"). Any other text still tokenizes."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for tok in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        # Merge left to right so "dog</w>" is built as d+o -> do, do+g</w> -> dog</w>.
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            rule = (parts[0], parts[1])
            if rule not in merges:
                merges.append(rule)
            vocab.setdefault(merged, len(vocab))
            parts = [merged] + parts[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def tiny_model(seed: int = 0, *, cross_attention_dim: int = 32, sample_size: int = 8) -> Model:
    """A random-weight model of the Stable Diffusion architecture, built in well under a second.

    UNet2DConditionModel (two resolutions, cross-attention in both), AutoencoderKL (scale factor 2,
    so images are ``2 * sample_size`` pixels), a 2-layer CLIPTextModel and a small CLIP tokenizer.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    g = torch.random.fork_rng(devices=[])
    with g:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=(2, 4),
            norm_num_groups=16,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(16, 32),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=16,
            sample_size=2 * sample_size,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=cross_attention_dim,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    return Model(unet, vae, text_encoder, tokenizer, scheduler, source=f"tiny_model(seed={seed})")


def sd21_base_architecture(seed: int = 0, *, device="cpu", dtype=torch.float32) -> Model:
    """A random-weight model with Stable Diffusion 2.1-base's architecture (512 px images, 4x64x64
    latents, UNet 320/640/1280/1280 with linear projections and head dims 5/10/20/20, a 23-layer
    1024-wide CLIP text encoder). Random weights give true timings: for benchmarks, not scores.
    The tokenizer is :func:`tiny_tokenizer` (its ids all fall inside the model's vocabulary)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024,
            use_linear_projection=True,
            layers_per_block=2,
        )
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
            num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    model = Model(unet, vae, text_encoder, tokenizer, scheduler, source=f"sd21_base_architecture(seed={seed})")
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        model.to(device=device, dtype=dtype)
    return model


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, name: str = ""):
    """``torch.testing.assert_close`` semantics, with a message naming the worst element and the
    count and share of failures, and NaN/Inf disagreements."""
    actual = actual.detach().float().cpu()
    expected = expected.detach().float().cpu()
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    nan_mismatch = torch.isnan(actual) != torch.isnan(expected)
    diff = (actual - expected).abs()
    tol = atol + rtol * expected.abs()
    bad = (diff > tol) | nan_mismatch
    bad &= ~(torch.isnan(actual) & torch.isnan(expected))
    if bad.any():
        score = torch.where(bad, diff / tol.clamp_min(1e-30), torch.zeros_like(diff))
        score = torch.nan_to_num(score, nan=float("inf"))
        idx = tuple(int(i) for i in torch.unravel_index(score.argmax(), score.shape))
        n = int(bad.sum())
        raise AssertionError(
            f"{name}: {n}/{bad.numel()} ({100 * n / bad.numel():.2f}%) elements differ beyond "
            f"atol={atol} rtol={rtol}; worst at {idx}: {actual[idx].item()!r} vs "
            f"{expected[idx].item()!r} (|diff|={diff[idx].item():.3e}); "
            f"NaN disagreements: {int(nan_mismatch.sum())}"
        )
