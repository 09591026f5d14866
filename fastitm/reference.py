"""The reference scorer: the numerical ground truth, written for clarity, not speed.

Its structure follows the published scripts: for every (image, text) pair and every timestep, one
conditional UNet call and, where the method needs it, one unconditional call, with the model's stock
attention processors. Discffusion's attention logits are recomputed from each cross-attention
layer's inputs by a forward pre-hook, so the UNet itself runs untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .core.methods import elimination_stages
from .core.plan import Plan
from .core.result import ScoreResult
from .core.weights import weighted_mean
from .engine.common import (
    Run,
    cross_attention_layers,
    denoise,
    encode_conditioning,
    encode_images,
    encode_posterior,
    noisy_latents,
    prepare_run,
    progress_disabled,
    target,
    timestep_latents,
)
from .ops.error_reduce import row_errors_ref


def attention_lse_ref(q: torch.Tensor, k: torch.Tensor, scale: float, pool: str, lam: float) -> torch.Tensor:
    """Row-wise LogSumExp pooling of one cross-attention layer's map, materialized.

    q [B, H, Lq, D], k [B, H, Lk, D] -> [B, H]: the mean over the Lq rows of
    LSE_j(scale * q.k_j) (``pool="logits"``) or LSE_j(lam * softmax_j(scale * q.k_j)) (``"probs"``).
    """
    logits = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    if pool == "probs":
        logits = lam * logits.softmax(dim=-1)
    return torch.logsumexp(logits, dim=-1).mean(dim=-1)


@contextmanager
def capture_attention_lse(unet, layers: str, pool: str, lam: float):
    """Within the block, every selected cross-attention layer appends its pooled [B, H] to a list.

    Yields the list of per-layer [B, H] tensors, in call order.
    """
    records: list[torch.Tensor] = []

    def hook(attn, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        enc = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if attn.norm_cross and enc is not None:
            enc = attn.norm_encoder_hidden_states(enc)
        if attn.group_norm is not None:
            hidden = attn.group_norm(hidden.transpose(1, 2)).transpose(1, 2)
        q, k = attn.to_q(hidden), attn.to_k(enc)
        b, h = q.shape[0], attn.heads
        q = q.view(b, -1, h, q.shape[-1] // h).transpose(1, 2)
        k = k.view(b, -1, h, k.shape[-1] // h).transpose(1, 2)
        records.append(attention_lse_ref(q, k, attn.scale, pool, lam))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for _, m in cross_attention_layers(unet, layers)]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def eliminate_ref(per_t: torch.Tensor, rounds, order: str = "spread",
                  requested: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive elimination replayed on complete per-timestep scores [N, M, T]: after round r (its
    timesteps from :func:`fastitm.core.methods.elimination_stages`), each image keeps its best keep_r
    texts by the mean over every timestep evaluated so far (ties: lower index). Returns the matrix
    (-inf for eliminated texts) and the per-timestep scores with NaN where the engine would not
    have computed them. ``requested`` [N, M]: the pairs asked for (the others stay NaN)."""
    N, M, T = per_t.shape
    stages = elimination_stages(T, rounds, order)
    masked = per_t.clone()
    matrix = per_t.mean(dim=2)
    for i in range(N):
        alive = [j for j in range(M) if requested is None or requested[i, j]]
        seen: list[int] = []
        # one stage per round, then the rest (no elimination after it): the last stage adds no round
        for (_, keep), stage in zip(rounds, stages[: len(rounds)], strict=True):
            seen += stage
            partial = {j: per_t[i, j, seen].mean().item() for j in alive}
            ranked = sorted(alive, key=lambda j: (-partial[j], j))
            for j in ranked[keep:]:
                later = [k for k in range(T) if k not in seen]
                masked[i, j, later] = float("nan")
                matrix[i, j] = float("-inf")
            alive = sorted(ranked[:keep])
    return matrix, masked


@torch.no_grad()
def score_run(run: Run, progress: bool | None = None) -> ScoreResult:
    """Score a checked :class:`Run` pair by pair, timestep by timestep."""
    from tqdm.auto import tqdm

    model, plan, spec = run.model, run.plan, run.spec
    unet, device = model.unet, model.device
    N, M, T = run.pixels.shape[0], len(run.texts), len(plan)
    per_t = torch.zeros(N, M, T, dtype=torch.float32)
    empty = encode_conditioning(model, [], empty=True) if spec.needs_uncond else None
    requested = run.requested()
    rows = int(requested.sum()) * T * (2 if spec.needs_uncond else 1)
    bar = tqdm(total=rows, desc=f"reference {spec.name}", unit="row", disable=progress_disabled(progress))
    opts = spec.options

    def unet_call(x, t, emb):  # -> (prediction, layer-mean attention term or None)
        if not spec.needs_attention:
            return denoise(model, x, t, emb), None
        with capture_attention_lse(unet, opts["layers"], opts["pool"], opts["lam"]) as rec:
            pred = denoise(model, x, t, emb)
        return pred, torch.stack([r.mean() for r in rec]).mean().cpu()

    for i in range(N):
        if plan.latent == "sample_per_timestep":  # a fresh posterior sample at every timestep
            mean, std = encode_posterior(model, run.pixels[i : i + 1])
        else:
            z = encode_images(model, run.pixels[i : i + 1], plan, first_index=run.image_offset + i)
        for j in range(M):
            if not requested[i, j]:  # not asked for (pairs=)
                per_t[i, j] = float("nan")
                continue
            cond = encode_conditioning(model, [run.texts[j]])
            for k in range(T):
                t = plan.timesteps[k : k + 1].to(device)
                noise = plan.noise[k : k + 1].to(device)
                if plan.latent == "sample_per_timestep":
                    z = timestep_latents(model, mean, std, plan, torch.tensor([run.image_offset + i]), torch.tensor([k]))
                x = noisy_latents(model, z, noise, t)
                tgt = target(model, z, noise, t)
                value = torch.zeros((), dtype=torch.float32)
                pred, attn = unet_call(x, t, cond)
                bar.update(1)
                pred_u = attn_u = None
                if spec.needs_uncond:
                    pred_u, attn_u = unet_call(x, t, empty)
                    bar.update(1)
                if attn is not None:
                    # mix_uncond: each layer's mean covers the [empty; text] pair of rows.
                    value = value + ((attn + attn_u) / 2 if spec.mix_uncond else attn)
                if spec.needs_error:
                    e = row_errors_ref(pred, tgt, None, spec.err)[0].cpu()
                    if spec.needs_uncond:
                        e = e - row_errors_ref(pred_u, tgt, None, spec.err)[0].cpu()
                    value = value - e
                per_t[i, j, k] = value
    bar.close()
    matrix = weighted_mean(per_t, run.weights)
    rounds = spec.options.get("elimination")
    if rounds:
        matrix, per_t = eliminate_ref(per_t, rounds, spec.options.get("order", "spread"), requested)
    return ScoreResult(
        matrix=matrix,
        plan=plan,
        method=spec.name,
        options=dict(spec.options),
        backend="reference",
        per_timestep=per_t,
        preset=run.preset,
        choices=dict(run.choices),
        family=model.family,
        weights=run.weights,
        stats={"unet_rows": rows, "vae_images": N,
               "text_encodes": int(requested.sum()) + (1 if spec.needs_uncond else 0)},
    )


def score(
    images: Any,
    texts: Sequence[str],
    *,
    model: Any = None,
    method: str = "diffusion_itm",
    timesteps: int | Sequence[int] | None = None,
    seed: int | None = None,
    plan: Plan | None = None,
    preset: str | None = None,
    resize: str | None = None,
    latent: str | None = None,
    scheme: str | None = None,
    noise: str | None = None,
    backend: str = "reference",
    progress: bool | None = None,
    pairs: Any = None,
    weights: Any = None,
    **options: Any,
) -> ScoreResult:
    """Reference scores [len(images), len(texts)]; same signature and numbers as :func:`fastitm.score`.

    ``timesteps`` defaults to 10 and ``seed`` to 0 unless a ``plan`` is given. Method options
    (``err``, ``normalize``, ``pool``, ``lam``, ``layers``, ``denoise``) are keyword arguments.
    """
    run = prepare_run(images, texts, model=model, method=method, timesteps=timesteps, seed=seed, plan=plan,
                      resize=resize, latent=latent, scheme=scheme, noise=noise, preset=preset, options=options,
                      backend=backend, pairs=pairs, weights=weights)
    return score_run(run, progress=progress)
