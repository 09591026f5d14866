"""The ``fused-ops`` stage of ``make gpu-check`` (see ``__main__.py``)."""

from __future__ import annotations

import torch
from stages_common import HEAD_DIM, KEYS, SD21_LAYERS, Ctx, event_ms, load_ceilings


def forward_tiles(ctx: Ctx, q, k, v) -> dict:
    """Each tile the forward's autotuner may pick (BLOCK_M, warps, register cap), timed alone on the same
    inputs, beside the autotuner's choice: what the register caps buy (four or five programs per SM
    instead of two under Triton 3.6, no spill) against the instruction-level parallelism ptxas gives up.
    On the CPU (--smoke) the same launches run under the interpreter, once each."""
    from fastitm.kernels import _tuning
    from fastitm.kernels import cross_attention_lse as cal

    block_n, block_d = cal.blocks(k.shape[2], q.shape[3])
    scale = q.shape[3] ** -0.5
    figs = {}
    for c in cal.fwd_candidates(block_d, q.dtype):
        fn = lambda c=c: cal._launch_fwd(q, k, v, scale, "logits", 1.0, None, block_n, block_d, *c)  # noqa: E731
        ms = event_ms(ctx, fn, rounds=1 if ctx.smoke else 20, warmup=0 if ctx.smoke else 3)
        figs[f"BLOCK_M={c[0]} warps={c[1]} maxnreg={c[2]}_ms"] = round(ms, 4)
    picked = _tuning.chosen().get(cal.fwd_tuning_key(q, k, "logits", False))  # the fused op's call above
    figs["autotuner_picked"] = None if picked is None else list(picked)
    figs["default"] = list(cal.fwd_default(block_d, q.dtype))
    return figs


def run_fused_ops(ctx: Ctx) -> None:
    import torch.nn.functional as F

    from fastitm.ops import cross_attention_lse, error_reduce
    from fastitm.ops.cross_attention_lse import cross_attention_lse_backward

    ceil = load_ceilings(ctx)
    bw, gemm = ceil["copy_gb_per_s"] * 1e9, ceil["bf16_gemm_tflops"] * 1e12
    batch = 2 if ctx.smoke else 64
    backend = "reference" if ctx.smoke else "triton"
    dtype = torch.bfloat16
    for heads, lq in (((2, 64),) if ctx.smoke else SD21_LAYERS):
        if not ctx.fits(10, f"fused vs sdpa {heads}x{lq}"):
            continue
        g = torch.Generator().manual_seed(lq)
        q = torch.randn(batch, heads, lq, HEAD_DIM, generator=g).to(ctx.device, dtype)
        k = torch.randn(batch, heads, KEYS, HEAD_DIM, generator=g).to(ctx.device, dtype)
        v = torch.randn_like(k)
        scale = HEAD_DIM ** -0.5

        def unfused(q=q, k=k, v=v, scale=scale):
            out = F.scaled_dot_product_attention(q, k, v)
            s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
            return out, torch.logsumexp(s, dim=-1).sum(-1)

        provs = {"fused": lambda q=q, k=k, v=v: cross_attention_lse(q, k, v, backend=backend), "sdpa+logsumexp": unfused,
                 "sdpa_only": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)}
        figs = {}
        for name, fn in provs.items():
            fn()
            base = ctx.reset_peak()
            fn()
            peak = ctx.peak_above(base)
            ms = event_ms(ctx, fn, rounds=3 if ctx.smoke else 20)
            figs[f"{name}_ms"] = round(ms, 4)
            figs[f"{name}_peak_extra_mib"] = round(peak / 2**20, 1)
        nbytes = 2 * q.numel() * q.element_size() + 2 * k.numel() * k.element_size()  # q in, out, k, v
        flop = 4 * batch * heads * lq * KEYS * HEAD_DIM
        figs["bytes_floor_ms"] = round(nbytes / bw * 1e3, 4)
        figs["flops_floor_ms"] = round(flop / gemm * 1e3, 4)
        figs["fused_vs_sdpa+logsumexp"] = round(figs["sdpa+logsumexp_ms"] / figs["fused_ms"], 2)
        figs["fused_fraction_of_floor"] = round(max(figs["bytes_floor_ms"], figs["flops_floor_ms"]) / figs["fused_ms"], 3)
        figs["conditions"] = f"q [{batch}, {heads}, {lq}, 64], k/v [{batch}, {heads}, 77, 64], bf16, {ceil['source']} ceilings"
        ctx.record(f"cross_attention_lse vs SDPA, SD 2.1 layer {heads}x{lq}", figs)
        if ctx.fits(5, f"forward tiles {heads}x{lq}"):
            one = (slice(0, 1), slice(0, 1)) if ctx.smoke else (slice(None), slice(None))  # interpreter: 1 head
            ctx.record(f"cross_attention_lse forward per tile, SD 2.1 layer {heads}x{lq}",
                       forward_tiles(ctx, q[one], k[one], v[one]))
        if ctx.fits(5, f"fused backward {heads}x{lq}"):
            # The backward (fine-tuning): dq, dk, dv from d_out and d_pooled. Floors: q and d_out read, dq
            # written, k, v read, dk, dv written; five matrix products (S, dP, dQ, dK, dV) of 2 x Lq x 77 x 64
            # each (the kernel does a sixth, recomputing O for delta).
            d_out = torch.randn_like(q)
            d_pool = torch.ones(batch, heads, device=ctx.device)
            bwd = lambda q=q, k=k, v=v, d_out=d_out, d_pool=d_pool, scale=scale: cross_attention_lse_backward(  # noqa: E731
                q, k, v, d_out, d_pool, scale, "logits", 1.0, None, backend)
            bwd()
            bf = {"fused_bwd_ms": round(event_ms(ctx, bwd, rounds=3 if ctx.smoke else 20), 4)}
            bf["bytes_floor_ms"] = round((3 * q.numel() * q.element_size() + 4 * k.numel() * k.element_size())
                                         / bw * 1e3, 4)
            bf["flops_floor_ms"] = round(10 * batch * heads * lq * KEYS * HEAD_DIM / gemm * 1e3, 4)
            bf["fused_fraction_of_floor"] = round(max(bf["bytes_floor_ms"], bf["flops_floor_ms"]) / bf["fused_bwd_ms"], 3)
            bf["conditions"] = figs["conditions"] + ", d_pooled ones"
            ctx.record(f"cross_attention_lse backward, SD 2.1 layer {heads}x{lq}", bf)
    # Error reduction over a 128-row batch of 4x64x64 latents.
    if ctx.fits(10, "error_reduce timing"):
        R, Fdim = (16, 256) if ctx.smoke else (128, 4 * 64 * 64)
        N, T = 4, 8
        g = torch.Generator().manual_seed(1)
        pred = torch.randn(R, Fdim, generator=g).to(ctx.device, dtype)
        target = torch.randn(R, Fdim, generator=g).to(ctx.device, dtype)
        ri = torch.arange(R, device=ctx.device) % N
        rk = (torch.arange(R, device=ctx.device) // N) % T
        rj = torch.arange(R, device=ctx.device) % 3 - 1
        bufs = (torch.zeros(N, T, device=ctx.device), torch.zeros(N, 2, T, device=ctx.device), torch.zeros(N, 2, device=ctx.device))
        row_t = torch.arange(R, device=ctx.device)
        fused = lambda: error_reduce(pred, target, row_t, ri, rj, rk, *bufs, backend=backend)  # noqa: E731
        plain = lambda: (pred.float() - target.float()).pow(2).sum(1).sqrt()  # noqa: E731
        figs = {"fused_ms": round(event_ms(ctx, fused), 4), "torch_row_norms_ms": round(event_ms(ctx, plain), 4)}
        figs["bytes_floor_ms"] = round(2 * pred.numel() * pred.element_size() / bw * 1e3, 4)
        figs["fused_fraction_of_floor"] = round(figs["bytes_floor_ms"] / figs["fused_ms"], 3)
        figs["conditions"] = f"pred and target [{R}, {Fdim}] bf16 (the pred read once, its target read once)"
        ctx.record("error_reduce vs PyTorch row norms", figs)
