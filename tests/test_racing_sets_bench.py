"""The racing benchmark's reading of issue 36's curve criterion (bench/racing_sets_bench.py), on small
hand-made curves whose answer is worked out here: the fixed plan's curve from per-timestep scores, and
racing's curve against it as the best each reaches within a budget of rows."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("scipy")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # the bench's own helpers (benchutil), as its scripts find them
spec = importlib.util.spec_from_file_location("racing_sets_bench", ROOT / "bench" / "racing_sets_bench.py")
rsb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rsb)


def test_fixed_curve_decides_each_plan_on_its_own_timesteps():
    from fastitm.core.methods import spread_order

    g = torch.Generator().manual_seed(5)
    scores = [torch.randn(k, 9, generator=g, dtype=torch.float64) for k in (2, 3, 6, 3)]
    curve = rsb.fixed_curve(scores, 9)
    order = spread_order(9)
    for n, (rows, acc, right) in enumerate(curve, start=1):
        assert rows == n * (2 + 3 + 6 + 3)
        want = []
        for s in scores:  # the truth is candidate 0; the plan of n is the first n of the spread order
            means = [sum(float(s[c, k]) for k in order[:n]) / n for c in range(s.shape[0])]
            want.append(max(range(len(means)), key=means.__getitem__) == 0)
        assert right == want and acc == sum(want) / len(want)


def test_racing_curve_against_fixed_takes_the_best_within_each_budget():
    right = lambda *xs: list(xs)  # noqa: E731 - whether each of 4 items is right
    fixed = [(10, 0.5, right(1, 1, 0, 0)), (20, 0.75, right(1, 1, 1, 0)), (30, 0.5, right(1, 0, 1, 0))]
    # (plan length, rows, accuracy, choices): candidate 0 is right
    racing = [(1, 10, 0.5, [0, 0, 1, 1]), (2, 8, 0.25, [0, 1, 1, 1]), (3, 15, 0.5, [0, 1, 0, 1])]
    out = rsb.curve_against_fixed(racing, fixed)
    got = [(p["fixed_best_plan"], p["fixed_accuracy"], p["racing_plan"], p["racing_accuracy"], p["gap"])
           for p in out["detail"]]
    # rows 10: racing plans 1 (10 rows) and 2 (8) are affordable, plan 1 is the better; rows 20 and 30:
    # all three, plans 1 and 3 tie at 0.5 and the cheaper (plan 1) is taken; the fixed curve's best of at
    # most 2 or 3 timesteps is plan 2's 0.75 (its fall at 3 timesteps is not held against racing)
    assert got == [(1, 0.5, 1, 0.5, 0.0), (2, 0.75, 1, 0.5, -0.25), (2, 0.75, 1, 0.5, -0.25)]
    assert out["below"] == 2 and out["worst_gap"] == -0.25 and out["worst_at_fixed_timesteps"] == 2
    # at the worst point: racing plan 1 gets items 0, 1 right; fixed plan 2 items 0, 1, 2: one item the
    # fixed plan alone gets right, none racing alone: McNemar's one-sided p = 0.5 ** 1
    assert (out["worst_only_racing_right"], out["worst_only_fixed_right"]) == (0, 1)
    assert out["worst_p_below"] == pytest.approx(0.5)


def test_racing_curve_never_below_where_it_keeps_each_plans_answers():
    """Racing that keeps each plan's answers at fewer rows lies on or above the fixed curve everywhere,
    however the fixed curve falls: that is the reading's point (a fall of the fixed curve with more
    timesteps is noise both sides share)."""
    g = torch.Generator().manual_seed(11)
    scores = [torch.randn(3, 12, generator=g, dtype=torch.float64) + torch.tensor([[0.3], [0.0], [0.1]],
                                                                                  dtype=torch.float64)
              for _ in range(30)]
    fixed = rsb.fixed_curve(scores, 12)
    racing = [(n, rows * 2 // 3 if n > 2 else rows, acc, [0 if r else 1 for r in right])
              for n, (rows, acc, right) in enumerate(fixed, start=1)]
    out = rsb.curve_against_fixed(racing, fixed)
    assert out["below"] == 0 and out["worst_gap"] == 0.0
    # where racing changes one answer of the fixed curve's first peak for the worse (at the fixed plan's
    # rows here, so no longer plan is affordable), the check finds it: every shorter plan is below the
    # peak by at least one item of 30, so the best racing reaches there is the peak less one item
    peak = max(range(12), key=lambda i: (fixed[i][1], -i))
    flipped = [(n, rows, acc, [0 if r else 1 for r in right]) for n, (rows, acc, right) in enumerate(fixed, start=1)]
    n, rows, acc, choices = flipped[peak]
    first_right = choices.index(0)
    flipped[peak] = (n, rows, acc - 1 / 30, [1 if i == first_right else c for i, c in enumerate(choices)])
    out = rsb.curve_against_fixed(flipped, fixed)
    assert out["worst_at_fixed_timesteps"] == peak + 1
    assert out["worst_gap"] == pytest.approx(-1 / 30, abs=1e-4)
    assert (out["worst_only_racing_right"], out["worst_only_fixed_right"]) == (0, 1)


def test_plan_choices_kept_counts_each_plan_against_its_own_choice():
    """Over every plan length, the races that end on their own plan's choice (not the whole plan's):
    all of them with racing off (alpha 0), and by hand for a loose alpha."""
    from fastitm.engine.racing import RaceOptions, simulate

    g = torch.Generator().manual_seed(3)
    bias = torch.tensor([[0.2], [0.0], [0.15], [-1.0]], dtype=torch.float64)
    scores = [torch.randn(4, 10, generator=g, dtype=torch.float64) + bias for _ in range(12)]
    plans = {n: [rsb.sub_plan(s, n) for s in scores] for n in range(1, 11)}
    off = {n: rsb.replay(subs, RaceOptions(alpha=0.0)) for n, subs in plans.items()}
    assert rsb.plan_choices_kept(plans, off) == "120/120"
    loose = RaceOptions(alpha=0.3, min_timesteps=2, round_size=1)
    runs = {n: rsb.replay(subs, loose) for n, subs in plans.items()}
    kept = sum(simulate(sub, loose).choice == max(range(4), key=lambda c: float(sub[c].sum()))
               for subs in plans.values() for sub in subs)
    assert rsb.plan_choices_kept(plans, runs) == f"{kept}/120" and kept < 120  # a loose race changes some


def test_bad_arguments_are_refused_before_the_model_loads(capsys):
    spec = importlib.util.spec_from_file_location("racing_bench", ROOT / "bench" / "racing_bench.py")
    racing_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(racing_bench)
    sys.modules.setdefault("racing_sets_bench", rsb)  # what racing_bench --sets imports
    with pytest.raises(SystemExit) as e:  # through racing_bench --sets, to this bench's own checks
        racing_bench.main(["--sets", "--wall-sets", "2-way,7-way", "--wall", "1"])
    assert e.value.code == 2 and "unknown set(s) ['7-way']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # --wall-only with no rounds would time nothing, then fail
        rsb.main(["--wall-only", "--wall-sets", "6-way"])
    assert e.value.code == 2 and "--wall ROUNDS" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a held-out draw on the tuning seed would not be held out
        rsb.main(["--held-out-seed", str(rsb.SEEDS["tune"])])
    assert e.value.code == 2 and "is the tuning seed" in capsys.readouterr().err
