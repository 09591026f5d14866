"""Cross-attention that also emits the row-wise LogSumExp pooling Discffusion scores with.

    S = scale * Q K^T                      [B, H, Lq, Lk]   (never materialized by the fast paths)
    O = softmax(S) V                       [B, H, Lq, D]
    pooled[b, h] = sum_q LSE_k(S[b,h,q,:])                  pool="logits"
                 = sum_q LSE_k(lam * softmax(S)[b,h,q,:])   pool="probs"

``key_mask`` [B, Lk] (True = keep) removes keys from the softmax and from the pooling alike.
Backends: "triton" (kernels/cross_attention_lse.py), "native" (csrc/cross_attention_lse.cpp),
"reference" (:func:`cross_attention_lse_ref`, which materializes S).

Differentiable in q, k and v (for fine-tuning): the backward recomputes S from q and k, as the
forward does, and never stores the map between the passes. With g = d(pooled) per (b, h) and
delta_i = dO_i . O_i:

    dV = P^T dO,  dS = P * (dO V^T - delta) + g * dLSE/dS,  dQ = scale dS K,  dK = scale dS^T Q
    dLSE/dS = P                                   (pool="logits")
            = lam P * (R - rowsum(P * R)),  R = softmax(lam P)   (pool="probs")

:func:`cross_attention_lse_bwd_ref` is that formula in PyTorch (checked with gradcheck in float64);
the Triton and C++ backward kernels are checked against it.
"""

from __future__ import annotations

import math

import torch

from ._backend import choose, register_self_check, self_check_tolerance

POOLS = ("logits", "probs")
MAX_LK = 256


def cross_attention_lse_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    pool: str = "logits",
    lam: float = 1.0,
    key_mask: torch.Tensor | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure PyTorch with the attention map materialized: oracle, CPU fallback, benchmark baseline.

    q [B, H, Lq, D], k and v [B, H, Lk, D] -> (out [B, H, Lq, D] in q's dtype, pooled [B, H] float32).
    ``upcast`` computes in float32 (the oracle); without it, in the input dtype (PyTorch's own error).
    """
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :].to(torch.bool), float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = torch.matmul(p, v).to(dtype)
    if pool == "logits":
        lse = torch.logsumexp(s, dim=-1)
    else:
        x = lam * p
        if key_mask is not None:
            x = x.masked_fill(~key_mask[:, None, None, :].to(torch.bool), float("-inf"))
        lse = torch.logsumexp(x, dim=-1)
    # pooled is float32 (float64 stays float64, for gradcheck)
    return out, lse.to(torch.float64 if lse.dtype == torch.float64 else torch.float32).sum(dim=-1)


def cross_attention_lse_bwd_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    d_out: torch.Tensor,
    d_pooled: torch.Tensor,
    scale: float,
    pool: str = "logits",
    lam: float = 1.0,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward formula (module docstring), materialized: d_out [B, H, Lq, D], d_pooled [B, H]
    -> (dq, dk, dv) in the inputs' dtypes, computed in float32 (float64 stays float64)."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf, do = q.to(work), k.to(work), v.to(work), d_out.to(work)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    masked = None if key_mask is None else ~key_mask[:, None, None, :].to(torch.bool)
    if masked is not None:
        s = s.masked_fill(masked, float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = torch.matmul(p, vf)
    dv = torch.matmul(p.transpose(-1, -2), do)
    delta = (do * o).sum(dim=-1, keepdim=True)
    ds = p * (torch.matmul(do, vf.transpose(-1, -2)) - delta)
    g = d_pooled.to(work)[:, :, None, None]
    if pool == "logits":
        ds = ds + g * p
    else:
        x = lam * p
        if masked is not None:
            x = x.masked_fill(masked, float("-inf"))
        r = torch.softmax(x, dim=-1)
        ds = ds + g * lam * p * (r - (p * r).sum(dim=-1, keepdim=True))
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def check_inputs(q, k, v, scale, pool, lam, key_mask) -> float:
    """Shape/dtype/device checks shared by every backend; returns the resolved scale."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, H, L, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Lq, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(f"k and v must be [B={B}, H={H}, Lk, D={D}]; got {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q, k, v must share one dtype of float32/float16/bfloat16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    Lk = k.shape[2]
    if not 1 <= Lk <= MAX_LK:
        raise ValueError(f"Lk={Lk} keys; the fused op holds every key in one tile, so 1 <= Lk <= {MAX_LK}")
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; choose one of {POOLS}")
    if not (isinstance(lam, (int, float)) and lam > 0 and math.isfinite(lam)):
        raise ValueError(f"lam must be a positive number, got {lam!r}")
    if key_mask is not None:
        if key_mask.shape != (B, Lk):
            raise ValueError(f"key_mask must be [B={B}, Lk={Lk}], got {tuple(key_mask.shape)}")
        if key_mask.device != q.device:
            raise ValueError(f"key_mask is on {key_mask.device}, q on {q.device}")
        # Reading the answer back is a host sync, which a CUDA graph capture forbids: while capturing,
        # the mask was already checked by the eager warm-up calls with the same buffers.
        capturing = key_mask.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing and not key_mask.to(torch.bool).any(dim=1).all():
            raise ValueError("key_mask masks every key of some batch row; the softmax would be undefined")
    return float(D ** -0.5 if scale is None else scale)


def cross_attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    pool: str = "logits",
    lam: float = 1.0,
    key_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and LogSumExp-pooled scores without writing the attention map.

    q [B, H, Lq, D], k and v [B, H, Lk, D] (Lk <= 256), one of float32/float16/bfloat16
    -> (out [B, H, Lq, D] in q's dtype, pooled [B, H] float32 = sum over the Lq rows).
    """
    scale = check_inputs(q, k, v, scale, pool, lam, key_mask)
    which = choose(backend, [q, k, v], "cross_attention_lse")
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _CrossAttentionLSE.apply(q, k, v, scale, pool, float(lam), key_mask, which)
    return _forward(which, q, k, v, scale, pool, lam, key_mask)


def _forward(which, q, k, v, scale, pool, lam, key_mask):
    if which == "triton":
        from ..kernels.cross_attention_lse import cross_attention_lse_fwd

        return cross_attention_lse_fwd(q, k, v, scale, pool, float(lam), key_mask)
    if which == "native":
        from .. import _C

        return native_cross_attention_lse(_C, q, k, v, scale, pool, float(lam), key_mask)
    return cross_attention_lse_ref(q, k, v, scale, pool, lam, key_mask)


class _CrossAttentionLSE(torch.autograd.Function):
    """Forward on the chosen backend saving only q, k, v (and the mask); backward recomputes S on the
    same backend. Nothing of size [Lq, Lk] lives between the passes."""

    @staticmethod
    def forward(ctx, q, k, v, scale, pool, lam, key_mask, which):
        out, pooled = _forward(which, q, k, v, scale, pool, lam, key_mask)
        ctx.save_for_backward(q, k, v, key_mask)
        ctx.scale, ctx.pool, ctx.lam, ctx.which = scale, pool, lam, which
        return out, pooled

    @staticmethod
    def backward(ctx, d_out, d_pooled):
        q, k, v, key_mask = ctx.saved_tensors
        if d_out is None:
            d_out = torch.zeros_like(q)
        if d_pooled is None:
            d_pooled = torch.zeros(q.shape[:2], dtype=torch.float32, device=q.device)
        dq, dk, dv = cross_attention_lse_backward(q, k, v, d_out, d_pooled, ctx.scale, ctx.pool, ctx.lam, key_mask,
                                                  ctx.which)
        return dq, dk, dv, None, None, None, None, None


def cross_attention_lse_backward(q, k, v, d_out, d_pooled, scale, pool, lam, key_mask, which):
    """dq, dk, dv on backend ``which`` (already resolved by the forward)."""
    d_pooled = d_pooled.float().contiguous()
    if which == "triton":
        from ..kernels.cross_attention_lse import cross_attention_lse_bwd

        return cross_attention_lse_bwd(q, k, v, d_out, d_pooled, scale, pool, lam, key_mask)
    if which == "native":
        from .. import _C

        return native_cross_attention_lse_bwd(_C, q, k, v, d_out, d_pooled, scale, pool, lam, key_mask)
    return cross_attention_lse_bwd_ref(q, k, v, d_out, d_pooled, scale, pool, lam, key_mask)


def native_cross_attention_lse_bwd(_C, q, k, v, d_out, d_pooled, scale, pool, lam, key_mask):
    """Launcher for the C++ backward: float32 contiguous buffers (other dtypes are cast around it)."""
    dtypes = (q.dtype, k.dtype, v.dtype)
    q, k, v, do = (t.float().contiguous() for t in (q, k, v, d_out))
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    mask = None if key_mask is None else key_mask.to(torch.uint8).contiguous()
    _C.cross_attention_lse_bwd(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), do.data_ptr(), d_pooled.data_ptr(),
        dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), 0 if mask is None else mask.data_ptr(),
        B, H, Lq, Lk, D, scale, pool == "probs", lam,
    )
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2])


def native_cross_attention_lse(_C, q, k, v, scale, pool, lam, key_mask):
    """Launcher for the C++ op: contiguous inputs, allocated outputs, raw pointers."""
    if q.dtype == torch.bfloat16:
        # The C++ path reads float32 and float16; bfloat16 is upcast here (CPU bf16 is rare).
        out, pooled = native_cross_attention_lse(_C, q.float(), k.float(), v.float(), scale, pool, lam, key_mask)
        return out.to(torch.bfloat16), pooled
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty_like(q)
    pooled = torch.empty(B, H, dtype=torch.float32)
    mask = None if key_mask is None else key_mask.to(torch.uint8).contiguous()
    _C.cross_attention_lse(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), pooled.data_ptr(),
        0 if mask is None else mask.data_ptr(), B, H, Lq, Lk, D, scale,
        pool == "probs", lam, q.dtype == torch.float16,
    )
    return out, pooled


def _self_check(device: torch.device, dtype: torch.dtype) -> str | None:
    """The Triton forward against the float32 reference on a small awkward input (37 query rows, 77
    keys, head dim 40, one masked key), both pools: None, or what went wrong."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 40, generator=g) for n in (37, 77, 77))
    mask = torch.ones(2, 77, dtype=torch.bool)
    mask[1, 70:] = False
    rtol, atol = self_check_tolerance(dtype)
    for pool, key_mask in (("logits", None), ("probs", mask)):
        qd, kd, vd = (x.to(device, dtype) for x in (q, k, v))
        md = None if key_mask is None else key_mask.to(device)
        out, pooled = _forward("triton", qd, kd, vd, 40 ** -0.5, pool, 1.5, md)
        want_out, want_pooled = cross_attention_lse_ref(qd.float(), kd.float(), vd.float(), 40 ** -0.5, pool, 1.5, md)
        for name, got, want in (("output", out.float(), want_out), ("pooled", pooled / 37, want_pooled / 37)):
            if not torch.allclose(got, want, rtol=rtol, atol=atol):
                err = (got - want).abs().max().item()
                return f"{name} ({pool}) differs from the reference by up to {err:.3g} (tolerance {atol:g})"
    return None


register_self_check("cross_attention_lse", _self_check)
