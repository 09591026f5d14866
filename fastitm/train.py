"""Train the embedded default model on the project's synthetic data, on the CPU.

    python -m fastitm.train --out fastitm/assets/default_model

A small model of the Stable Diffusion architecture in diffusers layout (AutoencoderKL,
UNet2DConditionModel with cross-attention, CLIPTextModel and a CLIP tokenizer, DDPM schedule), so it
runs through exactly the code a real checkpoint does. Two stages, both on :mod:`fastitm.data`'s
train split only:

1. the VAE (32 px images -> 4x8x8 latents), on reconstruction plus a small KL term;
2. the UNet and the text encoder together, on the epsilon-prediction loss over the VAE's latents
   (posterior means), with 10% of captions dropped to the empty prompt so the unconditional
   prediction DiffusionITM normalizes by is trained too.

Everything is seeded; the command, steps, losses and data go into a model card (README.md) beside
the weights. Defaults take about 50 minutes on 2 idle CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data
from .models.model import Model
from .testing import sd_scheduler, tiny_tokenizer

IMAGE_SIZE = 32


def build_model(seed: int = 0):
    """The untrained default-model architecture (random weights from ``seed``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer(data.vocabulary())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, sample_size=IMAGE_SIZE,
        )
        unet = UNet2DConditionModel(
            sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4,
            block_out_channels=(64, 128), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=128, attention_head_dim=(4, 8), norm_num_groups=16,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ))
    return Model(unet, vae, text_encoder, tokenizer, sd_scheduler(), source="fastitm default (training)")


def to_pixels(images) -> torch.Tensor:
    """PIL images -> [N, 3, H, W] in [-1, 1].

    Not :func:`fastitm.core.inputs.prepare_images` (same mapping, x / 255 * 2 - 1): its rounding differs
    in the last bit from x / 127.5 - 1, and the shipped weights were trained with this one, so the
    recorded command reproduces them only if it stays."""
    import numpy as np

    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def lr_at(step: int, steps: int, base: float, warmup: int = 200) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_vae(vae, pixels: torch.Tensor, steps: int, batch: int, lr: float, kl: float, log, gen):
    from tqdm.auto import tqdm

    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    history = []
    bar = tqdm(range(steps), desc="vae", unit="step")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        x = pixels[torch.randint(len(pixels), (batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss_rec = F.mse_loss(rec, x)
        loss_kl = post.kl().mean() / z[0].numel()
        loss = loss_rec + kl * loss_kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            history.append({"step": step, "rec_mse": round(loss_rec.item(), 5), "kl": round(loss_kl.item(), 4)})
            bar.set_postfix(rec=f"{loss_rec.item():.4f}")
            log(f"vae step {step} rec_mse {loss_rec.item():.5f} kl {loss_kl.item():.4f}")
    vae.eval().requires_grad_(False)
    return history


@torch.no_grad()
def encode_means(vae, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(pixels[a : a + batch]).latent_dist.mean for a in range(0, len(pixels), batch)])


def train_denoiser(model, latents, captions, steps, batch, lr, drop, log, gen, save=None, save_every=0):
    from tqdm.auto import tqdm

    unet, te, tok, sched = model.unet, model.text_encoder, model.tokenizer, model.scheduler
    ids_all = tok(captions + [""], padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
    empty = ids_all[-1]
    ids_all = ids_all[:-1]
    params = list(unet.parameters()) + list(te.parameters())
    for m in (unet, te):
        m.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    abar = sched.alphas_cumprod
    history, running = [], []
    bar = tqdm(range(steps), desc="unet+text", unit="step")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        idx = torch.randint(len(latents), (batch,), generator=gen)
        z = latents[idx]
        ids = ids_all[idx].clone()
        ids[torch.rand(batch, generator=gen) < drop] = empty
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        eps = torch.randn(z.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        x = a.sqrt() * z + (1 - a).sqrt() * eps
        pred = unet(x, t, encoder_hidden_states=te(ids)[0]).sample
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            mean = sum(running) / len(running)
            running = []
            history.append({"step": step, "loss": round(mean, 5)})
            bar.set_postfix(loss=f"{mean:.4f}")
            log(f"unet step {step} loss {mean:.5f}")
        if save is not None and save_every and step and step % save_every == 0:
            for m in (unet, te):
                m.eval()
            save()  # a usable model on disk while training goes on: an interruption loses little
            for m in (unet, te):
                m.train()
    for m in (unet, te):
        m.eval().requires_grad_(False)
    return history


def write_card(out: str | Path) -> Path:
    """The model card (README.md) from the training record ``training.json`` beside the weights."""
    out = Path(out)
    info = json.loads((out / "training.json").read_text())
    a = info["args"]
    vae, unet = info["vae_history"], info["unet_history"]
    pick = lambda h, n: [h[round(i * (len(h) - 1) / (n - 1))] for i in range(n)]  # noqa: E731
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    lines = [
        "# fastitm default model",
        "",
        "A small text-to-image latent diffusion model of the Stable Diffusion architecture, in diffusers",
        "layout (AutoencoderKL, UNet2DConditionModel with cross-attention, CLIPTextModel, CLIP tokenizer,",
        "DDPM scaled-linear schedule, epsilon prediction), trained from scratch by fastitm on its own",
        "synthetic data so that `fastitm.load_model()` works offline. It knows only the synthetic world:",
        f"32x32 images of one or two objects ({', '.join(data.COLORS)}; {', '.join(data.SHAPES)}; "
        f"{', '.join(data.SIZES)}; {', '.join(data.RELATIONS)}).",
        "",
        "## Reproduce",
        "",
        "```bash",
        info["command"],
        "```",
        "",
        f"Seed {a['seed']}; {a['images']} training images from `fastitm.data.make_dataset({a['images']}, 'train', "
        f"seed={a['seed']})` (the held-out split's combinations are never used); torch {info['torch']} on "
        f"{info['machine']}. Multi-threaded CPU kernels may differ in the last bits between machines.",
        "",
        "## Training",
        "",
        f"1. VAE: {a['vae_steps']} steps, batch {a['vae_batch']}, AdamW lr {a['vae_lr']} (warm-up, cosine), loss "
        f"reconstruction MSE + {a['vae_kl']} x KL per latent element; {info['seconds']['vae']} s. Latent scaling "
        f"factor 1/std of the training latents = {info['vae_scaling_factor']:.5f}.",
        f"2. UNet + text encoder: {a['unet_steps']} steps, batch {a['unet_batch']}, AdamW lr {a['unet_lr']} "
        f"(warm-up, cosine), weight decay 0.01, gradient clipping 1.0, epsilon-prediction MSE at uniform "
        f"timesteps, {a['caption_drop']:.0%} of captions replaced by the empty prompt; "
        f"{info['seconds']['unet_text']} s.",
        f"Total {info['seconds']['total'] / 60:.0f} min. Parameters: "
        + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in info["parameters"].items())
        + f"; {size:.1f} MB on disk (safetensors, float32).",
        "",
        "| VAE step | reconstruction MSE | KL |",
        "|---|---|---|",
        *[f"| {h['step']} | {h['rec_mse']} | {h['kl']} |" for h in pick(vae, 6)],
        "",
        "| UNet step | loss (mean since previous row) |",
        "|---|---|",
        *[f"| {h['step']} | {h['loss']} |" for h in pick(unet, 8)],
        "",
        "The full curves are in `training.json`, the log in `train_log.txt`.",
        "",
    ]
    card = out / "README.md"
    extra = out / "EVALUATION.md"
    if extra.is_file():
        lines += [extra.read_text()]
    card.write_text("\n".join(lines))
    return card


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastitm.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the model (diffusers layout) and its card")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=24000, help="training images rendered (train split)")
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4)
    p.add_argument("--unet-steps", type=int, default=6000)
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--caption-drop", type=float, default=0.1)
    p.add_argument("--save-every", type=int, default=1000, help="save the model every N denoiser steps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.txt"
    log_file = log_path.open("w")
    t_start = time.time()

    def log(msg: str) -> None:
        log_file.write(f"[{time.time() - t_start:7.1f}s] {msg}\n")
        log_file.flush()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    log(f"command: python -m fastitm.train {' '.join(argv if argv is not None else sys.argv[1:])}")
    examples = data.make_dataset(args.images, "train", seed=args.seed, size=IMAGE_SIZE)
    pixels = to_pixels([e.image for e in examples])
    captions = [e.caption for e in examples]
    log(f"rendered {len(examples)} train images in {time.time() - t_start:.1f}s")
    model = build_model(args.seed)

    t0 = time.time()
    vae_hist = train_vae(model.vae, pixels, args.vae_steps, args.vae_batch, args.vae_lr, args.vae_kl, log, gen)
    vae_time = time.time() - t0
    latents = encode_means(model.vae, pixels)
    scale = 1.0 / latents.std().item()
    model.vae.register_to_config(scaling_factor=scale)
    latents = latents * scale
    log(f"latents {tuple(latents.shape)}, scaling_factor {scale:.5f}")

    t0 = time.time()
    unet_hist = train_denoiser(model, latents, captions, args.unet_steps, args.unet_batch, args.unet_lr,
                               args.caption_drop, log, gen, save=lambda: model.save(out),
                               save_every=args.save_every)
    unet_time = time.time() - t0
    model.source = str(out)
    model.save(out)
    total = time.time() - t_start
    log(f"done in {total:.0f}s")
    log_file.close()

    info = {
        "command": "python -m fastitm.train " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args),
        "seconds": {"vae": round(vae_time), "unet_text": round(unet_time), "total": round(total)},
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "vae_scaling_factor": scale,
        "vae_history": vae_hist,
        "unet_history": unet_hist,
        "parameters": {n: sum(x.numel() for x in getattr(model, n).parameters())
                       for n in ("unet", "vae", "text_encoder")},
    }
    (out / "training.json").write_text(json.dumps(info, indent=1))
    write_card(out)
    print(f"saved to {out} in {total / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
