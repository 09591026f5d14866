"""Triton: per-row squared error of packed UNet rows, reduced and scattered into the scores.

One program per row streams pred_r and its target row once (fp32 accumulation), turns the sum into
L2 or MSE, and writes it where it belongs. Two launches of the same kernel: unconditional rows
first (PHASE=0, they fill uncond[i, k]), then text rows (PHASE=1, they subtract it), so one batch
may hold both without a race. per_t writes are deterministic; the optional scores matrix is
accumulated with atomics (order-dependent in the last bits on a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tuning


@triton.jit
def _error_reduce_fwd_kernel(
    PRED, TARGET, ROW_TARGET, ROW_IMAGE, ROW_TEXT, ROW_T, UNCOND, PER_T, SCORES, ROW_ERR,
    stride_pred, stride_target,
    F, M, T,
    PHASE: tl.constexpr,
    MSE: tl.constexpr,
    NORMALIZE: tl.constexpr,
    HAS_PER_T: tl.constexpr,
    HAS_SCORES: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """err = sqrt(sum (pred - target)^2) or mean (pred - target)^2 of row r; scattered by phase."""
    r = tl.program_id(0)
    tr = tl.load(ROW_TARGET + r)
    i = tl.load(ROW_IMAGE + r)
    j = tl.load(ROW_TEXT + r)
    k = tl.load(ROW_T + r)
    if PHASE == 0:
        mine = j < 0
    else:
        mine = j >= 0
    # Rows of the other phase load nothing: their length is taken as 0.
    f_len = tl.where(mine, F, 0)
    offs = tl.arange(0, BLOCK_F)
    acc = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        m = (f0 + offs) < f_len
        a = tl.load(PRED + r * stride_pred + f0 + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(TARGET + tr * stride_target + f0 + offs, mask=m, other=0.0).to(tl.float32)
        d = a - b
        acc += d * d
    sq = tl.sum(acc, axis=0)
    if MSE:
        e = sq / F
    else:
        e = tl.sqrt(sq)
    if mine:
        tl.store(ROW_ERR + r, e)
        if PHASE == 0:
            tl.store(UNCOND + i * T + k, e)
        else:
            if NORMALIZE:
                value = e - tl.load(UNCOND + i * T + k)
            else:
                value = e
            if HAS_PER_T:
                tl.store(PER_T + (i * M + j) * T + k, -value)
            if HAS_SCORES:
                tl.atomic_add(SCORES + i * M + j, -value / T)


def error_reduce_fwd(pred, target, row_target, row_image, row_text, row_timestep, uncond, per_t, scores, mse,
                     normalize, block_f: int = 1024):
    """Launcher; inputs checked by ``fastitm.ops.error_reduce``. Returns the row errors [R] float32."""
    pred = pred if pred.stride(1) == 1 else pred.contiguous()
    target = target if target.stride(1) == 1 else target.contiguous()
    R, F = pred.shape
    N, T = uncond.shape
    M = per_t.shape[1] if per_t is not None else (scores.shape[1] if scores is not None else 1)
    for name, buf in (("uncond", uncond), ("per_t", per_t), ("scores", scores)):
        if buf is not None and not buf.is_contiguous():
            raise ValueError(f"{name} must be contiguous for the Triton backend")
    num_warps = 4
    block_f = min(block_f, max(16, triton.next_power_of_2(F)))
    if _tuning.enabled(pred.device):
        # Candidates run on scratch copies of the score buffers (the kernel writes them in place, and
        # scores accumulate), made only when a shape is timed, not on every call.
        key = ("error_reduce", triton.next_power_of_2(F), pred.dtype, bool(mse))
        configs = candidates(F)
        scratch: list = []

        def candidate(c):
            if not scratch:
                scratch.extend(None if b is None else b.clone() for b in (uncond, per_t, scores))
            return _launch(pred, target, row_target, row_image, row_text, row_timestep, *scratch, mse, normalize, M,
                           c[0], c[1])

        block_f, num_warps = _tuning.pick(key, configs, candidate)
    return _launch(pred, target, row_target, row_image, row_text, row_timestep, uncond, per_t, scores, mse,
                   normalize, M, block_f, num_warps)


def candidates(F: int) -> list[tuple[int, int]]:
    """(BLOCK_F, num_warps) pairs the autotuner times for rows of F elements."""
    return [(bf, nw) for bf in (256, 512, 1024, 2048) for nw in (2, 4, 8) if bf <= max(256, 2 * F)]


def _launch(pred, target, row_target, row_image, row_text, row_timestep, uncond, per_t, scores, mse, normalize, M,
            block_f, num_warps):
    R, F = pred.shape
    T = uncond.shape[1]
    row_err = torch.empty(R, dtype=torch.float32, device=pred.device)
    dummy = row_err
    for phase in (0, 1):
        _error_reduce_fwd_kernel[(R,)](
            pred, target, row_target, row_image, row_text, row_timestep, uncond,
            dummy if per_t is None else per_t, dummy if scores is None else scores, row_err,
            pred.stride(0), target.stride(0),
            F, M, T,
            PHASE=phase, MSE=bool(mse), NORMALIZE=bool(normalize),
            HAS_PER_T=per_t is not None, HAS_SCORES=scores is not None,
            BLOCK_F=block_f, num_warps=num_warps,
        )
    return row_err
