"""Gradients of the fused cross-attention + LogSumExp pooling op: the backward formula against
numerical differentiation (gradcheck, float64), and every backend's backward against PyTorch autograd
through the materialized reference (float32, fresh random inputs, awkward shapes)."""

import pytest
import torch

from fastitm.ops import native_status
from fastitm.ops.cross_attention_lse import (
    cross_attention_lse,
    cross_attention_lse_bwd_ref,
    cross_attention_lse_ref,
)
from fastitm.testing import assert_close

# (B, H, Lq, Lk, D): odd heads, Lq not a multiple of any block, Lk 77 (CLIP) and tiny, D 40/80
SHAPES = [(1, 3, 37, 77, 40), (2, 1, 70, 5, 16), (1, 2, 9, 33, 80)]
CASES = [("logits", 1.0, False), ("probs", 2.5, False), ("logits", 1.0, True), ("probs", 0.7, True)]


def make(B, H, Lq, Lk, D, dtype=torch.float32, masked=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=dtype) for L in (Lq, Lk, Lk))
    mask = None
    if masked:
        mask = torch.rand(B, Lk, generator=g) > 0.3
        mask[:, 0] = True
    return q, k, v, mask


class _FormulaFn(torch.autograd.Function):
    """The reference forward with the hand-written backward formula, for gradcheck."""

    @staticmethod
    def forward(ctx, q, k, v, scale, pool, lam, mask):
        ctx.save_for_backward(q, k, v)
        ctx.args = (scale, pool, lam, mask)
        return cross_attention_lse_ref(q, k, v, scale, pool, lam, mask, upcast=False)

    @staticmethod
    def backward(ctx, d_out, d_pooled):
        q, k, v = ctx.saved_tensors
        scale, pool, lam, mask = ctx.args
        return (*cross_attention_lse_bwd_ref(q, k, v, d_out, d_pooled, scale, pool, lam, mask), None, None, None, None)


@pytest.mark.parametrize("pool,lam,masked", CASES)
def test_backward_formula_gradcheck_float64(pool, lam, masked):
    q, k, v, mask = make(2, 2, 5, 6, 4, torch.float64, masked, seed=1)
    for t in (q, k, v):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q, k, v: _FormulaFn.apply(q, k, v, 0.37, pool, lam, mask), (q, k, v),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


def grads(fn, q, k, v, w_out, w_pool):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, pooled = fn(q, k, v)
    ((out.float() * w_out).sum() + (pooled * w_pool).sum()).backward()
    return q.grad, k.grad, v.grad


BACKENDS = [
    "reference",
    pytest.param("native", marks=pytest.mark.skipif(native_status() is not None, reason=str(native_status()))),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pool,lam,masked", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_matches_autograd_through_the_reference(shape, pool, lam, masked, backend):
    q, k, v, mask = make(*shape, masked=masked, seed=sum(shape))
    g = torch.Generator().manual_seed(7)
    w_out = torch.randn(q.shape, generator=g)
    w_pool = torch.randn(q.shape[:2], generator=g)
    scale = q.shape[-1] ** -0.5
    want = grads(lambda q, k, v: cross_attention_lse_ref(q, k, v, scale, pool, lam, mask), q, k, v, w_out, w_pool)
    got = grads(lambda q, k, v: cross_attention_lse(q, k, v, scale, pool, lam, mask, backend=backend), q, k, v,
                w_out, w_pool)
    for name, a, b in zip("qkv", got, want, strict=True):
        assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()), name=f"d{name} {backend} {pool}")


@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("pool,lam,masked", CASES[1:3])
def test_triton_backward_matches_autograd(triton_interpret, shape, pool, lam, masked):
    q, k, v, mask = make(*shape, masked=masked, seed=3)
    g = torch.Generator().manual_seed(8)
    w_out, w_pool = torch.randn(q.shape, generator=g), torch.randn(q.shape[:2], generator=g)
    scale = q.shape[-1] ** -0.5
    want = grads(lambda q, k, v: cross_attention_lse_ref(q, k, v, scale, pool, lam, mask), q, k, v, w_out, w_pool)
    got = grads(lambda q, k, v: cross_attention_lse(q, k, v, scale, pool, lam, mask, backend="triton"), q, k, v,
                w_out, w_pool)
    for name, a, b in zip("qkv", got, want, strict=True):
        assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()), name=f"d{name} triton {pool}")


def test_only_one_output_used_and_no_grad_path_unchanged():
    q, k, v, _ = make(1, 2, 11, 7, 16, seed=5)
    # Only the pooled score drives the loss (Discffusion's hinge loss): d(out) is None.
    q1 = q.clone().requires_grad_(True)
    cross_attention_lse(q1, k, v, pool="logits")[1].sum().backward()
    q2 = q.clone().requires_grad_(True)
    cross_attention_lse_ref(q2, k, v, pool="logits")[1].sum().backward()
    assert_close(q1.grad, q2.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # scoring: no autograd Function in the way
        out, pooled = cross_attention_lse(q1, k, v)
    assert out.grad_fn is None and pooled.grad_fn is None


def check_low_precision_backward(shape, dtype, pool, lam, device):
    """The fused backward in ``dtype`` is no further from the fp32 truth than PyTorch's own autograd in
    ``dtype`` (through the materialized reference without upcasting)."""
    q, k, v, _ = make(*shape, seed=11)
    q, k, v = q.to(device), k.to(device), v.to(device)
    g = torch.Generator().manual_seed(9)
    w_out = torch.randn(q.shape, generator=g).to(device)
    w_pool = torch.randn(q.shape[:2], generator=g).to(device)
    scale = shape[-1] ** -0.5
    truth = grads(lambda q, k, v: cross_attention_lse_ref(q, k, v, scale, pool, lam), q, k, v, w_out, w_pool)
    lp = [t.to(dtype) for t in (q, k, v)]
    fused = grads(lambda q, k, v: cross_attention_lse(q, k, v, scale, pool, lam, backend="triton"), *lp, w_out, w_pool)
    torch_own = grads(lambda q, k, v: cross_attention_lse_ref(q, k, v, scale, pool, lam, upcast=False), *lp, w_out,
                      w_pool)
    for name, a, b, t in zip("qkv", fused, torch_own, truth, strict=True):
        assert a.dtype == dtype
        err_fused = (a.float() - t).abs().max().item()
        err_torch = (b.float() - t).abs().max().item()
        assert err_fused <= 2 * err_torch + 1e-6, (name, err_fused, err_torch)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pool,lam", [("logits", 1.0), ("probs", 2.0)])
def test_triton_low_precision_backward(triton_interpret, dtype, pool, lam):
    # Under the interpreter (bf16 products widened to fp32 as tensor cores do; see the root conftest).
    check_low_precision_backward((1, 3, 37, 77, 40), dtype, pool, lam, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pool,lam", [("logits", 1.0), ("probs", 2.0)])
def test_low_precision_backward_on_gpu(dtype, pool, lam):
    check_low_precision_backward((2, 5, 1024, 77, 64), dtype, pool, lam, "cuda")
