"""The ``kernels`` stage of ``make gpu-check`` (see ``__main__.py``)."""

from __future__ import annotations

import time

import torch
from stages_common import HEAD_DIM, KEYS, SD21_LAYERS, SDXL_LAYERS, Ctx, rel_error


def run_kernels(ctx: Ctx) -> None:
    from fastitm.ops import cross_attention_lse, cross_attention_lse_ref, error_reduce, error_reduce_ref

    backend = "reference" if ctx.smoke else "triton"
    batch = 2 if ctx.smoke else 8
    layers = [("SD 2.1", h, lq) for h, lq in SD21_LAYERS] + [("SDXL", h, lq) for h, lq in SDXL_LAYERS]
    if ctx.smoke:
        layers = [("SD 2.1", 2, 64)]
    failures = 0
    # Breadth first: every dtype at the largest SD 2.1 layer, then the backward and the error reduction,
    # then the other layers, so a stage cut short has checked every kernel in every dtype.
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    forward = [(d, *layers[0]) for d in dtypes] + [(d, *layer) for layer in layers[1:] for d in dtypes]

    def forward_check(dtype, family, heads, lq):
        nonlocal failures
        if not ctx.fits(8, f"cross_attention_lse forward {family} {heads}x{lq} {dtype}"):
            return
        g = torch.Generator(device="cpu").manual_seed(heads * 7919 + lq)
        shape_q, shape_k = (batch, heads, lq, HEAD_DIM), (batch, heads, KEYS, HEAD_DIM)
        q, k, v = (torch.randn(s, generator=g).to(ctx.device, dtype) for s in (shape_q, shape_k, shape_k))
        t = time.perf_counter()
        out, pooled = cross_attention_lse(q, k, v, backend=backend)
        ctx.sync()
        first_s = time.perf_counter() - t
        ref_out, ref_pooled = cross_attention_lse_ref(q, k, v)  # fp32 oracle on the same rounded inputs
        own_out, own_pooled = cross_attention_lse_ref(q, k, v, upcast=False)  # PyTorch in this dtype
        err_o, err_p = rel_error(out, ref_out), rel_error(pooled, ref_pooled)
        torch_o, torch_p = rel_error(own_out, ref_out), rel_error(own_pooled, ref_pooled)
        bound = 1e-5 if dtype == torch.float32 else None
        ok = (err_o <= bound and err_p <= bound) if bound else (err_o <= 2 * torch_o + 1e-6 and err_p <= 2 * torch_p + 1e-6)
        failures += not ok
        ctx.record(f"cross_attention_lse forward {family} q{list(shape_q)} {str(dtype)[6:]}", {
            "ok": ok, "out_rel_err": f"{err_o:.2e}", "pooled_rel_err": f"{err_p:.2e}",
            "torch_out_rel_err": f"{torch_o:.2e}", "torch_pooled_rel_err": f"{torch_p:.2e}",
            "rule": "fp32: <= 1e-5; fp16/bf16: <= 2x PyTorch's own error in that dtype",
            "first_call_s_incl_compile_and_autotune": round(first_s, 2)})

    for case in forward[:len(dtypes)]:
        forward_check(*case)
    # Backward at the two largest SD 2.1 layers, every dtype, against autograd through the fp32 reference.
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for heads, lq in (SD21_LAYERS[:2] if not ctx.smoke else ((2, 64),)):
            if not ctx.fits(10, f"cross_attention_lse backward {heads}x{lq} {dtype}"):
                continue
            g = torch.Generator(device="cpu").manual_seed(heads + lq)
            shape_q, shape_k = (batch, heads, lq, HEAD_DIM), (batch, heads, KEYS, HEAD_DIM)
            base = [torch.randn(s, generator=g).to(ctx.device, dtype) for s in (shape_q, shape_k, shape_k)]
            d_out = torch.randn(shape_q, generator=g).to(ctx.device, dtype)
            d_pool = torch.randn(batch, heads, generator=g).to(ctx.device)

            def grads(fn, upcast, base=base, d_out=d_out, d_pool=d_pool):
                xs = [x.detach().clone().float().requires_grad_() if upcast else x.detach().clone().requires_grad_()
                      for x in base]
                out, pooled = fn(*xs)
                torch.autograd.backward([out, pooled], [d_out.to(out.dtype), d_pool])
                return [x.grad for x in xs]

            got = grads(lambda q, k, v: cross_attention_lse(q, k, v, backend=backend), False)
            want = grads(lambda q, k, v: cross_attention_lse_ref(q, k, v), True)
            own = grads(lambda q, k, v: cross_attention_lse_ref(q, k, v, upcast=False), False)
            errs = [rel_error(a, b) for a, b in zip(got, want, strict=True)]
            torch_errs = [rel_error(a, b) for a, b in zip(own, want, strict=True)]
            if dtype == torch.float32:
                ok = max(errs) <= 1e-4
            else:
                ok = all(e <= 2 * te + 1e-6 for e, te in zip(errs, torch_errs, strict=True))
            failures += not ok
            ctx.record(f"cross_attention_lse backward SD 2.1 q{list(shape_q)} {str(dtype)[6:]}", {
                "ok": ok, "dq_dk_dv_rel_err": [f"{e:.2e}" for e in errs],
                "torch_dq_dk_dv_rel_err": [f"{e:.2e}" for e in torch_errs],
                "rule": "fp32: <= 1e-4; fp16/bf16: <= 2x PyTorch's own error in that dtype"})
    # Error reduction: 4x64x64 (SD 2.1) and 4x128x128 (SDXL) latents, 3 images x 5 texts x 4 timesteps.
    for F in ((4 * 8 * 8,) if ctx.smoke else (4 * 64 * 64, 4 * 128 * 128)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            if not ctx.fits(5, f"error_reduce F={F} {dtype}"):
                continue
            N, M, T = 3, 5, 4
            rows = [(i, j, k) for i in range(N) for k in range(T) for j in [-1, *range(M)]]
            perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(F))
            idx = torch.tensor(rows, dtype=torch.long)[perm].to(ctx.device)
            ri, rj, rk = idx[:, 0], idx[:, 1], idx[:, 2]
            g = torch.Generator(device="cpu").manual_seed(F + 1)
            pred = torch.randn(len(rows), F, generator=g).to(ctx.device, dtype)
            target = torch.randn(T, F, generator=g).to(ctx.device, dtype)
            outs = []
            for fn, p, tg in ((lambda *a, **kw: error_reduce(*a, **kw, backend=backend), pred, target),
                              (error_reduce_ref, pred.float(), target.float())):
                u, per_t, s = (torch.zeros(N, T, device=ctx.device), torch.zeros(N, M, T, device=ctx.device),
                               torch.zeros(N, M, device=ctx.device))
                fn(p, tg, rk, ri, rj, rk, u, per_t, s)
                outs.append(per_t)
            err = rel_error(outs[0], outs[1])
            ok = err <= 1e-4
            failures += not ok
            ctx.record(f"error_reduce F={F} {str(dtype)[6:]}", {"ok": ok, "per_t_rel_err": f"{err:.2e}",
                                                              "rule": "<= 1e-4 of the fp32 reduction of the same rounded inputs"})
    for case in forward[len(dtypes):]:
        forward_check(*case)
    ctx.record("kernels summary", {"failures": failures})
    if failures:
        raise SystemExit(f"{failures} kernel check(s) failed")
