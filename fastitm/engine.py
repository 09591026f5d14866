"""The scoring engine: the reference computation, reorganised to share work and use the fused ops.

- Each image is encoded by the VAE once, each text and the empty prompt by the text encoder once.
- UNet rows (image i, timestep k, text j or the unconditional row) are packed across images,
  timesteps and texts into batches of ``batch_size``; the unconditional row of (i, k) is computed
  once and reused by every text, and only when the method needs it.
- Errors go through the fused error reduction straight into the per-timestep score buffer;
  Discffusion's pooling comes from the fused cross-attention processor, never from attention maps.
Memory is bounded by the batch size, whatever the numbers of images, texts and timesteps.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

from .attention import lse_pooling
from .common import Run, encode_images, encode_texts, noisy_latents, progress_disabled, target
from .ops.error_reduce import error_reduce
from .result import ScoreResult


def default_batch_size(device: torch.device) -> int:
    return 32 if device.type == "cuda" else 8


def plan_rows(N: int, M: int, T: int, needs_uncond: bool) -> torch.Tensor:
    """[R, 3] int64 rows (image, text or -1, timestep), ordered so that each (image, timestep)
    group is contiguous with its unconditional row first."""
    texts = ([-1] if needs_uncond else []) + list(range(M))
    i, k, j = torch.meshgrid(torch.arange(N), torch.arange(T), torch.tensor(texts, dtype=torch.long), indexing="ij")
    return torch.stack([i.flatten(), j.flatten(), k.flatten()], dim=1)


@torch.no_grad()
def score_run(run: Run, *, backend: str = "auto", batch_size: int | None = None,
              progress: bool | None = None) -> ScoreResult:
    from tqdm.auto import tqdm

    model, plan, spec = run.model, run.plan, run.spec
    device, dtype = model.device, model.dtype
    N, M, T = run.pixels.shape[0], len(run.texts), len(plan)
    bs = batch_size or default_batch_size(device)
    if bs < 1:
        raise ValueError(f"batch_size must be at least 1, got {bs}")

    # Work sharing: every encoder call happens once.
    z = torch.cat([encode_images(model, run.pixels[a : a + bs], plan, first_index=a) for a in range(0, N, bs)])
    emb = encode_texts(model, run.texts + ([""] if spec.needs_uncond else []))  # [M (+1), L, D]
    noise = plan.noise.to(device=device, dtype=dtype)
    timesteps = plan.timesteps.to(device)
    v_pred = model.scheduler.config.prediction_type == "v_prediction"
    flat_noise = noise.flatten(1)

    rows = plan_rows(N, M, T, spec.needs_uncond)
    R = rows.shape[0]
    per_t = torch.zeros(N, M, T, dtype=torch.float32, device=device)
    uncond = torch.zeros(N, T, dtype=torch.float32, device=device)
    rows_dev = rows.to(device)
    opts = spec.options
    with ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=R, desc=f"fastitm {spec.name}", unit="row",
                                       disable=progress_disabled(progress)))
        sink = None
        if spec.needs_attention:
            sink = stack.enter_context(lse_pooling(model.unet, opts["layers"], opts["pool"], opts["lam"], backend))
        for a in range(0, R, bs):
            r = rows_dev[a : a + bs]
            i, j, k = r[:, 0], r[:, 1], r[:, 2]
            t = timesteps[k]
            zi, nk = z[i], noise[k]
            x = noisy_latents(model, zi, nk, t)
            cond = emb[torch.where(j < 0, M, j)]
            if sink is not None:
                sink.reset()
            pred = model.unet(x, t, encoder_hidden_states=cond).sample
            if spec.needs_error:
                if v_pred:
                    tgt, row_target = target(model, zi, nk, t).flatten(1), torch.arange(len(r), device=device)
                else:  # the target is the plan's noise row: no per-row copy
                    tgt, row_target = flat_noise, k
                error_reduce(pred.flatten(1), tgt, row_target, i, j, k, uncond, per_t=per_t,
                             err=spec.err, normalize=spec.needs_uncond, backend=backend)
            if sink is not None:
                pooled = sink.row_scores().float()
                text_rows = j >= 0
                per_t[i[text_rows], j[text_rows], k[text_rows]] += pooled[text_rows]
            bar.update(len(r))
    per_t = per_t.cpu()
    return ScoreResult(
        matrix=per_t.mean(dim=2),
        plan=plan,
        method=spec.name,
        options=dict(spec.options),
        backend=backend,
        per_timestep=per_t,
        stats={"unet_rows": R, "vae_images": N, "text_encodes": M + (1 if spec.needs_uncond else 0),
               "batch_size": bs},
    )
