"""The engine in fp16/bf16 against the fp32 reference: on the CPU through the Triton interpreter (the
fused kernels' low-precision paths, bf16 products widened as tensor cores do: see the root conftest)
and on a CUDA GPU (gpu-marked); and scoring inside a caller's ``torch.autocast``."""

import pytest
import torch

import fastitm

TEXTS = ["a red circle", "a blue square left of a dog", "a cat", "green", "a yellow triangle above a circle"]
CONFIGS = [("diffusion_itm", {}), ("diffusion_classifier", {}), ("discffusion", {"denoise": True})]


def check_low_precision_rankings(method, opts, dtype, device, backend="auto", n_images=4, n_texts=5, timesteps=4):
    """The engine in ``dtype`` is no further from the fp32 truth than PyTorch's own eager path in that
    dtype, and ranks texts the same wherever the truth separates them by more than that error."""
    model32 = fastitm.testing.tiny_model(seed=0).to(device=device)
    model_lp = fastitm.testing.tiny_model(seed=0).to(device=device, dtype=dtype)
    imgs = torch.rand(n_images, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    texts = TEXTS[:n_texts]
    truth = fastitm.reference.score(imgs, texts, model=model32, method=method, timesteps=timesteps, seed=0, **opts)
    fast = fastitm.score(imgs, texts, model=model_lp, method=method, plan=truth.plan, backend=backend, **opts)
    eager = fastitm.reference.score(imgs, texts, model=model_lp, method=method, plan=truth.plan, **opts)
    err_fast = (fast.matrix - truth.matrix).abs().max().item()
    err_torch = (eager.matrix - truth.matrix).abs().max().item()
    # PyTorch's own error, measured on a few cells, is a noisy estimate: the floor is half a unit in the
    # last place of the dtype at the scores' magnitude, the error of merely rounding a score to it
    # (fp16 at 4.4: 2.1e-3; on one 2-core CPU the interpreter's engine measured 1.1e-3 against eager's 4.8e-4)
    floor = torch.finfo(dtype).eps / 2 * truth.matrix.abs().max().item()
    assert err_fast <= 2 * err_torch + floor, (err_fast, err_torch, floor)
    tol = 2 * max(err_fast, err_torch)
    gaps = (truth.matrix[:, :, None] - truth.matrix[:, None, :]).abs()
    same = (fast.matrix[:, :, None] > fast.matrix[:, None, :]) == (truth.matrix[:, :, None] > truth.matrix[:, None, :])
    assert same[gaps > tol].all()
    return fast


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method,opts", [CONFIGS[0], CONFIGS[2]])  # both kernels (classifier: error_reduce only)
def test_triton_interpreter(triton_interpret, method, opts, dtype):
    # Fewer rows than on the GPU: the interpreter runs the fused attention per row in Python (one image:
    # its texts are the rankings checked).
    res = check_low_precision_rankings(method, opts, dtype, "cpu", backend="triton", n_images=1, n_texts=4,
                                       timesteps=2)
    assert res.backend == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method,opts", CONFIGS)
def test_gpu(method, opts, dtype):
    check_low_precision_rankings(method, opts, dtype, "cuda")


@pytest.mark.parametrize("method,opts", CONFIGS)
def test_under_a_callers_autocast(method, opts):
    """Scoring inside ``torch.autocast`` (the denoiser then predicts in bf16 while the plan's noise stays
    fp32): the engine compares them in fp32 and lands as close to the fp32 truth as PyTorch's own
    reference path under the same autocast."""
    model = fastitm.testing.tiny_model(seed=0)
    imgs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    truth = fastitm.reference.score(imgs, TEXTS, model=model, method=method, timesteps=2, seed=0, **opts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = fastitm.score(imgs, TEXTS, model=model, method=method, plan=truth.plan, **opts)
        eager = fastitm.reference.score(imgs, TEXTS, model=model, method=method, plan=truth.plan, **opts)
    err_fast = (fast.matrix - truth.matrix).abs().max().item()
    err_torch = (eager.matrix - truth.matrix).abs().max().item()
    assert 0 < err_fast <= 2 * err_torch + 1e-6, (err_fast, err_torch)
