"""``pairs=``: scoring only chosen (image, text) pairs in one call, so batches stay full."""

import pytest
import torch

import fastitm
from fastitm import data, evaluate
from fastitm.testing import assert_close

TEXTS = ["a red circle", "a blue square left of a dog", "a cat", "green", "a yellow triangle above a circle"]
PAIRS = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 1], [1, 0, 1, 0, 1]], dtype=torch.bool)


@pytest.mark.parametrize("method,opts", [("diffusion_itm", {}), ("discffusion", {"mix_uncond": True, "denoise": True}),
                                         ("diffusion_classifier", {"elimination": [(2, 2)]})])
def test_engine_pairs_equal_reference_and_the_full_matrix(tiny, method, opts):
    imgs = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    res = fastitm.score(imgs, TEXTS, model=tiny, method=method, timesteps=4, seed=2, batch_size=5, pairs=PAIRS, **opts)
    ref = fastitm.reference.score(imgs, TEXTS, model=tiny, method=method, plan=res.plan, pairs=PAIRS, **opts)
    assert torch.isnan(res.matrix[~PAIRS]).all() and torch.isnan(ref.matrix[~PAIRS]).all()
    assert not torch.isnan(res.matrix[PAIRS]).any()
    assert torch.equal(res.matrix.isinf(), ref.matrix.isinf())
    fin = res.matrix.isfinite()
    assert_close(res.matrix[fin], ref.matrix[fin], rtol=1e-5, atol=2e-5)
    if "elimination" not in opts:  # each requested pair scores what the full matrix gives it
        full = fastitm.score(imgs, TEXTS, model=tiny, method=method, plan=res.plan, **opts)
        assert_close(res.matrix[PAIRS], full.matrix[PAIRS], rtol=1e-5, atol=2e-5)
        uncond = 1 if method == "diffusion_itm" or opts.get("denoise") or opts.get("mix_uncond") else 0
        assert res.stats["unet_rows"] == 4 * (int(PAIRS.sum()) + 3 * uncond)


def test_an_image_with_no_pair_costs_nothing(tiny):
    imgs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    pairs = torch.tensor([[True, False], [False, False]])
    res = fastitm.score(imgs, TEXTS[:2], model=tiny, timesteps=3, pairs=pairs)
    assert res.stats["unet_rows"] == 3 * 2 and res.stats["unet_rows_saved"] == 0  # 1 text + 1 empty row each
    assert torch.isnan(res.matrix[1]).all() and torch.isfinite(res.matrix[0, 0])


@pytest.mark.parametrize("pairs,err,match", [
    (torch.ones(2, 3, dtype=torch.bool), ValueError, r"shape \[images, texts\] = \[3, 5\]"),
    (torch.ones(3, 5), TypeError, "boolean"),
    (torch.zeros(3, 5, dtype=torch.bool), ValueError, "no image-text pair"),
    ("all", TypeError, "pairs must be"),
])
def test_bad_pairs_are_named(tiny, pairs, err, match):
    with pytest.raises(err, match=match):
        fastitm.score(torch.rand(3, 3, 16, 16), TEXTS, model=tiny, timesteps=2, pairs=pairs)


def test_grouped_hard_negatives_equal_one_image_per_call(tiny):
    examples = data.make_dataset(6, "heldout", seed=3, size=16)
    one = evaluate.hard_negatives(tiny, examples, timesteps=3, group=1)
    grouped = evaluate.hard_negatives(tiny, examples, timesteps=3, group=4)
    assert one.total == grouped.total and one.correct == grouped.correct
    assert [r["caption"] for r in one.rows] == [r["caption"] for r in grouped.rows]

    def flat(rep):
        return torch.tensor([s for r in rep.rows for s in [r["score"]] + [n["score"] for n in r["negatives"]]])

    assert_close(flat(grouped), flat(one), rtol=1e-5, atol=2e-5)
