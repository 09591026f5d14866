"""Timestep calibration (fastitm.evaluate.calibrate) and report.reweight: weights recovered where the
signal is on synthetic per-timestep scores, a report reweighted without the model equals a fresh run
with those weights, and fastitm calibrate end to end."""

import dataclasses
import json
import math
from statistics import NormalDist

import pytest
import torch

import fastitm
from fastitm.cli import main
from fastitm.evaluate import EvalReport, Item
from fastitm.evaluate.calibrate import beats_uniform, comparisons, fit_logistic, fit_weights

TIMESTEPS = [50 + 100 * k for k in range(10)]
SIGNAL = [2, 5, 6]  # timesteps 250, 550, 650: neither end of the range, so no exp(-rate t) shape fits them


def synthetic(n: int, seed: int):
    """n 3-way text-choice items: the true candidate leads by 1 at the SIGNAL timesteps (noise sd 1) and
    by nothing elsewhere, where the noise is 4x larger: the uniform mean is mostly noise."""
    g = torch.Generator().manual_seed(seed)
    items, per_t = [], []
    for i in range(n):
        label = i % 3
        p = torch.randn(1, 3, len(TIMESTEPS), generator=g) * 4
        p[..., SIGNAL] = torch.randn(1, 3, len(SIGNAL), generator=g)
        p[0, label, SIGNAL] += 1.0
        items.append(Item(id=str(i), kind="text", images=[], texts=[], label=label, tags={"kind": "abc"[i % 2]}))
        per_t.append(p)
    return items, per_t


def test_calibration_recovers_the_timesteps_with_signal():
    items, per_t = synthetic(150, 0)
    diffs, owner = comparisons(items, per_t)
    assert diffs.shape == (300, 10) and owner.tolist()[:4] == [0, 0, 1, 1]
    torch.testing.assert_close(diffs[0], (per_t[0][0, 0] - per_t[0][0, 1]).double())  # label 0 minus candidate 1
    w = fit_logistic(diffs, 0.01)
    assert (w >= 0).all() and w[SIGNAL].sum() / w.sum() > 0.8
    # the penalty pulls towards uniform weights: a strong one gives the plain mean
    torch.testing.assert_close(fit_logistic(diffs, 1e4), torch.ones(10, dtype=torch.float64), rtol=0.05, atol=0.05)
    cal = fit_weights(items, per_t, TIMESTEPS, folds=5)
    assert cal.fitted["kind"] == "logistic"
    share = sum(cal.weights[TIMESTEPS[k]] for k in SIGNAL) / sum(cal.weights.values())
    assert share > 0.8
    # held out (nested cross-validation): well above the uniform mean, per tag too
    assert cal.after["accuracy"] > cal.before["accuracy"] + 0.15
    assert set(cal.after["by_tag"]) == {"kind=a", "kind=b"}
    # the "after" figure is honest: fresh items from the same source, scored with the written weights
    new_items, new_t = synthetic(300, 1)
    w = torch.tensor([cal.weights[t] for t in TIMESTEPS], dtype=torch.float64)
    acc = sum(int((p[0].double() @ w).argmax()) == i.label for i, p in zip(new_items, new_t, strict=True)) / 300
    assert abs(acc - cal.after["accuracy"]) < 0.1
    with pytest.raises(ValueError, match="at least 10 labelled items"):
        fit_weights(items[:6], per_t[:6], TIMESTEPS)


def test_beats_uniform_by_hand():
    # 40 items: 12 turned right, 2 turned wrong: mean 0.25, sample sd sqrt((14 - 40 * 0.25^2) / 39), z = 2.91;
    # 14 candidates tried: one-sided 0.05 / 14 -> z > 2.69
    z = 0.25 / (math.sqrt((14 - 40 * 0.25**2) / 39) / math.sqrt(40))
    assert 2.9 < z < 2.92 and 2.68 < NormalDist().inv_cdf(1 - 0.05 / 14) < 2.70
    uniform = [0.0] * 40
    assert beats_uniform([1.0] * 12 + [-1.0] * 2 + [0.0] * 26, uniform, 14)
    # 10 right, 2 wrong: z = 2.45, enough alone (1.64) but not among 14 tried
    assert not beats_uniform([1.0] * 10 + [-1.0] * 2 + [0.0] * 28, uniform, 14)
    assert beats_uniform([1.0] * 10 + [-1.0] * 2 + [0.0] * 28, uniform, 1)
    assert not beats_uniform([0.0] * 40, uniform, 1)


def test_calibration_keeps_uniform_weights_on_noise():
    # No timestep carries signal: any weighting that wins the cross-validation won by luck (without the
    # test against uniform, the one-standard-error rule picked exp rate 4 on this draw)
    g = torch.Generator().manual_seed(1)
    items = [Item(id=str(i), kind="text", images=[], texts=[], label=0, tags={}) for i in range(150)]
    per_t = []
    for _ in items:
        p = torch.randn(1, 2, 10, generator=g) * torch.linspace(0.5, 3, 10)
        p[0, 0] += 0.05 * torch.randn(10, generator=g)
        per_t.append(p)
    cal = fit_weights(items, per_t, TIMESTEPS, folds=5)
    assert cal.fitted["kind"] == "uniform" and set(cal.weights.values()) == {1.0}
    assert cal.after == cal.before
    assert not any(c["beats_uniform"] for c in cal.cv)


def _jsonl(tmp_path, n):
    from fastitm import data

    lines = []
    for k, e in enumerate(data.make_dataset(n, "heldout", seed=4, size=16)):
        e.image.save(tmp_path / f"{k}.png")
        negs = list(e.negatives.items())
        lines.append({"image": f"{k}.png", "texts": [e.caption, negs[0][1], negs[-1][1]], "label": 0,
                      "tags": {"kind": negs[0][0]}})
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines))
    return f


def test_reweight_equals_a_fresh_run(tiny, tmp_path):
    f = _jsonl(tmp_path, 4)
    plain = fastitm.evaluate.run("jsonl", f, model=tiny, timesteps=4, seed=0, progress=False)
    plain.save(tmp_path / "out")
    loaded = EvalReport.load(tmp_path / "out")
    for w in ({"kind": "exp", "rate": 7}, {t: float(k + 1) for k, t in enumerate(plain.plan["timesteps"])}):
        fresh = fastitm.evaluate.run("jsonl", f, model=tiny, timesteps=4, seed=0, progress=False, weights=w)
        for again in (plain.reweight(w), loaded.reweight(w)):
            assert again.metrics == fresh.metrics
            assert [i["scores"] for i in again.items] == [i["scores"] for i in fresh.items]
            assert again.curve == fresh.curve and again.options["weights"] == fresh.options["weights"]
            assert again.racing == fresh.racing != []  # racing simulated on the weighted statistic, as the run
        back = fresh.reweight("uniform")  # and back: today's numbers bit for bit
        assert back.metrics == plain.metrics and back.items == plain.items and back.racing == plain.racing
    item = plain.items[0]
    ts = plain.plan["timesteps"]
    hand = [sum(math.exp(-7 * t / 1000) * s for t, s in zip(ts, c, strict=True)) / sum(math.exp(-7 * t / 1000) for t in ts)
            for c in item["per_timestep"][0]]
    assert plain.reweight({"kind": "exp", "rate": 7}).items[0]["scores"] == pytest.approx(hand, rel=1e-6)
    # a raced run keeps partial per-timestep scores only (runner: no per_timestep in its records)
    raced = dataclasses.replace(plain, options={**plain.options, "adaptive": {"alpha": 0.05}},
                                items=[{k: v for k, v in i.items() if k != "per_timestep"} for i in plain.items])
    with pytest.raises(ValueError, match="cannot be reweighted: its run raced"):
        raced.reweight("uniform")


def test_calibrate_cli(tmp_path, capsys, monkeypatch):
    f = _jsonl(tmp_path, 12)
    out = tmp_path / "w.json"
    assert main(["calibrate", "jsonl", "--data", str(f), "--model", "tiny", "--timesteps", "4", "--limit", "10",
                 "--folds", "2", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "Held-out accuracy" in text and f"wrote {out}" in text
    w = json.loads(out.read_text())
    assert w["fitted"]["items"] == 10 and len(w["item_ids"]) == 10 and len(w["weights"]) == 4
    assert w["fitted"]["kind"] in ("uniform", "exp", "logistic") and min(w["weights"].values()) >= 0
    assert main(["eval", "jsonl", "--data", str(f), "--model", "tiny", "--timesteps", "4", "--weights", str(out),
                 "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert rep["options"]["weights"] == {"file": str(out)}
    with pytest.raises(SystemExit):
        main(["calibrate", "jsonl", "--data", str(f), "--fraction", "0.5", "--limit", "3"])
    assert "not allowed with argument" in capsys.readouterr().err
    # Too small a sample fails naming the counts once the task is read, before a model is loaded
    monkeypatch.setattr(fastitm.evaluate.runner, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match=r"at least 10 labelled items \(5 folds\), jsonl at .* gives 6 \(of 12\)"):
        fastitm.evaluate.calibrate("jsonl", f, limit=6, folds=5, progress=False)
