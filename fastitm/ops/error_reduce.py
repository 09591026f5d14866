"""Fused error reduction: packed UNet rows -> per-row errors -> the score matrix, in one pass.

Row r of ``pred`` [R, F] (a flattened UNet output) belongs to image ``row_image[r]``, timestep
``row_timestep[r]`` and text ``row_text[r]`` (-1: the unconditional, empty-prompt row); its target
is ``target[row_target[r]]`` (the plan's noise of that timestep, or a velocity row).

    err_r = ||pred_r - target||_2          (err="l2", the published DiffusionITM error)
          = mean((pred_r - target)^2)      (err="mse")
    uncond[i, k]       = err_r                        for unconditional rows
    value              = err_r - uncond[i, k]         (normalize) or err_r, for text rows
    per_t[i, j, k]     = -value                       (when per_t is given)
    scores[i, j]      += -value / T                   (when scores is given)

Unconditional rows are applied before text rows, so a batch may hold both. Backends: "triton"
(kernels/error_reduce.py), "native" (csrc/error_reduce.cpp), "reference" (:func:`error_reduce_ref`).
"""

from __future__ import annotations

import torch

from ._backend import choose, register_self_check, self_check_tolerance

ERRS = ("l2", "mse")


def row_errors_ref(pred: torch.Tensor, target: torch.Tensor, row_target: torch.Tensor | None, err: str) -> torch.Tensor:
    """[R, ...] x [Rt, ...] -> [R] float32: each row's L2 or MSE over all its elements against its
    target row ``target[row_target[r]]`` (row r itself when ``row_target`` is None)."""
    tgt = target.float() if row_target is None else target.float()[row_target]
    d = (pred.float() - tgt).flatten(1)
    if err == "l2":
        return d.norm(dim=1)
    if err == "mse":
        return d.pow(2).mean(dim=1)
    raise ValueError(f"unknown err {err!r}; choose one of {ERRS}")


def error_reduce_ref(pred, target, row_target, row_image, row_text, row_timestep, uncond,
                     per_t=None, scores=None, err="l2", normalize=True) -> torch.Tensor:
    """Pure PyTorch; updates ``uncond``/``per_t``/``scores`` in place and returns the row errors [R]."""
    e = row_errors_ref(pred, target, row_target, err)
    T = uncond.shape[1]
    is_u = row_text < 0
    uncond[row_image[is_u], row_timestep[is_u]] = e[is_u]
    t = ~is_u
    i, j, k = row_image[t], row_text[t], row_timestep[t]
    value = e[t] - uncond[i, k] if normalize else e[t]
    if per_t is not None:
        per_t[i, j, k] = -value
    if scores is not None:
        scores.index_put_((i, j), -value / T, accumulate=True)
    return e


def check_inputs(pred, target, row_target, row_image, row_text, row_timestep, uncond, per_t, scores, err):
    if pred.ndim != 2 or target.ndim != 2 or pred.shape[1] != target.shape[1]:
        raise ValueError(f"pred must be [R, F] and target [Rt, F]; got {tuple(pred.shape)}, {tuple(target.shape)}")
    if pred.dtype != target.dtype or pred.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"pred and target must share a float dtype; got {pred.dtype}, {target.dtype}")
    R = pred.shape[0]
    for name, t in (("row_target", row_target), ("row_image", row_image), ("row_text", row_text),
                    ("row_timestep", row_timestep)):
        if t.shape != (R,) or t.dtype != torch.int64:
            raise ValueError(f"{name} must be int64 [R={R}], got {t.dtype} {tuple(t.shape)}")
    if uncond.ndim != 2 or uncond.dtype != torch.float32:
        raise ValueError(f"uncond must be float32 [N, T], got {uncond.dtype} {tuple(uncond.shape)}")
    N, T = uncond.shape
    M = None
    if per_t is not None:
        if per_t.ndim != 3 or per_t.shape[0] != N or per_t.shape[2] != T or per_t.dtype != torch.float32:
            raise ValueError(f"per_t must be float32 [N={N}, M, T={T}], got {per_t.dtype} {tuple(per_t.shape)}")
        M = per_t.shape[1]
    if scores is not None:
        if scores.ndim != 2 or scores.shape[0] != N or scores.dtype != torch.float32 or (M and scores.shape[1] != M):
            raise ValueError(f"scores must be float32 [N={N}, M], got {scores.dtype} {tuple(scores.shape)}")
        M = scores.shape[1]
    if err not in ERRS:
        raise ValueError(f"unknown err {err!r}; choose one of {ERRS}")
    devices = {x.device for x in (pred, target, row_target, uncond)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return M or 1


def error_reduce(pred, target, row_target, row_image, row_text, row_timestep, uncond, per_t=None, scores=None,
                 err="l2", normalize=True, backend="auto") -> torch.Tensor:
    """Fused per-row error and scatter into the score buffers (see the module docstring).

    pred [R, F], target [Rt, F] (same float dtype); row_* int64 [R]; uncond float32 [N, T];
    per_t float32 [N, M, T] or None; scores float32 [N, M] or None. Returns the row errors [R].
    """
    M = check_inputs(pred, target, row_target, row_image, row_text, row_timestep, uncond, per_t, scores, err)
    which = choose(backend, [pred, target], "error_reduce")
    # Row maps are often column views of one [R, 3] table; the kernels read them densely.
    row_target, row_image, row_text, row_timestep = (
        r.contiguous() for r in (row_target, row_image, row_text, row_timestep))
    if pred.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float32, device=pred.device)
    if which == "triton":
        from ..kernels.error_reduce import error_reduce_fwd

        return error_reduce_fwd(pred, target, row_target, row_image, row_text, row_timestep, uncond, per_t, scores,
                                err == "mse", normalize)
    if which == "native" and pred.dtype != torch.bfloat16:
        from .. import _C

        pred, target = pred.contiguous(), target.contiguous()
        rows = (row_target, row_image, row_text, row_timestep)
        N, T = uncond.shape
        for buf in (uncond, per_t, scores):
            if buf is not None and not buf.is_contiguous():
                raise ValueError("uncond, per_t and scores must be contiguous for the native backend")
        row_err = torch.empty(pred.shape[0], dtype=torch.float32)
        _C.error_reduce(pred.data_ptr(), target.data_ptr(), pred.shape[0], target.shape[0], pred.shape[1],
                        *(r.data_ptr() for r in rows), N, M, T, err == "mse", normalize, uncond.data_ptr(),
                        0 if per_t is None else per_t.data_ptr(), 0 if scores is None else scores.data_ptr(),
                        row_err.data_ptr(), pred.dtype == torch.float16)
        return row_err
    return error_reduce_ref(pred, target, row_target, row_image, row_text, row_timestep, uncond, per_t, scores,
                            err, normalize)


def _self_check(device: torch.device, dtype: torch.dtype) -> str | None:
    """The Triton kernel against the reference on 5 rows of 300 features (two unconditional rows,
    a shared target row), L2 and MSE: None, or what went wrong."""
    from ..kernels.error_reduce import error_reduce_fwd

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(5, 300, generator=g), torch.randn(3, 300, generator=g)
    rows = [torch.tensor(r) for r in ([0, 1, 2, 0, 1], [0, 1, 0, 1, 1], [-1, -1, 0, 1, 0], [0, 2, 0, 2, 2])]
    rtol, atol = self_check_tolerance(dtype)
    for err in ERRS:
        bufs = {}
        for name, on in (("kernel", device), ("reference", "cpu")):
            uncond, per_t = torch.zeros(2, 3, device=on), torch.zeros(2, 2, 3, device=on)
            p, t = pred.to(device, dtype), target.to(device, dtype)
            r = [x.to(on) for x in rows]
            if name == "kernel":
                e = error_reduce_fwd(p, t, *r, uncond, per_t, None, err == "mse", True)
            else:
                e = error_reduce_ref(p.float().cpu(), t.float().cpu(), *r, uncond, per_t, None, err, True)
            bufs[name] = (e.cpu(), uncond.cpu(), per_t.cpu())
        for what, got, want in zip(("row errors", "uncond", "per_t"), bufs["kernel"], bufs["reference"], strict=True):
            if not torch.allclose(got, want, rtol=rtol, atol=atol):
                return f"{what} ({err}) differ from the reference by up to {(got - want).abs().max().item():.3g}"
    return None


register_self_check("error_reduce", _self_check)
