"""Racing's decisions on simulated items whose per-timestep scores come from known distributions."""

import math

import pytest
import torch

from fastitm.methods import spread_order
from fastitm.racing import RaceOptions, paired_pvalues, simulate, step


def draw(means, T, sd=1.0, seed=0):
    """[K, T] per-timestep scores: candidate k ~ N(means[k], sd) independently per timestep."""
    g = torch.Generator().manual_seed(seed)
    m = torch.tensor(means, dtype=torch.float64)[:, None]
    return m + sd * torch.randn(len(means), T, generator=g, dtype=torch.float64)


def test_pvalues_equal_a_hand_computed_t_test():
    from scipy.special import stdtr  # Student's t CDF, computed independently of scipy.stats

    d = draw([0.3, -0.2, 0.0], 12, seed=3)
    p = paired_pvalues(d)
    for row, got in zip(d, p):
        n = len(row)
        mean = sum(row.tolist()) / n
        sd = math.sqrt(sum((x - mean) ** 2 for x in row.tolist()) / (n - 1))
        assert got.item() == pytest.approx(1 - stdtr(n - 1, mean / (sd / math.sqrt(n))), rel=1e-9)
    # no spread: a constant positive difference is decided, an exact tie never
    assert paired_pvalues(torch.tensor([[0.5] * 6, [0.0] * 6, [-0.1] * 6])).tolist() == [0.0, 1.0, 1.0]


def test_level_is_bonferroni_over_looks_and_rivals():
    opts = RaceOptions(alpha=0.06, min_timesteps=5, round_size=5)
    assert opts.looks(50) == [5, 10, 15, 20, 25, 30, 35, 40, 45]
    assert opts.level(50, 4) == pytest.approx(0.06 / (9 * 3))


def test_a_clear_winner_stops_early_and_keeps_the_winner():
    per_t = draw([1.5, 0.0, -0.5], 50, seed=1)
    race = simulate(per_t, RaceOptions(alpha=0.05))
    assert race.choice == 0 and race.live.tolist() == [True, False, False]
    assert race.stopped < 50 and race.rows < 3 * 50
    # each candidate was scored on a prefix of the spread order: its partial mean by hand
    order = spread_order(50)
    for k in range(3):
        n = int(race.timesteps[k])
        assert race.means[k].item() == pytest.approx(per_t[k, order[:n]].mean().item(), rel=1e-12)


def test_exact_ties_run_to_the_plans_end():
    row = draw([0.0], 30, seed=2)[0]
    race = simulate(torch.stack([row, row, row - 5.0]), RaceOptions(alpha=0.2, min_timesteps=3, round_size=1))
    assert race.stopped == 30 and race.live.tolist() == [True, True, False]
    assert race.timesteps.tolist()[:2] == [30, 30] and race.choice == 0


def test_alpha_zero_is_the_full_plan():
    per_t = draw([2.0, 0.0, 0.1, -1.0], 20, seed=4)
    race = simulate(per_t, RaceOptions(alpha=0.0))
    assert race.stopped == 20 and race.live.all() and race.rows == 4 * 20
    assert race.choice == int(per_t.mean(dim=1).argmax())


def test_the_best_is_dropped_no_more_often_than_alpha():
    """A near tie (the best 0.1 sd ahead of two rivals) over 400 independent items: the best is dropped
    in at most alpha of them (plus three binomial standard errors)."""
    alpha, n_items = 0.1, 400
    opts = RaceOptions(alpha=alpha, min_timesteps=4, round_size=2)
    dropped = sum(not simulate(draw([0.1, 0.0, 0.0], 40, seed=100 + i), opts).live[0] for i in range(n_items))
    assert dropped / n_items <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / n_items)


def test_many_candidates_spend_fewer_rows_and_keep_the_best():
    """24 classes, one best by at least 1 sd: racing keeps it and spends under half the full plan's rows."""
    means = [1.0] + [0.0 - 0.1 * k for k in range(23)]
    rows, right = 0, 0
    for i in range(20):
        race = simulate(draw(means, 50, seed=200 + i), RaceOptions(alpha=0.05))
        rows += race.rows
        right += race.choice == 0
    assert right == 20 and rows < 0.5 * 20 * 24 * 50


def test_keep_stops_with_that_many_and_never_drops_below_it():
    per_t = draw([3.0, 2.9, 0.0, -1.0, -2.0, -3.0], 60, seed=5)
    race = simulate(per_t, RaceOptions(alpha=0.05, keep=2))
    assert int(race.live.sum()) == 2 and race.live[:2].all() and race.stopped < 60
    # a decision that would drop too many keeps the best by mean
    live = step(torch.tensor([[5.0] * 5, [0.0] * 5, [-1.0] * 5]), torch.ones(3, dtype=torch.bool), 10,
                RaceOptions(keep=2, min_timesteps=5))
    assert live.tolist() == [True, True, False]


def test_decisions_are_a_function_of_the_scores_only():
    per_t = draw([0.4, 0.0, 0.2], 40, seed=6)
    a = simulate(per_t, RaceOptions(alpha=0.1, min_timesteps=4, round_size=3))
    b = simulate(per_t.clone(), RaceOptions(alpha=0.1, min_timesteps=4, round_size=3))
    assert torch.equal(a.live, b.live) and torch.equal(a.timesteps, b.timesteps) and a.stopped == b.stopped


@pytest.mark.parametrize("adaptive,match", [
    ({"alpha": 1.5}, "alpha must be a number in \\[0, 1\\)"),
    ({"min_timesteps": 1}, "at least 2"),
    ({"keep": 0}, "keep must be a positive int"),
    ({"speed": 2}, "unknown adaptive option"),
    ("yes", "adaptive must be True, False or a dict"),
])
def test_bad_options_name_the_option(adaptive, match):
    with pytest.raises((ValueError, TypeError), match=match):
        RaceOptions.parse(adaptive)


def test_parse():
    assert RaceOptions.parse(False) is None and RaceOptions.parse(True) == RaceOptions()
    assert RaceOptions.parse({"alpha": 0.01, "keep": 5}) == RaceOptions(alpha=0.01, keep=5)
