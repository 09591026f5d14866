"""fastitm.Scorer (an nn.Module) and DiffusionScore (a torchmetrics Metric) against fastitm.score on the
same inputs; the Metric's 2-rank reduction is checked in tests/test_eval_distributed.py."""

import math

import pytest
import torch

import fastitm
from fastitm.testing import assert_close

IMGS = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))
TEXTS = ["a red circle", "a cat", "green"]


def test_scorer_is_a_module_that_scores_as_score(tiny):
    scorer = fastitm.Scorer(tiny, method="discffusion", timesteps=2, seed=3, denoise=True)
    assert isinstance(scorer, torch.nn.Module) and scorer.networks["unet"] is tiny.unet
    assert sum(p.numel() for p in scorer.parameters()) == sum(p.numel() for m in tiny.networks for p in m.parameters())
    want = fastitm.score(IMGS, TEXTS, model=tiny, method="discffusion", timesteps=2, seed=3, denoise=True)
    assert torch.equal(scorer(IMGS, TEXTS), want.matrix)
    res = scorer.score(IMGS, TEXTS, pairs=torch.eye(3, dtype=torch.bool))
    # the same pairs in smaller batches: equal to fp32 rounding (a GEMM's blocking follows its batch size)
    assert_close(res.matrix.diagonal(), want.matrix.diagonal(), rtol=1e-5, atol=2e-5)
    assert res.matrix[0, 1].isnan()
    assert "method='discffusion'" in repr(scorer)
    with pytest.raises(ValueError, match="unknown method"):
        fastitm.Scorer(tiny, method="clip")
    with pytest.raises(ValueError, match="unknown option"):
        fastitm.Scorer(tiny, temperature=2)


def test_scorer_to_moves_the_model_and_keeps_a_forced_vae_in_fp32():
    xl = fastitm.testing.tiny_sdxl_model(seed=1)
    xl.vae.register_to_config(force_upcast=True)
    scorer = fastitm.Scorer(xl, timesteps=1).to(torch.float16)
    assert xl.unet.dtype == torch.float16 and xl.vae.dtype == torch.float32
    fastitm.Scorer(xl, timesteps=1, dtype="fp32")  # a dtype by name moves a given model too
    assert xl.unet.dtype == torch.float32 and scorer.networks["unet"].dtype == torch.float32


def test_metric_is_the_mean_of_the_matched_pairs(tiny):
    from fastitm.scorer import DiffusionScore

    metric = DiffusionScore(tiny, timesteps=2, seed=0)
    metric.update(IMGS[:2], TEXTS[:2])
    metric.update(IMGS[2:], TEXTS[2:])
    full = fastitm.score(IMGS, TEXTS, model=tiny, timesteps=2, seed=0).matrix.diagonal().double()
    got = metric.compute()
    assert got.dtype == torch.float64
    # pairs scored in other batches: fp32 rounding of the ~10-sized error terms, as elsewhere in the tests
    torch.testing.assert_close(got, full.mean(), rtol=1e-5, atol=2e-5)
    assert math.isclose(got.item(), math.fsum(torch.cat(metric.scores).tolist()) / 3, rel_tol=0, abs_tol=0)
    with pytest.raises(ValueError, match="matched pairs: 2 images, 1 texts"):
        metric.update(IMGS[:2], TEXTS[:1])
    metric.reset()
    with pytest.raises(ValueError, match="before any update"):
        metric.compute()


def test_scorer_fixes_weights_and_image_cache_and_checks_them_at_construction(tiny):
    w = {"kind": "exp", "rate": 7}
    scorer = fastitm.Scorer(tiny, timesteps=3, seed=0, weights=w, image_cache=fastitm.ImageCache())
    want = fastitm.score(IMGS, TEXTS, model=tiny, timesteps=3, seed=0, weights=w)
    got = scorer.score(IMGS, TEXTS)
    assert_close(got.matrix, want.matrix, rtol=1e-5, atol=2e-5)
    assert got.stats["vae_images"] == len(IMGS)
    assert scorer.score(IMGS, TEXTS).stats["vae_images"] == 0  # the cache it holds: every image held
    uniform = fastitm.score(IMGS, TEXTS, model=tiny, timesteps=3, seed=0).matrix
    assert not torch.allclose(got.matrix, uniform)  # the weights were applied
    # bad options fail here, not at the first call
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        fastitm.Scorer(tiny, weights="no-such-weights.json")
    with pytest.raises(TypeError, match="image_cache must be a fastitm.ImageCache"):
        fastitm.Scorer(tiny, image_cache=True)
    with pytest.raises(ValueError, match="timesteps"):
        fastitm.Scorer(tiny, timesteps=0)
    with pytest.raises(ValueError, match="alpha"):
        fastitm.Scorer(tiny, adaptive={"alpha": 2})


def test_adaptive_metric_of_matched_pairs_is_the_full_plan(tiny):
    from fastitm.scorer import DiffusionScore

    plain, raced = DiffusionScore(tiny, timesteps=4, seed=0), DiffusionScore(tiny, timesteps=4, seed=0, adaptive=True)
    plain.update(IMGS, TEXTS)
    raced.update(IMGS, TEXTS)
    torch.testing.assert_close(raced.compute(), plain.compute(), rtol=1e-5, atol=2e-5)
