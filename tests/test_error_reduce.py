"""The fused error reduction, every backend against an independent loop over rows."""

import random

import pytest
import torch

from fastitm.ops import error_reduce, native_status
from fastitm.testing import assert_close

BACKENDS = ["reference", pytest.param("native", marks=pytest.mark.skipif(native_status() is not None,
                                                                        reason=str(native_status()))), "triton"]


def packed_rows(N, M, T, uncond=True, seed=0):
    rows = [(i, j, k) for i in range(N) for k in range(T) for j in ([-1] if uncond else []) + list(range(M))]
    random.Random(seed).shuffle(rows)  # unconditional rows anywhere in the batch
    t = torch.tensor(rows, dtype=torch.long)
    return t[:, 0], t[:, 1], t[:, 2]


def by_hand(pred, target, ri, rj, rk, N, M, T, err, normalize):
    """Plain Python loops: the independent computation."""
    def e(r):
        d = pred[r].double() - target[rk[r]].double()
        return d.pow(2).sum().sqrt() if err == "l2" else d.pow(2).mean()
    u = {(int(ri[r]), int(rk[r])): e(r) for r in range(len(ri)) if rj[r] < 0}
    per_t = torch.zeros(N, M, T, dtype=torch.float64)
    for r in range(len(ri)):
        if rj[r] >= 0:
            i, j, k = int(ri[r]), int(rj[r]), int(rk[r])
            per_t[i, j, k] = -(e(r) - u[(i, k)]) if normalize else -e(r)
    return per_t


# bf16 on Triton only: the other backends read bf16 through the same PyTorch upcast as fp16.
needs_native = pytest.mark.skipif(native_status() is not None, reason=str(native_status()))
BACKEND_DTYPES = [pytest.param(b, d, marks=[needs_native] if b == "native" else [])
                  for b in ("reference", "native", "triton") for d in (torch.float32, torch.float16)]
BACKEND_DTYPES.append(("triton", torch.bfloat16))


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("err", ["l2", "mse"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("NMT", [(3, 5, 4), (1, 1, 1), (2, 7, 3)])
def test_against_hand_loop(triton_interpret, backend, err, normalize, dtype, NMT):
    N, M, T = NMT
    F = 4 * 7 * 9  # not a block multiple
    ri, rj, rk = packed_rows(N, M, T, uncond=normalize)
    pred = torch.randn(len(ri), F).to(dtype)
    target = torch.randn(T, F).to(dtype)
    uncond, per_t, scores = torch.zeros(N, T), torch.zeros(N, M, T), torch.zeros(N, M)
    row_err = error_reduce(pred, target, rk, ri, rj, rk, uncond, per_t, scores, err=err, normalize=normalize,
                           backend=backend)
    expected = by_hand(pred.float(), target.float(), ri, rj, rk, N, M, T, err, normalize)
    # L2 is ~sqrt(2F): relative 1e-5 of the terms, which normalization subtracts.
    atol = 1e-5 * (2 * F) ** 0.5 if err == "l2" else 1e-5
    assert_close(per_t, expected.float(), rtol=1e-5, atol=atol, name="per_t")
    assert_close(scores, expected.mean(2).float(), rtol=1e-5, atol=atol, name="scores")
    d = pred.float() - target.float()[rk]
    assert_close(row_err, d.norm(dim=1) if err == "l2" else d.pow(2).mean(1), rtol=1e-5, atol=1e-6, name="row_err")


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_batches_accumulate(triton_interpret, backend):
    """Rows split over several calls (the engine's batches) give the same scores as one call."""
    N, M, T, F = 2, 3, 3, 50
    ri, rj, rk = packed_rows(N, M, T, seed=1)
    order = torch.argsort(rj, stable=True)  # unconditional rows first, as the engine packs them
    ri, rj, rk = ri[order], rj[order], rk[order]
    pred, target = torch.randn(len(ri), F), torch.randn(T, F)
    whole = [torch.zeros(N, T), torch.zeros(N, M, T), torch.zeros(N, M)]
    error_reduce(pred, target, rk, ri, rj, rk, *whole, backend=backend)
    parts = [torch.zeros(N, T), torch.zeros(N, M, T), torch.zeros(N, M)]
    for a in range(0, len(ri), 5):
        s = slice(a, a + 5)
        error_reduce(pred[s], target, rk[s], ri[s], rj[s], rk[s], *parts, backend=backend)
    assert_close(parts[1], whole[1], rtol=1e-6, atol=1e-6)
    assert_close(parts[2], whole[2], rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    pred, target = torch.randn(4, 10), torch.randn(2, 10)
    idx = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="pred must be"):
        error_reduce(pred, torch.randn(2, 11), idx, idx, idx, idx, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="row_text must be int64"):
        error_reduce(pred, target, idx, idx, idx.int(), idx, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="unknown err"):
        error_reduce(pred, target, idx, idx, idx, idx, torch.zeros(1, 2), err="l1")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_gpu(dtype):
    N, M, T, F = 3, 5, 4, 4 * 64 * 64
    ri, rj, rk = (x.cuda() for x in packed_rows(N, M, T))
    pred, target = torch.randn(len(ri), F, device="cuda").to(dtype), torch.randn(T, F, device="cuda").to(dtype)
    out = [torch.zeros(N, T, device="cuda"), torch.zeros(N, M, T, device="cuda")]
    error_reduce(pred, target, rk, ri, rj, rk, *out, backend="triton")
    expected = by_hand(pred.float().cpu(), target.float().cpu(), ri.cpu(), rj.cpu(), rk.cpu(), N, M, T, "l2", True)
    assert_close(out[1].cpu(), expected.float(), rtol=1e-5, atol=1e-3)
