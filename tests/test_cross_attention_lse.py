"""The fused cross-attention + LSE op, every backend against the materialized reference."""

import pytest
import torch
import torch.nn.functional as F

from fastitm.ops import BackendUnavailable, cross_attention_lse, cross_attention_lse_ref, native_status
from fastitm.testing import assert_close

needs_native = pytest.mark.skipif(native_status() is not None, reason=str(native_status()))

# (B, H, Lq, Lk, D): Lq not a block multiple, Lk = 77, odd B*H, D = 40, tiny and wide heads.
SHAPES = [(1, 3, 123, 77, 40), (3, 1, 70, 77, 64), (2, 5, 9, 77, 80), (1, 1, 1, 3, 160), (1, 3, 33, 256, 16)]


def inputs(shape, dtype, masked, device="cpu"):
    B, H, Lq, Lk, D = shape
    q, k, v = (torch.randn(B, H, L, D, device=device).to(dtype) for L in (Lq, Lk, Lk))
    mask = None
    if masked:
        mask = torch.rand(B, Lk, device=device) > 0.4
        mask[:, 0] = True
    return q, k, v, mask


def error_vs_fp32(backend, shape, dtype, pool, masked, device="cpu"):
    """Errors of the backend and of PyTorch itself in ``dtype`` against the fp32 reference."""
    q, k, v, mask = inputs(shape, dtype, masked, device)
    lam = 2.5
    out, pooled = cross_attention_lse(q, k, v, pool=pool, lam=lam, key_mask=mask, backend=backend)
    ref_out, ref_pooled = cross_attention_lse_ref(q, k, v, pool=pool, lam=lam, key_mask=mask)
    pt_out, pt_pooled = cross_attention_lse_ref(q, k, v, pool=pool, lam=lam, key_mask=mask, upcast=False)
    return (out, pooled), (ref_out, ref_pooled), (pt_out, pt_pooled)


def check(backend, shape, dtype, pool, masked, device="cpu"):
    (out, pooled), (ref_out, ref_pooled), (pt_out, pt_pooled) = error_vs_fp32(backend, shape, dtype, pool, masked, device)
    assert out.dtype == dtype and out.shape == ref_out.shape and pooled.shape == shape[:2]
    if dtype == torch.float32:
        assert_close(out, ref_out, rtol=1e-5, atol=1e-6, name="out")
        assert_close(pooled, ref_pooled, rtol=1e-5, atol=1e-5, name="pooled")
    else:
        # No worse than 2x PyTorch's own error in this dtype against the fp32 truth (+ a small atol).
        own = (pt_out.float() - ref_out.float()).abs().max().item()
        got = (out.float() - ref_out.float()).abs().max().item()
        assert got <= 2 * own + 1e-3, f"out error {got} vs PyTorch's {own}"
        own_p = (pt_pooled - ref_pooled).abs().max().item()
        got_p = (pooled - ref_pooled).abs().max().item()
        assert got_p <= 2 * own_p + 1e-3 * ref_pooled.abs().max().item(), f"pooled error {got_p} vs {own_p}"


@needs_native
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pool", ["logits", "probs"])
@pytest.mark.parametrize("masked", [False, True])
def test_native(shape, dtype, pool, masked):
    check("native", shape, dtype, pool, masked)


@pytest.mark.parametrize("shape", SHAPES[:3] + SHAPES[4:])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pool", ["logits", "probs"])
@pytest.mark.parametrize("masked", [False, True])
def test_triton_interpreter(triton_interpret, shape, dtype, pool, masked):
    check("triton", shape, dtype, pool, masked)


def test_triton_takes_strided_views(triton_interpret):
    # The diffusers processor hands over [B, L, H, D] -> [B, H, L, D] transposed views.
    B, H, Lq, Lk, D = 2, 3, 50, 77, 40
    q = torch.randn(B, Lq, H, D).transpose(1, 2)
    k = torch.randn(B, Lk, H, D).transpose(1, 2)
    v = torch.randn(B, Lk, H, D).transpose(1, 2)
    out, pooled = cross_attention_lse(q, k, v, backend="triton")
    ref_out, ref_pooled = cross_attention_lse_ref(q, k, v)
    assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert_close(pooled, ref_pooled, rtol=1e-5, atol=1e-5)


def test_reference_matches_sdpa_and_logsumexp():
    q, k, v, _ = inputs((2, 3, 17, 77, 40), torch.float32, False)
    out, pooled = cross_attention_lse_ref(q, k, v)
    assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)
    logits = q @ k.transpose(-1, -2) / 40 ** 0.5
    assert_close(pooled, torch.logsumexp(logits, -1).sum(-1), rtol=1e-5, atol=1e-5)
    _, probs = cross_attention_lse_ref(q, k, v, pool="probs", lam=3.0)
    assert_close(probs, torch.logsumexp(3.0 * logits.softmax(-1), -1).sum(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"pool": "max"}, ValueError, "unknown pool"),
    ({"lam": 0.0}, ValueError, "lam must be a positive"),
    ({"key_mask": torch.zeros(1, 77, dtype=torch.bool)}, ValueError, "masks every key"),
    ({"key_mask": torch.ones(2, 77, dtype=torch.bool)}, ValueError, "key_mask must be"),
    ({"backend": "cuda"}, ValueError, "unknown backend"),
])
def test_bad_arguments(kwargs, exc, match):
    q, k, v, _ = inputs((1, 2, 5, 77, 16), torch.float32, False)
    with pytest.raises(exc, match=match):
        cross_attention_lse(q, k, v, **kwargs)


def test_bad_shapes():
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="Lk=300"):
        cross_attention_lse(q, torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16))
    with pytest.raises(ValueError, match="must be \\[B, H, L, D\\]"):
        cross_attention_lse(q[0], q[0], q[0])
    with pytest.raises(TypeError, match="share one dtype"):
        cross_attention_lse(q, q.half(), q)


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        cross_attention_lse(q, q, q, backend="triton")


def test_env_override(monkeypatch):
    monkeypatch.setenv("FASTITM_BACKEND", "reference")
    q = torch.randn(1, 1, 4, 16)
    out, pooled = cross_attention_lse(q, q, q)
    assert_close(out, cross_attention_lse_ref(q, q, q)[0], rtol=0, atol=0)
    monkeypatch.setenv("FASTITM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTITM_BACKEND"):
        cross_attention_lse(q, q, q)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES + [(2, 5, 4096, 77, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pool", ["logits", "probs"])
@pytest.mark.parametrize("masked", [False, True])
def test_triton_gpu(shape, dtype, pool, masked):
    check("triton", shape, dtype, pool, masked, device="cuda")
