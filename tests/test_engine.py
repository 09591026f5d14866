"""The engine (fastitm.score) against the reference scorer, given the same plan."""

import pytest
import torch

import fastitm
from fastitm.ops import native_status
from fastitm.testing import assert_close

TEXTS = ["a red circle", "a blue square left of a dog", "a cat", "green", "a yellow triangle above a circle"]
CONFIGS = [
    ("diffusion_itm", {}),
    ("diffusion_itm", {"err": "mse"}),
    ("diffusion_itm", {"normalize": False}),
    ("diffusion_classifier", {}),
    ("discffusion", {}),
    ("discffusion", {"pool": "probs", "lam": 2.0, "layers": "last", "denoise": True}),
]
CPU_BACKENDS = ["reference", pytest.param("native", marks=pytest.mark.skipif(native_status() is not None,
                                                                            reason=str(native_status())))]


def compare(res, ref):
    # Normalized scores subtract two errors of similar size: tolerance relative to those terms.
    scale = 1.0 if res.method != "diffusion_itm" or not res.options.get("normalize") else 20.0
    assert_close(res.matrix, ref.matrix, rtol=1e-5, atol=1e-6 * scale, name=f"{res.method} {res.options}")
    assert_close(res.per_timestep, ref.per_timestep, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("method,opts", CONFIGS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("N,M,batch_size", [(1, 1, 8), (3, 5, 7), (2, 4, 3)])
def test_parity_with_reference(tiny, method, opts, backend, N, M, batch_size):
    imgs = torch.rand(N, 3, 16, 16, generator=torch.Generator().manual_seed(N))
    res = fastitm.score(imgs, TEXTS[:M], model=tiny, method=method, timesteps=3, seed=5, backend=backend,
                        batch_size=batch_size, **opts)
    ref = fastitm.reference.score(imgs, TEXTS[:M], model=tiny, method=method, plan=res.plan, **opts)
    compare(res, ref)


@pytest.mark.parametrize("method,opts", [CONFIGS[0], CONFIGS[5]])
def test_whole_scorer_through_triton(triton_interpret, tiny, method, opts):
    imgs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    res = fastitm.score(imgs, TEXTS[:3], model=tiny, method=method, timesteps=2, seed=1, backend="triton",
                        batch_size=5, **opts)
    ref = fastitm.reference.score(imgs, TEXTS[:3], model=tiny, method=method, plan=res.plan, **opts)
    compare(res, ref)


def test_rankings_agree(tiny):
    imgs = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    res = fastitm.score(imgs, TEXTS, model=tiny, timesteps=4, seed=0)
    ref = fastitm.reference.score(imgs, TEXTS, model=tiny, plan=res.plan)
    gaps = (ref.matrix[:, :, None] - ref.matrix[:, None, :]).abs()
    agree = (res.matrix[:, :, None] > res.matrix[:, None, :]) == (ref.matrix[:, :, None] > ref.matrix[:, None, :])
    assert agree[gaps > 1e-4].all()
