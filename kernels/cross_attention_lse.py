"""Triton: cross-attention with the row-wise LogSumExp pooling computed in registers.

Cross-attention keys are few (77 CLIP tokens, at most 256), so one key tile holds all of them: the
softmax is exact in one pass (no online rescaling), and each row's LSE is a by-product of it.
Each program handles BLOCK_M query rows of one (batch, head): it writes O for those rows and one
partial sum of their LSE values; the partials are summed on the host side in a fixed order, which
keeps the result deterministic (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tuning


@triton.jit
def _cross_attention_lse_fwd_kernel(
    Q, K, V, O, PARTIAL, MASK,  # noqa: E741 (O: the output, as in the attention papers' notation)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_maskb,
    H, Lq, Lk, D, n_mblocks,
    scale, lam,
    POOL_PROBS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """S = scale * q k^T; P = softmax(S) over valid keys; O = P v;
    PARTIAL[bh, mblock] = sum over valid rows of LSE_n(S) or LSE_n(lam * P)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    n_ok = offs_n < Lk
    d_ok = offs_d < D

    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=m_ok[:, None] & d_ok[None, :], other=0.0,
    )
    k = tl.load(
        K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        mask=n_ok[:, None] & d_ok[None, :], other=0.0,
    )
    v = tl.load(
        V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
        mask=n_ok[:, None] & d_ok[None, :], other=0.0,
    )
    keep = n_ok
    if HAS_MASK:
        km = tl.load(MASK + b * stride_maskb + offs_n, mask=n_ok, other=0)
        keep = keep & (km != 0)

    # fp32 inputs use IEEE products so the result matches the fp32 reference to ~1e-6 (TF32 would not).
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale
    s = tl.where(keep[None, :], s, float("-inf"))
    row_max = tl.max(s, axis=1)
    p = tl.exp(s - row_max[:, None])
    row_sum = tl.sum(p, axis=1)
    p = p / row_sum[:, None]

    if IEEE:
        o = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        o = tl.dot(p.to(v.dtype), v)
    tl.store(
        O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        o.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :],
    )

    if POOL_PROBS:
        x = tl.where(keep[None, :], lam * p, float("-inf"))
        x_max = tl.max(x, axis=1)
        lse = x_max + tl.log(tl.sum(tl.exp(x - x_max[:, None]), axis=1))
    else:
        lse = row_max + tl.log(row_sum)
    lse = tl.where(m_ok, lse, 0.0)
    tl.store(PARTIAL + pid_bh * n_mblocks + pid_m, tl.sum(lse, axis=0))


def cross_attention_lse_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    pool: str,
    lam: float,
    key_mask: torch.Tensor | None = None,
    block_m: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher. q [B, H, Lq, D], k/v [B, H, Lk, D] (any strides) -> (out [B, H, Lq, D], pooled [B, H] fp32).

    Inputs were checked by ``fastitm.ops.cross_attention_lse``; blocks are powers of two >= 16 so
    ``tl.dot`` is valid on a GPU, with masks on every ragged edge.
    """
    block_n, block_d = blocks(k.shape[2], q.shape[3])
    config = fwd_default(block_d, q.dtype)
    if block_m is not None:
        config = (block_m,) + config[1:]
    elif _tuning.enabled(q.device):
        key = fwd_tuning_key(q, k, pool, key_mask is not None)
        config = _tuning.pick(key, fwd_candidates(block_d, q.dtype), lambda c: _launch_fwd(
            q, k, v, scale, pool, lam, key_mask, block_n, block_d, *c))
    elif q.device.type == "cpu":
        config = (64,) + config[1:]  # the interpreter: one row block size for every dtype
    return _launch_fwd(q, k, v, scale, pool, lam, key_mask, block_n, block_d, *config)


def blocks(Lk: int, D: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D) for Lk keys of head dim D: powers of two >= 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(Lk)), max(16, triton.next_power_of_2(D))


def fwd_tuning_key(q: torch.Tensor, k: torch.Tensor, pool: str, masked: bool) -> tuple:
    """The forward autotuner's cache key (:mod:`._tuning`): the tile's shape class, dtype and variant."""
    return ("cross_attention_lse_fwd", triton.next_power_of_2(q.shape[2]), *blocks(k.shape[2], q.shape[3]),
            q.dtype, pool, masked)


def fwd_candidates(block_d: int, dtype: torch.dtype) -> list[tuple[int, int, int | None]]:
    """(BLOCK_M, num_warps, maxnreg) the forward's autotuner times (``python -m fastitm.kernels.report``
    compiles each for sm_90 and sm_80 and shows registers, spills and programs per SM).

    Registers decide how many programs share an SM, and left alone ptxas takes nearly all it may: at
    the SD shapes the BLOCK_M 64, 4-warp tile took 204-211 registers under Triton 3.6 (two programs per
    SM) although the same code compiles into 128 or 96 with no spill (four or five programs). So the
    half-precision candidates cap registers (``maxnreg``) at 128 (four programs) or 96 (five); one
    uncapped tile stays as the control, so the autotuner can show what the cap buys. Caps that spill
    or fail to allocate (BLOCK_M 64 at BLOCK_D 256) are not listed; the report's table checks each.

    fp32 uses IEEE products (no tensor cores), unrolled by the compiler into FMA chains: BLOCK_M 128
    with 4 warps took 36 s to compile for sm_90 on a 2-core CPU and BLOCK_M 64 with 4 warps 14 s, and
    timing the whole list stalled a GPU check for over a minute; fp32 keeps the tiles that compile in
    seconds, uncapped (a correctness path on GPUs). Configurations that fit one program per SM on sm_90
    (BLOCK_M 128 or 64 with 8 warps, uncapped) are left out: one program cannot keep enough loads in
    flight for a kernel whose time is memory traffic.
    """
    if dtype == torch.float32:
        return [(bm, nw, None) for bm, nw in ((32, 4), (64, 8)) if bm * block_d <= 64 * 128]
    if block_d <= 64:
        return [(32, 4, 128), (64, 4, 128), (64, 4, 96), (128, 4, 128), (64, 4, None)]
    if block_d <= 128:
        return [(32, 4, 128), (64, 4, 128)]
    return [(32, 4, 128)]


def fwd_default(block_d: int, dtype: torch.dtype) -> tuple[int, int, int | None]:
    """(BLOCK_M, num_warps, maxnreg) without autotuning, one of :func:`fwd_candidates`: four programs
    per SM at the SD 2.x/SDXL head dim (64), and q/k/v tiles within 128 registers for SD 1.x's widest
    heads (D=160 -> BLOCK_D 256, two programs, bounded by shared memory)."""
    if dtype == torch.float32:
        return (64, 8, None) if block_d <= 64 else (32, 4, None)
    return (64, 4, 128) if block_d <= 64 else (32, 4, 128)


def bwd_config(block_d: int, dtype: torch.dtype) -> tuple[int, int, int | None]:
    """(BLOCK_M, num_warps, maxnreg) of the backward (on a GPU; the interpreter uses BLOCK_M 64): it holds
    about 3x the forward's tiles (dS, dP, the partials), so smaller row blocks. At head dim 64, 128
    registers (no spill) give four programs per SM where ptxas alone took 234-254 (two). Wider heads
    (SD 1.x's 80 and 160) keep ptxas's count: shared memory (80-160 KB) bounds them to two programs
    (BLOCK_D 128, 4 warps; 8 warps fit one) or one (BLOCK_D 256, where a cap of 168 fails to allocate)."""
    if dtype == torch.float32:
        return (32, 4, None) if block_d <= 64 else (16, 8, None)
    return (32, 4, 128) if block_d <= 64 else (16, 4, None)


def _launch_fwd(q, k, v, scale, pool, lam, key_mask, block_n, block_d, block_m, num_warps, maxnreg):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    n_mblocks = triton.cdiv(Lq, block_m)
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    partial = torch.empty((B * H, n_mblocks), dtype=torch.float32, device=q.device)
    if key_mask is not None:
        mask = key_mask.to(torch.int8).contiguous()
        mask_stride = mask.stride(0)
    else:
        mask, mask_stride = partial, 0  # never read: HAS_MASK is False
    grid = (n_mblocks, B * H)
    _cross_attention_lse_fwd_kernel[grid](
        q, k, v, out, partial, mask,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        mask_stride,
        H, Lq, Lk, D, n_mblocks,
        float(scale), float(lam),
        POOL_PROBS=(pool == "probs"),
        HAS_MASK=key_mask is not None,
        IEEE=(q.dtype == torch.float32),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps, maxnreg=maxnreg,
    )
    return out, partial.sum(dim=1).view(B, H)


@triton.jit
def _cross_attention_lse_bwd_kernel(
    Q, K, V, DO, DPOOL, DQ, DK_PART, DV_PART, MASK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_maskb,
    H, Lq, Lk, D, n_mblocks,
    scale, lam,
    POOL_PROBS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """For BLOCK_M query rows of one (batch, head): recompute S and P in registers, then
    dQ rows = scale dS K (stored), and this block's share of dK = scale dS^T Q and dV = P^T dO
    (stored as partials [bh, mblock, Lk, D], summed on the host in a fixed order: deterministic)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    n_ok = offs_n < Lk
    d_ok = offs_d < D
    md = m_ok[:, None] & d_ok[None, :]
    nd = n_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=md, other=0.0)
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=nd, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=nd, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=md, other=0.0)
    keep = n_ok
    if HAS_MASK:
        km = tl.load(MASK + b * stride_maskb + offs_n, mask=n_ok, other=0)
        keep = keep & (km != 0)

    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(keep[None, :], s * scale, float("-inf"))
    row_max = tl.max(s, axis=1)
    p = tl.exp(s - row_max[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    p = tl.where(m_ok[:, None], p, 0.0)  # rows past Lq contribute nothing

    dof = do.to(tl.float32)
    if IEEE:
        o = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        dp = tl.dot(dof, tl.trans(v.to(tl.float32)), input_precision="ieee")
    else:
        o = tl.dot(p.to(v.dtype), v)
        dp = tl.dot(do, tl.trans(v))
    delta = tl.sum(dof * o, axis=1)
    ds = p * (dp - delta[:, None])
    g = tl.load(DPOOL + pid_bh)
    if POOL_PROBS:
        x = tl.where(keep[None, :], lam * p, float("-inf"))
        x_max = tl.max(x, axis=1)
        r = tl.exp(x - x_max[:, None])
        r = r / tl.sum(r, axis=1)[:, None]
        r = tl.where(keep[None, :], r, 0.0)
        ds += g * lam * p * (r - tl.sum(p * r, axis=1)[:, None])
    else:
        ds += g * p
    ds = tl.where(m_ok[:, None] & keep[None, :], ds, 0.0)

    if IEEE:
        dq = tl.dot(ds, k.to(tl.float32), input_precision="ieee") * scale
        dk = tl.dot(tl.trans(ds), q.to(tl.float32), input_precision="ieee") * scale
        dv = tl.dot(tl.trans(p), dof, input_precision="ieee")
    else:
        dq = tl.dot(ds.to(k.dtype), k) * scale
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q) * scale
        dv = tl.dot(tl.trans(p.to(do.dtype)), do)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=md)
    part = (pid_bh * n_mblocks + pid_m) * Lk * D
    tl.store(DK_PART + part + offs_n[:, None] * D + offs_d[None, :], dk, mask=nd)
    tl.store(DV_PART + part + offs_n[:, None] * D + offs_d[None, :], dv, mask=nd)


def cross_attention_lse_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    d_out: torch.Tensor,
    d_pooled: torch.Tensor,
    scale: float,
    pool: str,
    lam: float,
    key_mask: torch.Tensor | None = None,
    block_m: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher. q [B, H, Lq, D], k/v [B, H, Lk, D], d_out [B, H, Lq, D], d_pooled [B, H] float32
    -> (dq, dk, dv) in the inputs' dtypes. dK and dV partials per row block are float32, reduced here."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    block_n, block_d = blocks(Lk, D)
    config_m, num_warps, maxnreg = bwd_config(block_d, q.dtype)
    if block_m is None:
        block_m = 64 if q.device.type == "cpu" else config_m
    n_mblocks = triton.cdiv(Lq, block_m)
    dq = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    dk_part = torch.empty((B * H, n_mblocks, Lk, D), dtype=torch.float32, device=q.device)
    dv_part = torch.empty_like(dk_part)
    if key_mask is not None:
        mask = key_mask.to(torch.int8).contiguous()
        mask_stride = mask.stride(0)
    else:
        mask, mask_stride = dk_part, 0  # never read: HAS_MASK is False
    d_pooled = d_pooled.float().contiguous()
    grid = (n_mblocks, B * H)
    _cross_attention_lse_bwd_kernel[grid](
        q, k, v, d_out, d_pooled, dq, dk_part, dv_part, mask,
        *q.stride(), *k.stride(), *v.stride(), *d_out.stride(), *dq.stride(),
        mask_stride,
        H, Lq, Lk, D, n_mblocks,
        float(scale), float(lam),
        POOL_PROBS=(pool == "probs"),
        HAS_MASK=key_mask is not None,
        IEEE=(q.dtype == torch.float32),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps, maxnreg=maxnreg,
    )
    dk = dk_part.sum(dim=1).view(B, H, Lk, D).to(k.dtype)
    dv = dv_part.sum(dim=1).view(B, H, Lk, D).to(v.dtype)
    return dq, dk, dv
