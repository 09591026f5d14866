"""The root conftest's widening of bfloat16 ``tl.dot`` operands under the Triton interpreter: products
equal the fp32 products of the bf16 values (what tensor cores compute), and fp16 is untouched."""

import pytest
import torch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_interpreter_dot_multiplies_values(triton_interpret, dtype):
    import triton
    import triton.language as tl

    @triton.jit
    def _dot(X, Y, Out, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
        rm, rk, rn = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
        x = tl.load(X + rm[:, None] * K + rk[None, :])
        y = tl.load(Y + rk[:, None] * N + rn[None, :])
        tl.store(Out + rm[:, None] * N + rn[None, :], tl.dot(x, y))

    x, y = torch.randn(16, 32).to(dtype), torch.randn(32, 64).to(dtype)
    out = torch.empty(16, 64)
    _dot[(1,)](x, y, out, 16, 32, 64)
    want = x.double() @ y.double()
    assert (out.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item()
