"""Evaluation helpers against an independent count from reference scores."""

import pytest
import torch

import fastitm
from fastitm import data, evaluate
from fastitm.core.plan import make_plan


def test_hard_negatives_counts_match_reference(tiny):
    examples = data.make_dataset(4, "heldout", seed=2, size=16)
    rep = evaluate.hard_negatives(tiny, examples, timesteps=3, seed=1, progress=False)
    plan = make_plan(tiny, 3, seed=1)
    correct, total = {}, {}
    for e, row in zip(examples, rep.rows, strict=True):
        kinds = list(e.negatives)
        ref = fastitm.reference.score([e.image], [e.caption] + [e.negatives[k] for k in kinds], model=tiny,
                                      plan=plan).matrix[0]
        assert abs(row["score"] - ref[0].item()) <= 1e-4 * max(1.0, abs(ref[0].item()))
        for n, k in enumerate(kinds, start=1):
            total[k] = total.get(k, 0) + 1
            correct[k] = correct.get(k, 0) + int(ref[0] > ref[n])
    assert rep.total == total and rep.correct == correct
    assert rep.accuracy("colour") == correct["colour"] / total["colour"]


def test_image_retrieval_matches_reference(tiny):
    examples = data.make_dataset(7, "heldout", seed=3, size=16)
    acc, n = evaluate.image_retrieval(tiny, examples, group=3, timesteps=2, seed=0, progress=False)
    plan = make_plan(tiny, 2, seed=0)
    distinct = list({e.caption: e for e in examples}.values())
    groups = [distinct[a : a + 3] for a in range(0, len(distinct) - len(distinct) % 3, 3)]
    right = 0
    for g in groups:
        m = fastitm.reference.score([e.image for e in g], [e.caption for e in g], model=tiny, plan=plan).matrix
        right += int((m.argmax(dim=0) == torch.arange(len(g))).sum())
    assert n == 3 * len(groups) and acc == right / n


def test_bad_input(tiny):
    with pytest.raises(ValueError, match="no examples"):
        evaluate.hard_negatives(tiny, [])
    with pytest.raises(TypeError, match="needs .image"):
        evaluate.hard_negatives(tiny, ["not an example"])
    ex = data.make_dataset(2, "heldout", seed=0, size=16, two_object_share=0.0)
    with pytest.raises(ValueError, match="swap_relation"):
        evaluate.hard_negatives(tiny, ex, kinds=["swap_relation"], timesteps=1)
    with pytest.raises(ValueError, match="group"):
        evaluate.image_retrieval(tiny, ex, group=1)
    with pytest.raises(ValueError, match="distinct captions"):
        evaluate.image_retrieval(tiny, ex, group=5, timesteps=1)
    with pytest.raises(KeyError, match="swap_objects"):
        evaluate.hard_negatives(tiny, ex, timesteps=1, progress=False).accuracy("swap_objects")


def test_presets_reach_the_shared_plan():
    """evaluate builds one plan for all examples; with a preset it must be the preset's plan (here
    Discffusion's timesteps and per-timestep latents), the same scores fastitm.score gives."""
    import fastitm
    from fastitm import data, evaluate

    model = fastitm.testing.tiny_model(seed=0)
    ex = data.make_dataset(2, "heldout", seed=1, size=model.resolution)
    rep = evaluate.hard_negatives(model, ex, method="discffusion", timesteps=2, seed=3, preset="published",
                                  kinds=["colour"])
    e = ex[0]
    res = fastitm.score([e.image], [e.caption, e.negatives["colour"]], model=model, method="discffusion",
                        timesteps=2, seed=3, preset="published")
    assert res.plan.timesteps.tolist() == [489, 989]
    # the same plan gives the same scores; not to the bit, since hard_negatives batches both images'
    # rows together, and CPU kernels on 2 threads sum in a batch-dependent order (2e-7 relative here)
    assert rep.rows[0]["score"] == pytest.approx(res.matrix[0, 0].item(), rel=1e-5)
    assert rep.rows[0]["negatives"][0]["score"] == pytest.approx(res.matrix[0, 1].item(), rel=1e-5)


def test_curve_figure_names_equal_series_and_fixes_the_axes():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from fastitm.evaluate.report import EvalReport

    curve = [{"timesteps": n, "metrics": {"accuracy": a, "colour": a, "shape": s}}
             for n, a, s in ((1, 0.5, 0.25), (2, 0.75, 0.5), (3, 1.0, 0.5))]
    rep = EvalReport(task="jsonl", method="diffusion_itm", options={}, metrics={}, items=[], curve=curve, plan={},
                     data="x")
    fig = rep.curve_figure()
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["accuracy = colour", "shape"]
    assert ax.get_ylim() == (-0.02, 1.02) and ax.get_ylabel() == "accuracy / recall"
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert ax.get_legend().get_bbox_to_anchor().x0 > ax.get_window_extent().x1 - 1  # beside the axes
    plt.close(fig)
    bias = EvalReport(task="bias", method="diffusion_itm", options={}, metrics={}, items=[], data="x", plan={},
                      curve=[{"timesteps": 1, "metrics": {"Christian-Muslim": 0.3}}])
    fig = bias.curve_figure()
    assert fig.axes[0].get_ylim() == (-2.0, 2.0) and "effect size" in fig.axes[0].get_ylabel()
    plt.close(fig)
