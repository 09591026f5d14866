"""Racing's decisions on simulated items whose per-timestep scores come from known distributions."""

import math

import pytest
import torch

from fastitm.core.methods import spread_order
from fastitm.engine.racing import RaceOptions, paired_pvalues, simulate, step


def draw(means, T, sd=1.0, seed=0):
    """[K, T] per-timestep scores: candidate k ~ N(means[k], sd) independently per timestep."""
    g = torch.Generator().manual_seed(seed)
    m = torch.tensor(means, dtype=torch.float64)[:, None]
    return m + sd * torch.randn(len(means), T, generator=g, dtype=torch.float64)


def test_pvalues_equal_a_hand_computed_t_test():
    from scipy.special import stdtr  # Student's t CDF, computed independently of scipy.stats

    d = draw([0.3, -0.2, 0.0], 12, seed=3)
    p = paired_pvalues(d)
    for row, got in zip(d, p, strict=True):
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
    # the drop test alone drops both rivals; the settled rule (the default) stops no later, same choice
    race = simulate(per_t, RaceOptions(alpha=0.05, settled=0.0))
    assert race.choice == 0 and race.live.tolist() == [True, False, False]
    settled = simulate(per_t, RaceOptions(alpha=0.05))
    assert settled.choice == 0 and settled.stopped <= race.stopped
    assert race.stopped < 50 and race.rows < 3 * 50
    # each candidate was scored on a prefix of the spread order: its partial mean by hand
    order = spread_order(50)
    for k in range(3):
        n = int(race.timesteps[k])
        assert race.means[k].item() == pytest.approx(per_t[k, order[:n]].mean().item(), rel=1e-12)


def test_exact_ties_run_to_the_plans_end_without_futility_and_stop_at_its_first_look_with_it():
    row = draw([0.0], 30, seed=2)[0]
    per_t = torch.stack([row, row, row - 5.0])
    race = simulate(per_t, RaceOptions(alpha=0.2, min_timesteps=3, round_size=1, futility=0.0))
    assert race.stopped == 30 and race.live.tolist() == [True, True, False]
    assert race.timesteps.tolist()[:2] == [30, 30] and race.choice == 0
    # futility looks from 2 x min_timesteps = 6 timesteps: the tie cannot be separated, so it stops there
    race = simulate(per_t, RaceOptions(alpha=0.2, min_timesteps=3, round_size=1, futility=0.5, settled=0.0))
    assert race.stopped == 6 and race.live.tolist() == [True, True, False] and race.choice == 0


def test_futility_stops_near_ties_by_hand_and_spares_clear_items():
    from scipy.stats import t as student_t

    opts = RaceOptions(alpha=0.05, min_timesteps=5, round_size=5, futility=0.5, settled=0.0)
    T = 40
    order = spread_order(T)
    # a difference the plan cannot resolve: +-1 around 0.01 in turn along the evaluation order
    e = torch.zeros(T, dtype=torch.float64)
    for k, idx in enumerate(order):
        e[idx] = 0.01 + (1.0 if k % 2 == 0 else -1.0)
    base = draw([0.0], T, seed=8)[0]
    near = torch.stack([base, base + e])
    race = simulate(near, opts)
    # by hand at the first futility look (10 timesteps): projected t of best minus rival over all 40
    s = near[:, order[:10]]
    best = int(s.mean(dim=1).argmax())
    d = s[best] - s[1 - best]
    projected = (d.mean() / (d.std() / T**0.5)).item()
    critical = student_t.isf(opts.level(T, 2), T - 1)
    assert projected < 0.5 * critical and race.stopped == 10 and race.live.all()
    assert race.choice == best  # decided by the means so far
    off = simulate(near, RaceOptions(alpha=0.05, min_timesteps=5, round_size=5, futility=0.0, settled=0.0))
    assert off.stopped == T
    # a clear difference is decided by the test, never by futility
    clear = simulate(draw([1.0, 0.0], T, seed=9), opts)
    assert clear.choice == 0 and clear.live.tolist() == [True, False]


def test_alpha_zero_is_the_full_plan():
    per_t = draw([2.0, 0.0, 0.1, -1.0], 20, seed=4)
    race = simulate(per_t, RaceOptions(alpha=0.0))
    assert race.stopped == 20 and race.live.all() and race.rows == 4 * 20
    assert race.choice == int(per_t.mean(dim=1).argmax())


def test_the_best_is_dropped_no_more_often_than_alpha():
    """A near tie (the best 0.1 sd ahead of two rivals) over 400 independent items: the best is dropped
    in at most alpha of them (plus three binomial standard errors). The drop test's promise: the
    settled drops are off."""
    alpha, n_items = 0.1, 400
    opts = RaceOptions(alpha=alpha, min_timesteps=4, round_size=2, settled=0.0)
    dropped = sum(not simulate(draw([0.1, 0.0, 0.0], 40, seed=100 + i), opts).live[0] for i in range(n_items))
    assert dropped / n_items <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / n_items)


def test_a_rival_the_second_best_beats_plainly_is_dropped_without_waiting_for_a_noisy_leader():
    """Leader A (mean 1, noisy), B (0.9, quiet), C (0, as quiet, its noise shared with B's): against the
    leader alone C survives the first look; against the strongest candidates B beats it plainly and it
    is dropped, at the same level (p-values by hand with scipy's paired t-test)."""
    from scipy.stats import ttest_rel

    g = torch.Generator().manual_seed(1)
    T, n = 30, 6
    common = torch.randn(T, generator=g, dtype=torch.float64)
    scores = torch.stack([1.0 + 3.0 * torch.randn(T, generator=g, dtype=torch.float64),
                          0.9 + common + 0.05 * torch.randn(T, generator=g, dtype=torch.float64),
                          common + 0.05 * torch.randn(T, generator=g, dtype=torch.float64)])
    s = scores[:, :n]
    assert int(s.mean(dim=1).argmax()) == 0  # A leads after the first look's timesteps
    level = RaceOptions(alpha=0.05, min_timesteps=n).level(T, 3)
    assert ttest_rel(s[0], s[2], alternative="greater").pvalue > level  # the leader cannot tell A from C yet
    assert ttest_rel(s[1], s[2], alternative="greater").pvalue < level  # B beats C plainly
    live = torch.ones(3, dtype=torch.bool)
    leader = step(s, live, T, RaceOptions(alpha=0.05, min_timesteps=n, against="leader"))
    strongest = step(s, live, T, RaceOptions(alpha=0.05, min_timesteps=n))
    assert leader.tolist() == [True, True, True] and strongest.tolist() == [True, True, False]


def test_the_best_is_dropped_no_more_often_than_alpha_against_the_strongest_with_uneven_noise():
    """The best 0.1 sd ahead of five rivals whose noise ranges over a factor of 10 (quiet rivals are the
    strongest comparators): over 400 items the best is dropped in at most alpha of them (plus three
    binomial standard errors). The drop test's promise: the settled drops, which keep the full plan's
    choice instead (tested below), are off."""
    alpha, n_items, T = 0.1, 400, 30
    opts = RaceOptions(alpha=alpha, min_timesteps=4, round_size=2, settled=0.0)
    sds = torch.tensor([1.0, 0.1, 0.3, 1.0, 2.0, 3.0], dtype=torch.float64)
    dropped = 0
    for i in range(n_items):
        g = torch.Generator().manual_seed(1000 + i)
        x = torch.tensor([0.1, 0, 0, 0, 0, 0], dtype=torch.float64)[:, None] + \
            sds[:, None] * torch.randn(6, T, generator=g, dtype=torch.float64)
        dropped += not simulate(x, opts).live[0]
    assert dropped / n_items <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / n_items)


def test_settled_by_hand():
    """The predictive probability that the leader stays ahead over the whole plan, by hand: the t
    distribution's CDF at t_n sqrt(T / (T - n)); the item stops when the rivals' chances of ending
    ahead sum to at most eps (one rival here; many below)."""
    from scipy.stats import t as student_t

    from fastitm.engine.racing import settled_item

    T, n = 40, 8
    g = torch.Generator().manual_seed(2)
    base = torch.randn(n, generator=g, dtype=torch.float64)
    outcomes = set()
    for shift in (0.15, 0.3, 1.2):
        rival = base - shift + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
        d = base - rival
        prob = student_t.cdf(float(d.mean() / d.std() * n**0.5 * (T / (T - n)) ** 0.5), n - 1)
        s = torch.stack([base, rival])
        for eps in (0.01, 0.05, 0.2):
            got = settled_item(s, torch.ones(2, dtype=torch.bool), T, RaceOptions(settled=eps, min_timesteps=5))
            assert got == (prob >= 1 - eps)
            outcomes.add(got)
    assert outcomes == {True, False}  # both sides of the threshold were checked
    assert not settled_item(s, torch.ones(2, dtype=torch.bool), T, RaceOptions(settled=0.0, min_timesteps=5))
    assert not settled_item(s, torch.ones(2, dtype=torch.bool), T, RaceOptions(settled=0.05, keep=2, min_timesteps=5))
    # Rivals each 97% likely to stay behind (differences built with that t exactly): one alone is
    # settled at eps 0.05; twelve together are not (their chances add up to 0.36), where a per-rival
    # rule would have stopped the item.
    z = torch.randn(n, generator=g, dtype=torch.float64)
    z = (z - z.mean()) / z.std()
    t97 = student_t.ppf(0.97, n - 1) / (T / (T - n)) ** 0.5
    leader = torch.zeros(n, dtype=torch.float64)
    rival = leader - (t97 / n**0.5 + z)  # the difference leader - rival: mean t97 / sqrt(n), sd 1
    opts = RaceOptions(settled=0.05, min_timesteps=5)
    assert settled_item(torch.stack([leader, rival]), torch.ones(2, dtype=torch.bool), T, opts)
    many = torch.stack([leader, *[rival - 1e-9 * k for k in range(12)]])
    assert not settled_item(many, torch.ones(13, dtype=torch.bool), T, opts)
    assert settled_item(many, torch.ones(13, dtype=torch.bool), T, RaceOptions(settled=0.4, min_timesteps=5))


def near_ties(n_items: int, T: int) -> list[torch.Tensor]:
    """2-way items whose true difference is drawn around 0 (many near ties), the same on every call."""
    g = torch.Generator().manual_seed(77)
    return [draw([0.4 * float(torch.randn(1, generator=g)), 0.0], T, seed=5000 + i) for i in range(n_items)]


def test_settled_items_keep_the_full_plans_choice_at_the_stated_rate():
    """Items whose true difference is drawn around 0 (many near ties): racing with settled=eps and no
    drop test changes the full plan's choice in at most eps of them (plus three standard errors)."""
    eps, n_items, T = 0.05, 400, 40
    opts = RaceOptions(alpha=0.0 + 1e-12, settled=eps, min_timesteps=4, round_size=2)
    changed = sum(simulate(s, opts).choice != int(s.mean(dim=1).argmax()) for s in near_ties(n_items, T))
    assert changed / n_items <= eps + 3 * math.sqrt(eps * (1 - eps) / n_items)


def test_settled_follows_alpha_unless_given():
    """One risk level per item: ``settled`` is ``alpha`` unless given, so a smaller alpha keeps the full
    plan's answers more surely too. On near ties (as above), alpha 0.01 changes the full plan's choice in
    at most 1% of the items (plus three standard errors); with settled held at 0.05 (what a smaller
    alpha left before) the same items change at the 5% rate, for fewer rows."""
    assert RaceOptions().settled == RaceOptions().alpha == 0.05
    assert RaceOptions(alpha=0.01).settled == 0.01 and RaceOptions.parse({"alpha": 0.2}).settled == 0.2
    assert RaceOptions(alpha=0.01, settled=0.05).settled == 0.05 and RaceOptions(alpha=0.6, settled=0.0).settled == 0
    with pytest.raises(ValueError, match="settled follows alpha"):
        RaceOptions(alpha=0.6)
    n_items, T = 400, 40
    items = near_ties(n_items, T)
    changed, rows = {}, {}
    for settled in (None, 0.05):
        opts = RaceOptions(alpha=0.01, settled=settled, min_timesteps=4, round_size=2)
        races = [simulate(s, opts) for s in items]
        changed[settled] = sum(r.choice != int(s.mean(dim=1).argmax()) for r, s in zip(races, items, strict=True))
        rows[settled] = sum(r.rows for r in races)
    assert changed[None] / n_items <= 0.01 + 3 * math.sqrt(0.01 * 0.99 / n_items)
    assert changed[0.05] / n_items > 0.01 + 3 * math.sqrt(0.01 * 0.99 / n_items)  # the old coupling, measurably looser
    assert rows[None] > rows[0.05]


def test_settled_drops_by_hand():
    """Each rival's chance of ending the whole plan ahead of the live candidate that beats it most
    clearly, by hand (Student's t CDF at t_n sqrt(T / (T - n))): the rivals at most settled x
    DROP_SHARE / (K - 1) are dropped, the surest first, never the last rival; what they risked is spent,
    and the settled stop counts it against the same settled."""
    from scipy.special import stdtr

    import fastitm.engine.racing as racing

    T, n, eps = 40, 8, 0.05
    x = draw([0.0, -0.05, -0.9, -3.0, -3.2], n, sd=0.3, seed=11)
    live = torch.ones(5, dtype=torch.bool)
    opts = RaceOptions(settled=eps, min_timesteps=5)

    def ahead(a, r):  # the chance that r ends the plan above a
        d = (x[a] - x[r]).tolist()
        m = sum(d) / n
        sd = math.sqrt(sum((v - m) ** 2 for v in d) / (n - 1))
        return 1 - stdtr(n - 1, m / sd * math.sqrt(n) * math.sqrt(T / (T - n)))

    chance = {r: min(ahead(a, r) for a in range(5) if a != r) for r in range(1, 5)}
    cap = eps * racing.DROP_SHARE / 4
    expect = {r for r, c in chance.items() if c <= cap}
    assert expect == {2, 3, 4}, chance  # the near rival stays; the far ones are dropped
    got, spent = racing.settled_drops(x, live, T, opts)
    assert set((~got).nonzero().flatten().tolist()) == expect
    assert spent == pytest.approx(sum(chance[r] for r in expect), rel=1e-9, abs=1e-300)
    # the last live rival is the stop's to judge, however sure; two live candidates: nothing to drop
    two = torch.tensor([True, False, False, True, False])
    assert racing.settled_drops(x, two, T, opts)[0].tolist() == two.tolist()
    # off with settled=0 or keep > 1
    for off in (RaceOptions(settled=0.0, min_timesteps=5), RaceOptions(keep=2, min_timesteps=5)):
        assert racing.settled_drops(x, live, T, off)[0].all()
    # the stop: the live rival's chance alone is settled; with what the drops spent on top it need not be
    pair = torch.tensor([True, True, False, False, False])
    at = RaceOptions(settled=min(0.49, chance[1] + 0.01), min_timesteps=5)
    assert racing.settled_item(x, pair, T, at)
    assert racing.settled_item(x, pair, T, at, spent=at.settled - chance[1] - 1e-6)
    assert not racing.settled_item(x, pair, T, at, spent=at.settled - chance[1] + 1e-6)


def test_settled_drops_and_stop_keep_the_full_plans_choice_at_the_stated_rate():
    """Items of 6 candidates whose true means are drawn around one another (near ties among many):
    racing with settled=eps and no drop test changes the full plan's choice in at most eps of them (plus
    three standard errors), its settled drops and stop together; and the drops do fire."""
    eps, n_items, T = 0.05, 300, 40
    opts = RaceOptions(alpha=1e-12, settled=eps, min_timesteps=4, round_size=2)
    changed = dropped_early = 0
    g = torch.Generator().manual_seed(78)
    for i in range(n_items):
        means = (0.3 * torch.randn(6, generator=g, dtype=torch.float64)).tolist()
        s = draw(means, T, seed=9000 + i)
        race = simulate(s, opts)
        changed += race.choice != int(s.mean(dim=1).argmax())
        dropped_early += int(race.timesteps.min()) < race.stopped
    assert changed / n_items <= eps + 3 * math.sqrt(eps * (1 - eps) / n_items)
    assert dropped_early > n_items // 4


def test_settled_drops_spend_fewer_rows_on_clearly_wrong_rivals(monkeypatch):
    """A near tie among clearly wrong rivals: dropping them on the settled bound saves rows against the
    drop test alone, and every item keeps the full plan's choice."""
    import fastitm.engine.racing as racing

    items = [draw([0.0, -0.3, -1.0, -1.2, -1.5, -2.0], 49, seed=700 + i) for i in range(20)]
    with_drops = [simulate(x, RaceOptions()) for x in items]
    monkeypatch.setattr(racing, "DROP_SHARE", 0.0)
    without = [simulate(x, RaceOptions()) for x in items]
    for x, a, b in zip(items, without, with_drops, strict=True):
        full = int(x.mean(dim=1).argmax())
        assert b.choice == full and a.choice == full
    assert sum(r.rows for r in with_drops) < 0.92 * sum(r.rows for r in without)


def test_many_candidates_spend_fewer_rows_and_keep_the_best():
    """24 classes, one best by at least 1 sd: racing keeps it and spends under half the full plan's rows."""
    means = [1.0] + [0.0 - 0.1 * k for k in range(23)]
    rows, right = 0, 0
    for i in range(20):
        race = simulate(draw(means, 50, seed=200 + i), RaceOptions(alpha=0.05))
        rows += race.rows
        right += race.choice == 0
    assert right == 20 and rows < 0.5 * 20 * 24 * 50


def draw_scaled(means, T, scales, seed=0):
    """[K, T] scores whose spread differs 100-fold between timesteps, as real per-timestep errors do:
    candidate k at timestep t ~ scale_t * N(means[k], 1) (a rival's deficit scales with the timestep)."""
    return draw(means, T, seed=seed) * torch.as_tensor(scales, dtype=torch.float64)[None, :]


def test_many_candidates_standardized_keep_the_best_at_the_stated_rate():
    """8 candidates, the best 0.1 sd ahead of 7 equal rivals (a near tie), per-timestep scales from 0.01
    to 1: over 300 items the best is dropped in at most alpha of them (plus three standard errors). The
    drop test's promise: the settled drops are off, as above."""
    alpha, n_items, T = 0.1, 300, 40
    scales = torch.logspace(-2, 0, T)[torch.randperm(T, generator=torch.Generator().manual_seed(0))]
    opts = RaceOptions(alpha=alpha, min_timesteps=4, round_size=2, settled=0.0)
    dropped = sum(not simulate(draw_scaled([0.1] + [0.0] * 7, T, scales, seed=400 + i), opts).live[0]
                  for i in range(n_items))
    assert dropped / n_items <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / n_items)


def test_standardizing_by_the_timesteps_spread_saves_rows():
    """12 candidates, the best 1 sd ahead, scales from 0.01 to 1 across timesteps: the raw differences'
    t statistic is small (their spread is the scales'), the standardized one is not. Racing keeps the
    best and spends fewer rows than with the raw test (MIN_SPREAD above K: the raw test alone)."""
    import fastitm.engine.racing as racing

    T = 50
    scales = torch.logspace(-2, 0, T)[torch.randperm(T, generator=torch.Generator().manual_seed(1))]
    items = [draw_scaled([1.0] + [0.0 - 0.05 * k for k in range(11)], T, scales, seed=500 + i) for i in range(10)]
    drop_only = RaceOptions(settled=0.0)  # the drop test's power, without the settled stop
    std = [simulate(x, drop_only) for x in items]
    assert all(r.choice == 0 for r in std)
    old = racing.MIN_SPREAD
    racing.MIN_SPREAD = 13
    try:
        raw = [simulate(x, drop_only) for x in items]
    finally:
        racing.MIN_SPREAD = old
    assert sum(r.rows for r in std) < 0.6 * sum(r.rows for r in raw)
    # below MIN_SPREAD candidates at a timestep, the raw differences are tested (nothing to standardize by)
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    assert racing.standardized(x, torch.ones(2, 3, dtype=torch.bool)) is None


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


# -- racing in the engine (fastitm.score(adaptive=...)) ---------------------------------------------------

import fastitm  # noqa: E402
from fastitm.testing import assert_close  # noqa: E402

RACE_TEXTS = ["a red dog", "a blue circle left of a cat", "two green squares", "a yellow car on a road",
              "an empty room"]
# A loose level and short rounds so the tiny random model drops texts within 12 timesteps.
LOOSE = {"alpha": 0.6, "min_timesteps": 3, "round_size": 2, "settled": 0.05}  # settled: alpha is past its range


def _race_inputs():
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(11)), RACE_TEXTS


@pytest.mark.parametrize("method", ["diffusion_itm", "discffusion", "diffusion_classifier"])
def test_engine_races_as_the_simulation_decides_on_the_reference_scores(tiny, method):
    """The engine's decisions equal racing simulated on the reference's per-timestep scores of the
    same plan, and every row it computed equals the reference's."""
    imgs, texts = _race_inputs()
    opts = dict(model=tiny, method=method, timesteps=12, seed=3, batch_size=7)
    res = fastitm.score(imgs, texts, adaptive=LOOSE, **opts)
    ref = fastitm.reference.score(imgs, texts, model=tiny, method=method, plan=res.plan)
    race = RaceOptions.parse(LOOSE)
    done = ~res.per_timestep.isnan()
    assert_close(res.per_timestep[done], ref.per_timestep[done], rtol=1e-5, atol=2e-5, name="rows raced")
    rows = 0
    for i in range(imgs.shape[0]):
        sim = simulate(ref.per_timestep[i], race)
        survivors = res.matrix[i].isfinite()
        assert torch.equal(survivors, sim.live), (i, survivors, sim.live)
        assert torch.equal(done[i].sum(dim=1), sim.timesteps), i
        assert_close(res.matrix[i][survivors], sim.means[sim.live].float(), rtol=1e-5, atol=2e-5)
        assert res.stats["racing"]["timesteps_per_image"][i] == sim.stopped
        rows += res.stats["racing"]["rows_per_image"][i]
    assert rows == res.stats["unet_rows"] < (13 if method == "diffusion_itm" else 12) * 3 * len(texts)
    assert res.stats["racing"]["dropped"] == int((res.matrix == float("-inf")).sum()) > 0
    # the dropped texts keep the mean they had when they were dropped
    dropped = res.matrix == float("-inf")
    assert res.partial_means[dropped].isfinite().all()


def test_engine_settled_drops_as_the_simulation_decides(tiny):
    """Settled drops in the engine (the drop test all but off, a loose settled): the same survivors,
    timesteps and means as racing simulated on the reference's scores, and some texts were dropped."""
    imgs, texts = _race_inputs()
    adaptive = {"alpha": 1e-9, "min_timesteps": 3, "round_size": 2, "settled": 0.45}
    res = fastitm.score(imgs, texts, model=tiny, timesteps=12, seed=3, batch_size=7, adaptive=adaptive)
    ref = fastitm.reference.score(imgs, texts, model=tiny, plan=res.plan)
    race = RaceOptions.parse(adaptive)
    done = ~res.per_timestep.isnan()
    for i in range(imgs.shape[0]):
        sim = simulate(ref.per_timestep[i], race)
        assert torch.equal(res.matrix[i].isfinite(), sim.live), i
        assert torch.equal(done[i].sum(dim=1), sim.timesteps), i
        assert res.stats["racing"]["timesteps_per_image"][i] == sim.stopped
    assert res.stats["racing"]["dropped"] > 0


def test_racing_over_images_decides_each_texts_images_as_simulated(tiny):
    """over="images": each text's images compete (image retrieval), decided as racing them on the
    reference's per-timestep scores of that text's column."""
    g = torch.Generator().manual_seed(12)
    # images the tiny random model tells apart a little: noise, black, white, dim noise
    imgs = torch.stack([torch.rand(3, 16, 16, generator=g), torch.zeros(3, 16, 16), torch.ones(3, 16, 16),
                        0.2 * torch.rand(3, 16, 16, generator=g), torch.rand(3, 16, 16, generator=g)])
    texts = RACE_TEXTS[:3]
    opts = {**LOOSE, "over": "images", "futility": 0.0}  # no futility stop: the test must drop
    res = fastitm.score(imgs, texts, model=tiny, timesteps=12, seed=3, batch_size=6, adaptive=opts)
    ref = fastitm.reference.score(imgs, texts, model=tiny, plan=res.plan)
    race = RaceOptions.parse(opts)
    done = ~res.per_timestep.isnan()
    assert_close(res.per_timestep[done], ref.per_timestep[done], rtol=1e-5, atol=2e-5)
    for j in range(len(texts)):
        sim = simulate(ref.per_timestep[:, j], race)
        assert torch.equal(res.matrix[:, j].isfinite(), sim.live), j
        assert torch.equal(done[:, j].sum(dim=1), sim.timesteps), j
    assert res.stats["racing"]["dropped"] > 0 and res.stats["racing"]["options"]["over"] == "images"


def test_alpha_zero_is_the_full_plan_and_batching_does_not_change_decisions(tiny):
    imgs, texts = _race_inputs()
    opts = dict(model=tiny, timesteps=12, seed=3)
    full = fastitm.score(imgs, texts, batch_size=16, **opts)
    zero = fastitm.score(imgs, texts, adaptive={**LOOSE, "alpha": 0.0}, batch_size=5, **opts)
    assert zero.stats["unet_rows"] == full.stats["unet_rows"] and all(zero.stats["racing"]["plan_end"])
    assert_close(zero.matrix, full.matrix, rtol=1e-5, atol=2e-5)
    a = fastitm.score(imgs, texts, adaptive=LOOSE, batch_size=3, **opts)
    b = fastitm.score(imgs, texts, adaptive=LOOSE, batch_size=64, **opts)
    assert torch.equal(a.matrix.isinf(), b.matrix.isinf()) and a.stats["racing"] == b.stats["racing"]
    fin = a.matrix.isfinite()
    assert_close(a.matrix[fin], b.matrix[fin], rtol=1e-5, atol=2e-5)


def test_racing_respects_pairs_and_keep(tiny):
    imgs, texts = _race_inputs()
    pairs = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    res = fastitm.score(imgs, texts, model=tiny, timesteps=12, seed=3, pairs=pairs, adaptive={**LOOSE, "keep": 2})
    assert res.matrix[~pairs].isnan().all()  # never asked for
    survivors = res.matrix.isfinite()
    assert (survivors.sum(dim=1) >= torch.tensor([2, 2, 1])).all()
    # image 2 has one candidate: nothing to decide, so no test stops it: the whole plan, as without racing
    assert res.stats["racing"]["timesteps_per_image"][2] == 12 and survivors[2, 0]
    full = fastitm.score(imgs, texts, model=tiny, timesteps=12, seed=3, pairs=pairs)
    assert_close(res.matrix[2, 0], full.matrix[2, 0], rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("case", ["one text per image", "keep covers every text", "matched pairs"])
def test_racing_with_nothing_to_race_runs_the_whole_plan(tiny, case):
    imgs, texts = _race_inputs()
    opts = dict(model=tiny, timesteps=12, seed=3)
    if case == "one text per image":
        got = fastitm.score(imgs, texts[:1], adaptive=LOOSE, **opts)
        want = fastitm.score(imgs, texts[:1], **opts)
    elif case == "keep covers every text":
        got = fastitm.score(imgs, texts[:3], adaptive={**LOOSE, "keep": 3}, **opts)
        want = fastitm.score(imgs, texts[:3], **opts)
    else:  # DiffusionScore's call: each image against its own text only
        pairs = torch.eye(3, dtype=torch.bool)
        got = fastitm.score(imgs, texts[:3], adaptive=True, pairs=pairs, **opts)
        want = fastitm.score(imgs, texts[:3], pairs=pairs, **opts)
    assert got.stats["unet_rows"] == want.stats["unet_rows"] and all(got.stats["racing"]["plan_end"])
    assert set(got.stats["racing"]["timesteps_per_image"]) == {12}
    assert_close(got.matrix, want.matrix, rtol=1e-5, atol=2e-5, name=case)
    # the simulation agrees: K <= keep runs every timestep
    race = simulate(torch.randn(2, 12, generator=torch.Generator().manual_seed(0)), RaceOptions(**LOOSE, keep=2))
    assert race.stopped == 12 and race.rows == 24


def test_racing_resumes_to_the_uninterrupted_result(tiny, tmp_path):
    imgs, texts = _race_inputs()
    kw = dict(model=tiny, timesteps=12, seed=3, batch_size=4, adaptive=LOOSE)
    full = fastitm.score(imgs, texts, **kw)
    ckpt = tmp_path / "race.pt"
    seen = [0]

    def hook(module, args, kwargs):
        seen[0] += 1
        if seen[0] == 6:
            import signal

            signal.raise_signal(signal.SIGINT)

    h = tiny.unet.register_forward_pre_hook(hook, with_kwargs=True)
    from fastitm.engine import Interrupted

    try:
        with pytest.raises(Interrupted) as info:
            fastitm.score(imgs, texts, checkpoint=str(ckpt), checkpoint_every=1e9, **kw)
    finally:
        h.remove()
    assert 0 < info.value.rows_done < full.stats["unet_rows"]
    res = fastitm.score(imgs, texts, checkpoint=str(ckpt), **kw)
    assert res.stats["unet_rows"] == full.stats["unet_rows"] - info.value.rows_done
    assert torch.equal(res.matrix.isinf(), full.matrix.isinf()) and res.stats["racing"] == full.stats["racing"]
    fin = full.matrix.isfinite()
    assert_close(res.matrix[fin], full.matrix[fin], rtol=1e-5, atol=2e-5)
    # a checkpoint of the full plan is not a racing run's: refused, named
    with pytest.raises(Exception, match="checkpoint"):
        fastitm.score(imgs, texts, model=tiny, timesteps=12, seed=3, checkpoint=str(ckpt))


def test_adaptive_arguments_are_checked(tiny):
    imgs, texts = _race_inputs()
    with pytest.raises(ValueError, match="adaptive= and elimination="):
        fastitm.score(imgs, texts, model=tiny, method="diffusion_classifier", elimination=[(2, 2)], adaptive=True)
    with pytest.raises(ValueError, match="unknown adaptive option"):
        fastitm.score(imgs, texts, model=tiny, adaptive={"alpha": 0.1, "rounds": 3})
    with pytest.raises(ValueError, match="alpha"):
        fastitm.score(imgs, texts, model=tiny, adaptive={"alpha": 1.5})
    with pytest.raises(ValueError, match="over must be"):
        fastitm.score(imgs, texts, model=tiny, adaptive={"over": "pairs"})


def test_weighted_pvalues_by_hand_and_uniform_weights_are_the_plain_test():
    from scipy.special import stdtr

    d = draw([0.3, -0.2], 12, seed=5)
    w = torch.linspace(2.0, 0.1, 12, dtype=torch.float64)
    p = paired_pvalues(d, w)
    for row, got in zip(d.tolist(), p, strict=True):
        v1, v2 = float(w.sum()), float((w * w).sum())
        m = sum(wi * x for wi, x in zip(w.tolist(), row, strict=True)) / v1
        var = sum(wi * (x - m) ** 2 for wi, x in zip(w.tolist(), row, strict=True)) / (v1 - v2 / v1)
        t = m / (math.sqrt(var) * math.sqrt(v2) / v1)
        assert got.item() == pytest.approx(1 - stdtr(v1 * v1 / v2 - 1, t), rel=1e-9)
    torch.testing.assert_close(paired_pvalues(d, torch.ones(12, dtype=torch.float64)), paired_pvalues(d),
                               rtol=1e-10, atol=0)
    # all the weight on one timestep: nothing to test
    one = torch.zeros(12, dtype=torch.float64)
    one[3] = 1.0
    assert paired_pvalues(d, one).tolist() == [1.0, 1.0]


def test_weighted_racing_decides_on_the_weighted_means():
    # Candidate 0 leads at the timesteps the weights keep, candidate 1 at the others: racing with the
    # weights keeps 0, racing without them keeps 1.
    T = 40
    first = torch.arange(T) < T // 2
    per_t = torch.stack([torch.where(first, 1.0, -1.0), torch.where(first, -1.0, 2.0)]).double()
    per_t = per_t + 0.3 * draw([0.0, 0.0], T, seed=8)
    w = first.double() + 1e-3
    opts = RaceOptions(alpha=0.05)
    assert simulate(per_t, opts, w=w).choice == 0 and simulate(per_t, opts).choice == 1
    race = simulate(per_t, opts, w=w)
    # each candidate's mean: weighted over the timesteps it ran (the first of the spread order)
    order = spread_order(T)
    for k in range(2):
        ran = order[: int(race.timesteps[k])]
        want = float((per_t[k, ran] * w[ran]).sum() / w[ran].sum())
        assert race.means[k].item() == pytest.approx(want, rel=1e-12)


def test_engine_races_on_weighted_scores_as_the_simulation_decides(tiny):
    """With timestep weights the engine's racing takes the decisions simulated with those weights on
    the reference's per-timestep scores, and the survivors score their weighted means."""
    imgs, texts = _race_inputs()
    imgs = imgs[:2]
    plan = fastitm.make_plan(tiny, 12, seed=3)
    table = {t: float(k % 4 + 1) for k, t in enumerate(plan.timesteps.tolist())}
    res = fastitm.score(imgs, texts, model=tiny, plan=plan, adaptive=LOOSE, weights=table, batch_size=7)
    ref = fastitm.reference.score(imgs, texts, model=tiny, plan=plan)
    w = torch.tensor([table[t] for t in plan.timesteps.tolist()], dtype=torch.float64)
    race = RaceOptions.parse(LOOSE)
    for i in range(imgs.shape[0]):
        sim = simulate(ref.per_timestep[i], race, w=w)
        survivors = res.matrix[i].isfinite()
        assert torch.equal(survivors, sim.live), i
        assert_close(res.matrix[i][survivors], sim.means[sim.live].float(), rtol=1e-5, atol=2e-5)
    dropped = res.matrix == float("-inf")
    assert dropped.any() and res.partial_means[dropped].isfinite().all()
    assert res.stats["weights"] == table
