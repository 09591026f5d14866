"""Helpers for tests and benchmarks: a random-weight tiny model and an explaining allclose."""

from __future__ import annotations

import torch

from . import data
from .models.families.architectures import build_denoiser
from .models.model import Model


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


def sd_scheduler(prediction_type: str = "epsilon"):
    """A DDPMScheduler with Stable Diffusion's noise schedule (scaled-linear betas 0.00085 to 0.012 over
    1,000 steps) and its clip_sample=False, steps_offset=1, so a diffusers pipeline built on it finds
    nothing outdated to warn about. Scoring uses its noise schedule alone."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=prediction_type, clip_sample=False, steps_offset=1)


def tiny_model(seed: int = 0, *, cross_attention_dim: int = 32, sample_size: int = 8,
               prediction_type: str = "epsilon", time_cond_proj_dim: int | None = None) -> Model:
    """A random-weight model of the Stable Diffusion 1.x/2.x architecture, built in well under a second.

    UNet2DConditionModel (two resolutions, cross-attention in both), AutoencoderKL (scale factor 2,
    so images are ``2 * sample_size`` pixels), a 2-layer CLIPTextModel and a small CLIP tokenizer.
    ``prediction_type="v_prediction"`` gives an SD 2.x-768-style v-prediction model;
    ``time_cond_proj_dim`` a Latent Consistency Model's UNet (it takes a guidance embedding).
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

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
            time_cond_proj_dim=time_cond_proj_dim,
        )
        vae = _tiny_vae(4, sample_size)
        text_encoder = _tiny_clip(CLIPTextModel, tokenizer, cross_attention_dim, intermediate=64)
    return Model(unet, vae, text_encoder, tokenizer, sd_scheduler(prediction_type), source=f"tiny_model(seed={seed})")


def _tiny_vae(latent_channels: int, sample_size: int, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                         latent_channels=latent_channels, layers_per_block=1, norm_num_groups=16,
                         sample_size=2 * sample_size, **kw)


def _tiny_clip(cls, tokenizer, hidden: int, layers: int = 2, projection_dim: int | None = None,
               intermediate: int | None = None):
    from transformers import CLIPTextConfig

    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    return cls(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                              intermediate_size=2 * hidden if intermediate is None else intermediate,
                              num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **extra))


def tiny_sdxl_model(seed: int = 0, *, sample_size: int = 8, force_zeros_for_empty_prompt: bool = True) -> Model:
    """A random-weight model of the SDXL architecture: a UNet with ``text_time`` added conditioning
    (6 time ids x 8 + a 16-wide pooled text embedding), a down block without cross-attention and a
    cross-attention block of 2 transformer layers, two CLIP text encoders (24 + 40 = 64-wide
    context; the second with a projection, its tokenizer padding with "!" as SDXL's does)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok1 = tiny_tokenizer()
    tok2 = tiny_tokenizer()
    tok2.pad_token = "!"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=64,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 16, norm_num_groups=16,
        )
        vae = _tiny_vae(4, sample_size, scaling_factor=0.13025)
        te1 = _tiny_clip(CLIPTextModel, tok1, 24)
        te2 = _tiny_clip(CLIPTextModelWithProjection, tok2, 40, projection_dim=16)
    return Model(unet, vae, te1, tok1, sd_scheduler(), source=f"tiny_sdxl_model(seed={seed})", family="sdxl",
                 parts={"text_encoder_2": te2, "tokenizer_2": tok2},
                 pipeline_config={"force_zeros_for_empty_prompt": force_zeros_for_empty_prompt})


def tiny_t5_tokenizer(words=_TINY_WORDS):
    """A T5 (SentencePiece-unigram) tokenizer over ``words`` and single letters, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -1.0) for w in words]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,'-"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


def tiny_sd3_model(seed: int = 0, *, sample_size: int = 8, t5: bool = True) -> Model:
    """A random-weight model of the SD 3 architecture: an SD3Transformer2DModel (2 joint blocks,
    patch 2, 8 latent channels, 64-wide joint attention), a VAE with a shift factor, two CLIP text
    encoders with projections (16 + 24 wide, zero-padded to 64), a 1-layer T5 encoder (``t5=False``:
    none, as SD 3 allows) and the flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tok1, tok2 = tiny_tokenizer(), tiny_tokenizer()
    tok2.pad_token = "!"
    tok3 = tiny_t5_tokenizer() if t5 else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=sample_size, patch_size=2, in_channels=8, out_channels=8, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=32,
            pos_embed_max_size=sample_size // 2,
        )
        vae = _tiny_vae(8, sample_size, scaling_factor=1.5305, shift_factor=0.0609)
        te1 = _tiny_clip(CLIPTextModelWithProjection, tok1, 16, projection_dim=16)
        te2 = _tiny_clip(CLIPTextModelWithProjection, tok2, 24, projection_dim=16)
        te3 = None
        if t5:
            te3 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=64, d_ff=64, d_kv=16, num_layers=1,
                                          num_heads=2, pad_token_id=tok3.pad_token_id, eos_token_id=tok3.eos_token_id))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return Model(transformer, vae, te1, tok1, scheduler, source=f"tiny_sd3_model(seed={seed})", family="sd3",
                 parts={"text_encoder_2": te2, "tokenizer_2": tok2, "text_encoder_3": te3, "tokenizer_3": tok3})


def sd21_base_architecture(seed: int = 0, *, device="cpu", dtype=torch.float32) -> Model:
    """A random-weight model with Stable Diffusion 2.1-base's architecture (512 px images, 4x64x64
    latents, UNet 320/640/1280/1280 with linear projections and head dims 5/10/20/20, a 23-layer
    1024-wide CLIP text encoder). Random weights give true timings: for benchmarks, not scores (on a
    GPU they are drawn there, so they differ from the CPU's for the same seed).
    The tokenizer is :func:`tiny_tokenizer` (its ids all fall inside the model's vocabulary).
    ``device="meta"``: the networks without weights (for shape and size checks)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    meta = torch.device(device).type == "meta"  # shapes and counts only: no memory, no time
    # On a GPU the random initialisation runs there: 1.3 billion parameters initialised on the CPU took
    # 28 s of the H200 check, which left its levers stage 27 s, short of a lever's 30 (the weights differ
    # from the CPU's; only timings matter).
    build = torch.device(device) if torch.device(device).type in ("meta", "cuda") else torch.device("cpu")
    cuda_rng = [build.index if build.index is not None else torch.cuda.current_device()] if build.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_rng), build:
        torch.manual_seed(seed)
        unet = build_denoiser("sd21_base", device=build)
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
    model = Model(unet, vae, text_encoder, tokenizer, sd_scheduler(), source=f"sd21_base_architecture(seed={seed})")
    if not meta and (torch.device(device).type != "cpu" or dtype != torch.float32):
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


def write_jsonl_set(folder, n: int, *, seed: int = 0, negatives: int = 1, size: int = 16):
    """``n`` held-out synthetic scenes written as a ``jsonl`` task under ``folder`` (``<k>.png`` and
    ``set.jsonl``: each image against its true caption, first, and ``negatives`` hard negatives); returns
    the .jsonl path. What the tests and examples evaluate when a small labelled set is needed."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for k, e in enumerate(data.make_dataset(n, "heldout", seed=seed, size=size)):
        e.image.save(folder / f"{k}.png")
        lines.append({"image": f"{k}.png", "texts": [e.caption, *list(e.negatives.values())[:negatives]], "label": 0})
    path = folder / "set.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    return path
