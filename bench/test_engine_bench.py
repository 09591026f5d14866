"""Scoring throughput: the reference scorer vs the engine (fastitm.score), same inputs and plan.

Cases (DiffusionITM, 10 timesteps): text retrieval, 1 image x 8 texts (unnormalized: it ranks one
image's texts exactly as the normalized score does); image retrieval, 8 images x 1 text
(normalized); Winoground-style 2x2 (normalized). On the CPU the models are the random-weight tiny model
(16 px images, 4x8x8 latents) and the embedded default model (32 px, 4x8x8 latents), in fp32; on a GPU (``gpu`` tests) it is SD 2.1-base's architecture with
random weights (random weights give true timings) in bf16 and fp16. Run: pytest bench/ -s
"""

import pytest
import torch
from benchutil import context, median_ms

import fastitm
from fastitm.testing import assert_close

CASES = {
    "text_retrieval_1x8": (1, 8, {"normalize": False}),
    "image_retrieval_8x1": (8, 1, {}),
    "winoground_2x2": (2, 2, {}),
}
T = 10


def inputs(model, N, M):
    g = torch.Generator().manual_seed(N * 100 + M)
    imgs = torch.rand(N, 3, model.resolution, model.resolution, generator=g)
    texts = [f"a photo of the object number {j}" for j in range(M)]
    return imgs, texts


def side_by_side(model, case, report, benchmark, rounds, batch_size=None):
    N, M, opts = CASES[case]
    imgs, texts = inputs(model, N, M)
    plan = fastitm.score(imgs, texts, model=model, timesteps=T, seed=0, progress=False, batch_size=batch_size,
                         **opts).plan
    ref_fn = lambda: fastitm.reference.score(imgs, texts, model=model, plan=plan, progress=False, **opts)  # noqa: E731
    eng_fn = lambda: fastitm.score(imgs, texts, model=model, plan=plan, progress=False,  # noqa: E731
                                   batch_size=batch_size, **opts)
    for name, value in context(model.device, model.dtype, model=model.source, images=N, texts=M, timesteps=T,
                               method="diffusion_itm", options=opts).items():
        report(name, value)
    ref_ms, ref_lo, ref_hi = median_ms(ref_fn, model.device, rounds=rounds, warmup=1)
    eng_ms, eng_lo, eng_hi = median_ms(eng_fn, model.device, rounds=rounds, warmup=1)
    res, ref = eng_fn(), ref_fn()
    if model.dtype == torch.float32:  # the timed engine computes the reference's numbers
        assert_close(res.matrix, ref.matrix, rtol=1e-4, atol=1e-4, name=case)
    pairs = N * M
    report("reference_ms", f"{ref_ms:.1f} (min {ref_lo:.1f}, max {ref_hi:.1f})")
    report("engine_ms", f"{eng_ms:.1f} (min {eng_lo:.1f}, max {eng_hi:.1f})")
    report("reference_pairs_per_s", round(pairs / ref_ms * 1e3, 2))
    report("engine_pairs_per_s", round(pairs / eng_ms * 1e3, 2))
    report("unet_rows", f"reference {ref.stats['unet_rows']}, engine {res.stats['unet_rows']}")
    report("engine_unet_rows_per_s", round(res.stats["unet_rows"] / eng_ms * 1e3, 1))
    report("speedup", round(ref_ms / eng_ms, 2))
    benchmark.pedantic(eng_fn, rounds=3, warmup_rounds=0)
    return ref_ms / eng_ms, res.stats["unet_rows"] / eng_ms * 1e3


@pytest.fixture(scope="module", params=["tiny", "default"])
def cpu_model(request):
    if request.param == "tiny":
        return fastitm.testing.tiny_model(seed=0)
    return fastitm.load_model()  # the embedded model: 32 px images, 4x8x8 latents, 4.3 M-parameter UNet


@pytest.mark.parametrize("case", list(CASES))
def test_engine_throughput_cpu(cpu_model, case, report, benchmark):
    speedup, _ = side_by_side(cpu_model, case, report, benchmark, rounds=5)
    if case == "winoground_2x2":
        assert speedup >= 2.0, f"engine only {speedup:.2f}x the reference on the 2x2 normalized case"


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def sd21(request):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = fastitm.testing.sd21_base_architecture(device="cuda", dtype=request.param)
    yield model
    del model
    torch.cuda.empty_cache()


def bf16_matmul_tflops():
    """The card's measured dense bf16 matmul rate (8192^3 GEMMs, median of 10)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms, _, _ = median_ms(lambda: a @ b, torch.device("cuda"), rounds=10, warmup=3)
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_engine_throughput_gpu(sd21, case, report, benchmark):
    side_by_side(sd21, case, report, benchmark, rounds=3)


@pytest.mark.gpu
def test_unet_utilization_gpu(sd21, report, benchmark):
    """UNet rows per second on a large normalized run, against the card's measured bf16 GEMM rate,
    counting 0.80 TFLOP per SD 2.1-base UNet row at 64x64 latents."""
    N, M = 4, 15
    imgs, texts = inputs(sd21, N, M)
    fn = lambda: fastitm.score(imgs, texts, model=sd21, timesteps=T, seed=0, progress=False)  # noqa: E731
    ms, lo, hi = median_ms(fn, sd21.device, rounds=3, warmup=1)
    rows = fn().stats["unet_rows"]
    peak = bf16_matmul_tflops()
    achieved = rows / (ms * 1e-3) * 0.80
    for name, value in context(sd21.device, sd21.dtype, model=sd21.source, images=N, texts=M, timesteps=T).items():
        report(name, value)
    report("engine_ms", f"{ms:.0f} (min {lo:.0f}, max {hi:.0f})")
    report("unet_rows_per_s", round(rows / ms * 1e3, 1))
    report("unet_tflops", round(achieved, 1))
    report("measured_bf16_matmul_tflops", round(peak, 1))
    report("fraction_of_matmul_rate", round(achieved / peak, 3))
    benchmark.pedantic(fn, rounds=1, warmup_rounds=0)
