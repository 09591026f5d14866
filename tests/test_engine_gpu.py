"""The engine on a CUDA GPU: CUDA graphs against eager, for every method and family.

All tests here are marked ``gpu`` (skipped on machines without CUDA)."""

import pytest
import torch

import fastitm
from fastitm.testing import assert_close

pytestmark = pytest.mark.gpu

TEXTS = ["a red circle", "a blue square left of a dog", "a cat", "green", "a yellow triangle above a circle"]
CONFIGS = [("diffusion_itm", {}), ("diffusion_classifier", {}), ("discffusion", {"denoise": True}),
           ("diffusion_classifier", {"elimination": [(2, 2)]}),
           # the published presets: the mixed attention term, per-timestep latents, published rounds
           ("discffusion", {"preset": "published"}), ("diffusion_itm", {"preset": "published"}),
           ("diffusion_classifier", {"preset": "published", "elimination": [(2, 3)]})]


@pytest.fixture(scope="module")
def tiny_cuda():
    return fastitm.testing.tiny_model(seed=0).to(device="cuda")


@pytest.mark.parametrize("method,opts", CONFIGS)
def test_cuda_graphs_match_eager(tiny_cuda, monkeypatch, method, opts):
    imgs = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(model=tiny_cuda, method=method, timesteps=4, seed=1, batch_size=7, **opts)  # 7 does not divide
    monkeypatch.setenv("FASTITM_CUDA_GRAPHS", "0")
    eager = fastitm.score(imgs, TEXTS, **kw)
    monkeypatch.setenv("FASTITM_CUDA_GRAPHS", "1")
    graphed = fastitm.score(imgs, TEXTS, **kw)
    assert not eager.stats["cuda_graphs"] and graphed.stats["cuda_graphs"] and graphed.stats["graph_replays"] > 0
    assert torch.equal(graphed.matrix.isinf(), eager.matrix.isinf())
    fin = eager.matrix.isfinite()
    assert_close(graphed.matrix[fin], eager.matrix[fin], rtol=1e-5, atol=2e-5)
    ref = fastitm.reference.score(imgs, TEXTS, model=tiny_cuda, method=method, plan=graphed.plan, **opts)
    assert_close(graphed.matrix[fin], ref.matrix[fin], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family,method", [("sdxl", "diffusion_itm"), ("sdxl", "discffusion"),
                                           ("sd3", "diffusion_itm"), ("sd3", "diffusion_classifier")])
def test_cuda_graphs_for_every_family(monkeypatch, family, method):
    # SDXL's added conditions and SD 3's pooled projections are static buffers of the captured graph too.
    build = {"sdxl": fastitm.testing.tiny_sdxl_model, "sd3": fastitm.testing.tiny_sd3_model}[family]
    model = build(seed=0).to(device="cuda")
    imgs = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(model=model, method=method, timesteps=4, seed=1, batch_size=7)
    monkeypatch.setenv("FASTITM_CUDA_GRAPHS", "0")
    eager = fastitm.score(imgs, TEXTS, **kw)
    monkeypatch.setenv("FASTITM_CUDA_GRAPHS", "1")
    graphed = fastitm.score(imgs, TEXTS, **kw)
    assert graphed.stats["cuda_graphs"] and graphed.stats["graph_replays"] > 0
    assert_close(graphed.matrix, eager.matrix, rtol=1e-5, atol=2e-5)
    ref = fastitm.reference.score(imgs, TEXTS, model=model, method=method, plan=graphed.plan)
    assert_close(graphed.matrix, ref.matrix, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method,opts,cache", [(*CONFIGS[0], False), (*CONFIGS[4], False),  # error; pooled, mixed
                                               (*CONFIGS[0], True)])  # an image cache copying a repeat's rows
def test_the_batch_loop_never_waits_for_the_gpu(tiny_cuda, monkeypatch, method, opts, cache):
    """From the second denoiser batch to the end of the loop no host sync happens (torch's sync debug
    mode makes one an error): the CPU queues each batch while the GPU still runs the previous one."""
    from fastitm.engine import engine, image_cache

    calls, real_call, real_result = [0], engine.UNetRunner.__call__, engine._result

    def call(self, *a, **k):
        calls[0] += 1
        if calls[0] == 2:  # the first batch may sync: first-use self-checks, the schedule moved to the GPU
            torch.cuda.set_sync_debug_mode("error")
        return real_call(self, *a, **k)

    def result(*a, **k):  # the loop is over: reading the scores back syncs, as it must
        torch.cuda.set_sync_debug_mode(0)
        return real_result(*a, **k)

    real_store = image_cache.ImageCache.store

    def store(*a, **k):  # after the loop: the cache keeps the rows on the CPU
        torch.cuda.set_sync_debug_mode(0)
        return real_store(*a, **k)

    monkeypatch.setattr(engine.UNetRunner, "__call__", call)
    monkeypatch.setattr(engine, "_result", result)
    monkeypatch.setattr(image_cache.ImageCache, "store", store)
    monkeypatch.setenv("FASTITM_CUDA_GRAPHS", "0")
    monkeypatch.setenv("FASTITM_AUTOTUNE", "0")  # the autotuner's timing syncs, once per shape
    imgs = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    if cache:
        imgs[2] = imgs[0]  # a repeat, whose empty-prompt rows are copied in the batch loop
    try:
        res = fastitm.score(imgs, TEXTS, model=tiny_cuda, method=method, timesteps=4, seed=1, batch_size=7,
                            progress=False, image_cache=fastitm.ImageCache() if cache else None, **opts)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert calls[0] == res.stats["batches"] > 2
    assert res.stats.get("unet_rows_reused", 0) == (4 if cache else 0)
