"""Racing: spend denoiser rows only where they decide the answer (after Clark & Jaini, "Text-to-Image
Diffusion Models are Zero-Shot Classifiers", arXiv 2303.15233).

The candidates of one item (the texts of an image, or the images of a text) are scored on the same
timesteps and noise, so their per-timestep scores are paired samples. The plan's timesteps are taken
in a fixed spread order (:func:`fastitm.core.methods.spread_order`), ``round_size`` at a time. After each
round from ``min_timesteps`` on, every live candidate is compared with the item's current best (the
highest mean so far) by a one-sided paired t-test on the per-timestep score differences and dropped
when it is worse at the corrected level below. An item stops when ``keep`` candidates are left or
the plan is exhausted; the survivors are then ranked by their means, as the fixed plan ranks them.
An item that starts with no more than ``keep`` candidates has nothing to decide: it runs the whole plan.

What ``alpha`` promises, per item: the candidate with the highest expected score is dropped by the test
with probability at most ``alpha``, to the extent that its per-timestep differences with each other
candidate behave like independent normal draws (the t-test's assumption; the timesteps of a plan
differ in noise level, which adds spread to the differences and so makes the test cautious). Two
corrections make it hold:

- multiple comparisons: at each look the best candidate may face up to ``K - 1`` tests, any of which
  could drop it wrongly;
- sequential testing: testing after every round and stopping at the first significant result inflates
  a fixed-size test's error (optional stopping), by up to the number of looks.

Both are handled by Bonferroni: each test runs at ``alpha / (looks * (K - 1))``, where ``looks`` is the
number of rounds at which the plan can test. What the ``K - 1`` pays for is who the best is tested
against, not how many rivals are tested: only one candidate is the best, and it is dropped only when
some other candidate c wins a test against it; whatever chose c (the highest mean, or the clearest win),
that is one of ``K - 1`` tests each at the level, so a union bound gives ``alpha`` per item with no
further factor for the rivals. So ``against="strongest"`` (the default) tests each rival against every
one of the strongest live candidates and drops it on the clearest win, at the same level: a rival that
the second-best beats plainly while the leader is noisy is dropped without waiting for the leader's test
(Holm's step-down over the rivals would not help: the best's test is the one that must hold, and it is
one test). ``against="leader"`` is the previous rule. It is conservative (successive looks share most of
their samples), but it needs no assumption about the look schedule, and it makes the decisions a pure
function of the per-timestep scores: the same scores give the same decisions, however the rows were
batched, sharded or resumed.

What it does not promise: which of two candidates whose difference the plan cannot resolve survives.

Standardized differences (items of at least ``MIN_SPREAD`` = 5 candidates): a score's spread differs
by orders of magnitude between timesteps (a Diffusion Classifier error moves by 1e-3 at one timestep
and by 1 at another), and a rival's deficit follows it, so raw differences are positive at every
timestep yet their t statistic stays small: on 24-way classification it was about 1.5 after 5
timesteps for rivals that were plainly wrong. While at least 5 candidates have been scored at every
timestep seen, each timestep's scores are divided by their spread there (the standard deviation over
the candidates scored at it) before the paired test, so a consistent small deficit at a quiet
timestep counts as much as a large one at a noisy timestep. The leader is still the highest raw mean
and the survivors are ranked by their raw means (the full plan's criterion). The promise above then
holds for the standardized means; under the model that a rival's deficit at each timestep is
proportional to that timestep's spread, they order the candidates as the raw means do (a test draws
such items: tests/test_racing.py). With fewer candidates (2-way items, Winoground, after most rivals
are dropped) the raw differences are tested: the spread of two or three scores is too tied to their
own difference to scale it.

Timestep weights (``weights=``, :mod:`fastitm.core.weights`): the result ranks by the weighted mean, so
racing decides on it too. The leader is the highest weighted mean of the timesteps seen; the paired
test is a weighted one (the weighted mean difference over its standard error, sqrt(sum w^2) / sum w
times the reliability-weighted spread, on (sum w)^2 / sum w^2 - 1 degrees of freedom: Kish's effective
number of timesteps); futility projects to the whole plan's weights. Uniform weights give the plain
t-test; weights concentrated on few timesteps leave few effective samples, so decisions come later.

Settled items (``settled``, on by default at ``alpha``'s level, 0.05): an item stops once the whole
plan's choice is all but decided, when the predictive probabilities that some live rival's full-plan
mean ends above the leader's sum to at most ``settled`` (:func:`settled_item`). It keeps the full plan's
answers rather than certifying the truth: under the normal model of the differences, a stop changes the
full plan's choice with probability at most ``settled`` per item, whenever it happens (a predictive
probability is not inflated by looking often). (The first form bounded each rival separately; with
hundreds of classes live that let an item stop after 10 timesteps on a near tie, so it is now one bound
per item.) The same bound drops rivals sooner (:func:`settled_drops`): while three or more candidates
are live, a rival whose predictive chance of ending the plan ahead of the candidate that beats it most
clearly is at most ``settled * DROP_SHARE / (K - 1)`` leaves, and its chance is spent from the item's
``settled``, so drops and stop together still change the full plan's choice with probability at most
``settled``. The clearly wrong rivals of a 6-way item are the rows to save (the drop test waits for
significance at its Bonferroni level); a 2-way item has no such rival, and its stop keeps the whole
budget. Hard items, whose full-plan choice is not yet predictable, run on: more timesteps do make a
better decision there. ``settled`` follows ``alpha`` unless given: one level of risk per item for the
test (dropping the best) and for the stop and drops (changing the full plan's choice), so a smaller
``alpha`` asks for the full plan's answers more surely too, and racing's accuracy-vs-rows curve over
``alpha`` reaches from the defaults to the plans' own answers (at alpha 0.001 all but 41 of 113,974 plan
choices were kept over the bench's sets and plan lengths, at 2.2x fewer conditional rows on the 3/6-way
sets' whole plan: bench/RESULTS.md). With ``settled`` held at 0.05, a smaller ``alpha`` still let 5% per
item through. Chosen on the tuning sets of ``bench/racing_sets_bench.py`` and reported on held-out ones
(bench/RESULTS.md): it saved more rows than futility at equal or better accuracy on every set. The
normal model takes the timesteps to come as alike to those seen. They are not alike over a plan (the
differences' spread varies some 180-fold from one end to the other), so the spread order keeps every
prefix balanced over the plan (:func:`fastitm.core.methods.spread_order`): the timesteps to come are
interleaved with those seen, not bunched at one end. With the order that filled gaps from one end, 21 of
1,695 settled stops (1.2%) changed the plan's choice when replayed over six sets and six plan lengths;
with the balanced order and the defaults, 11 of 2,128 (0.5%), as many towards the truth as away
(bench/RESULTS.md).

Futility (``futility``, off by default; 0.5 was the default before ``settled``): a near tie would
otherwise run to the plan's end and be decided by the full mean, at the full plan's cost, although the
plan cannot separate it either. From ``2 * min_timesteps`` timesteps on, an item stops when, for every
live rival of its best, the t statistic the whole plan would reach at the mean difference and spread
seen so far is below ``futility`` times the test's critical value; its live candidates are then ranked
by their means so far. Where the full plan's answer is significant, futility rarely fires (its projected
t exceeds the critical value); where it fires, the full plan's answer would have been a coin flip too.
What it costs: such items are decided on fewer timesteps, so their choice may differ from the full
plan's. On the benchmark (bench/RESULTS.md: 226 held-out hard-negative items, 49 timesteps) it took
racing from 2.6x to 3.6x fewer rows; every item whose full-plan choice was significant kept it, and
overall accuracy moved from 0.858 to 0.867 (near ties flipping both ways). An exact tie (identical
per-timestep scores) is never decided by the test: it stops at the first futility look, or with
``futility=0`` runs to the plan's end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.methods import spread_order
from ..core.weights import weighted_mean

ADAPTIVE_KEYS = ("alpha", "min_timesteps", "round_size", "keep", "futility", "over", "against", "settled")
AGAINST = ("strongest", "leader")
# How many of the best live candidates (by mean) each rival is tested against under against="strongest":
# the tests run cost (live x this) per look, whatever the number of classes.
COMPARATORS = 8


@dataclass(frozen=True)
class RaceOptions:
    """``alpha``: per item, the largest probability that the test drops the best candidate;
    ``min_timesteps``: no candidate is dropped before this many timesteps; ``round_size``: timesteps per
    round (tests happen between rounds); ``keep``: the item stops when this many candidates are left (1 for
    accuracy, 5 for R@5); ``futility``: the share of the critical value below which an item whose
    whole plan could not separate its candidates stops early (0: never; see the module docstring);
    ``over``: what competes, ``"texts"`` (each image's texts: text retrieval, the default) or
    ``"images"`` (each text's images: image retrieval; with DiffusionITM only normalized scores make
    images comparable); ``against``: what a rival is tested against, ``"strongest"`` (each of the best
    live candidates, :data:`COMPARATORS` of them; the rival is dropped when any beats it: the one that
    beats it most clearly decides) or ``"leader"`` (the highest mean only); ``settled``: with ``keep=1``,
    stop an item once the predictive chances that some live rival ends the whole plan ahead of its
    current leader sum to at most ``settled``, and drop, while three or more are live, the rivals that all
    but surely do not win, within the same per-item ``settled`` (0: neither; :func:`settled_item`,
    :func:`settled_drops`); None (the default): the same as ``alpha``, one risk level for both (an
    ``alpha`` of 0.5 or more then needs ``settled`` given). Defaults chosen on the benchmarks in
    bench/RESULTS.md."""

    alpha: float = 0.05
    min_timesteps: int = 5
    round_size: int = 3
    keep: int = 1
    futility: float = 0.0
    over: str = "texts"
    against: str = "strongest"
    settled: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"adaptive alpha must be a number in [0, 1), got {self.alpha!r}")
        if self.settled is None:  # one risk level: resolved here, so options compare and print as they act
            if self.alpha >= 0.5:
                raise ValueError(f"adaptive settled follows alpha, and must be below 0.5 (alpha is {self.alpha}): "
                                 "give settled too, e.g. settled=0.05, or settled=0 for no settled stop")
            object.__setattr__(self, "settled", float(self.alpha))
        for name in ("min_timesteps", "round_size", "keep"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"adaptive {name} must be a positive int, got {v!r}")
        if isinstance(self.futility, bool) or not isinstance(self.futility, (int, float)) or \
                not 0.0 <= self.futility <= 1.0:
            raise ValueError(f"adaptive futility must be a number in [0, 1], got {self.futility!r}")
        if self.over not in ("texts", "images"):
            raise ValueError(f"adaptive over must be 'texts' or 'images', got {self.over!r}")
        if self.against not in AGAINST:
            raise ValueError(f"adaptive against must be one of {AGAINST}, got {self.against!r}")
        if isinstance(self.settled, bool) or not isinstance(self.settled, (int, float)) or \
                not 0.0 <= self.settled < 0.5:
            raise ValueError(f"adaptive settled must be a probability in [0, 0.5), got {self.settled!r}")
        if self.min_timesteps < 2:
            raise ValueError(f"adaptive min_timesteps must be at least 2 (a paired t-test needs two samples), "
                             f"got {self.min_timesteps}")

    @classmethod
    def parse(cls, adaptive: bool | dict | RaceOptions | None) -> RaceOptions | None:
        """``adaptive=`` as users give it: False/None (off), True (defaults), a dict of options."""
        if adaptive is None or adaptive is False:
            return None
        if adaptive is True:
            return cls()
        if isinstance(adaptive, RaceOptions):
            return adaptive
        if not isinstance(adaptive, dict):
            raise TypeError(f"adaptive must be True, False or a dict of {list(ADAPTIVE_KEYS)}, got "
                            f"{type(adaptive).__name__}")
        unknown = sorted(set(adaptive) - set(ADAPTIVE_KEYS))
        if unknown:
            raise ValueError(f"unknown adaptive option(s) {unknown}; choose from {list(ADAPTIVE_KEYS)}")
        return cls(**adaptive)

    def looks(self, T: int) -> list[int]:
        """The numbers of timesteps after which the plan tests: ``min_timesteps`` and every
        ``round_size`` after it, while timesteps are left to save."""
        return list(range(self.min_timesteps, T, self.round_size))

    def level(self, T: int, K: int) -> float:
        """The level of each test: ``alpha / (looks * (K - 1))`` (Bonferroni over looks and rivals)."""
        return self.alpha / max(1, len(self.looks(T)) * (K - 1))


def check_not_with_elimination(race: RaceOptions | None, elimination) -> None:
    """Racing and the Diffusion Classifier's elimination schedule both choose which candidates to
    drop: refuse the two together (``fastitm.score`` and ``fastitm eval`` alike)."""
    if race is not None and elimination:
        raise ValueError("adaptive= and elimination= both choose which candidates to drop; give one of them "
                         "(adaptive racing decides per item by a paired test, elimination by a fixed schedule)")


def _t_scale(w: torch.Tensor | None, n: int) -> tuple[float, float]:
    """(sqrt(sum w^2) / sum w, degrees of freedom) of a weighted mean of n samples: the factor from the
    samples' standard deviation to the mean's standard error, and the Kish effective size minus 1
    ((sum w)^2 / sum w^2 - 1). Uniform weights: (1 / sqrt(n), n - 1), the plain t-test's."""
    if w is None:
        return 1.0 / n**0.5, float(n - 1)
    v1, v2 = float(w.sum()), float((w * w).sum())
    return v2**0.5 / v1, v1 * v1 / v2 - 1.0


def _wsd(d: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """[C, n] -> [C]: the samples' standard deviation (unbiased; with weights, the reliability-weights
    estimate sum w (d - m)^2 / (sum w - sum w^2 / sum w))."""
    if w is None:
        return d.std(dim=1, unbiased=True)
    v1, v2 = w.sum(), (w * w).sum()
    m = (d * w).sum(dim=1, keepdim=True) / v1
    denom = v1 - v2 / v1
    if not denom > 0:  # one timestep carries all the weight: no spread to estimate
        return torch.zeros(d.shape[0], dtype=d.dtype)
    return ((w * (d - m) ** 2).sum(dim=1) / denom).sqrt()


def paired_pvalues(diffs: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """One-sided paired t-test p-values that each row's mean difference is above 0.

    ``diffs``: [C, n] (n >= 2) per-timestep differences best - candidate; ``w`` [n]: timestep
    weights (the mean, its standard error and the degrees of freedom of a weighted mean,
    :func:`_t_scale`; None: the plain t-test). A row of identical differences has no spread: p = 0
    when they are positive, 1 otherwise (an exact tie: never); weights concentrated on one timestep
    leave nothing to test (p = 1)."""
    from scipy.stats import t as student_t

    d = diffs.double()
    n = d.shape[1]
    w = None if w is None else w.double()
    mean = weighted_mean(d, w)
    sd = _wsd(d, w)
    factor, dof = _t_scale(w, n)
    p = torch.ones_like(mean)
    if dof <= 0:
        return p
    spread = sd > 0
    tstat = mean[spread] / (sd[spread] * factor)
    p[spread] = torch.from_numpy(student_t.sf(tstat.numpy(), dof)).to(p)
    p[~spread & (mean > 0)] = 0.0
    return p


def standardized(scores: torch.Tensor, computed: torch.Tensor) -> torch.Tensor | None:
    """``scores`` [K, n] divided by each timestep's spread: the standard deviation over the candidates
    scored at that timestep (``computed`` [K, n] bool). None when a timestep has fewer than
    ``MIN_SPREAD`` candidates scored (the spread of a few is too tied to the differences it would
    scale). A timestep where every candidate scored the same contributes 0."""
    counts = computed.sum(dim=0)
    if int(counts.min()) < MIN_SPREAD:
        return None
    s = scores.double()
    w = computed.double()
    mean = (s * w).sum(dim=0) / counts
    sd = ((((s - mean) ** 2) * w).sum(dim=0) / (counts - 1)).sqrt()
    return torch.where(sd > 0, s / sd.clamp_min(1e-300), torch.zeros_like(s))


# Candidates scored at every timestep so far for the differences to be standardized (see the module).
MIN_SPREAD = 5


def step(scores: torch.Tensor, live: torch.Tensor, T: int, opts: RaceOptions,
         computed: torch.Tensor | None = None, w: torch.Tensor | None = None) -> torch.Tensor:
    """One decision between rounds: ``scores`` [K, n] are the per-timestep scores of the n timesteps
    evaluated so far (in evaluation order; rows of dropped candidates are ignored), ``live`` [K] bool,
    ``computed`` [K, n] which scores exist (default: all; a dropped candidate has none after its drop),
    ``w`` [n] the timestep weights of those timesteps (:mod:`fastitm.core.weights`; None: uniform): the
    leader, the tests and the ranking use the weighted means. Returns the new ``live``. Never leaves
    fewer than ``opts.keep`` (nor 1) candidates: when the test would, the ``keep`` best by mean stay."""
    K, n = scores.shape
    live = live.clone()
    if n < opts.min_timesteps or int(live.sum()) <= opts.keep or opts.alpha == 0.0:
        return live
    if w is not None and not float(w.sum()) > 0:  # the weights keep none of these timesteps yet
        return live
    means = weighted_mean(scores.double(), w)
    idx = live.nonzero().flatten()
    best = idx[torch.argmax(means[idx])]  # the first of equal means: deterministic
    rivals = idx[idx != best]
    z = standardized(scores, computed if computed is not None else torch.ones(K, n, dtype=torch.bool))
    base = z if z is not None else scores.double()
    if opts.against == "leader":
        p = paired_pvalues(base[best][None, :] - base[rivals], w)
    else:  # each rival against each of the strongest live candidates; the clearest win decides
        p = _clearest(base, _by_mean(idx, means)[:COMPARATORS], rivals, lambda d: paired_pvalues(d, w))
    drop = rivals[p < opts.level(T, K)]
    if int(live.sum()) - len(drop) < opts.keep:  # keep the `keep` best by mean among the live
        drop = _by_mean(idx, means)[opts.keep :]
    live[drop] = False
    return live


def _by_mean(idx: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """The candidates ``idx`` ordered by ``means`` [K], highest first (ties: the lower index first)."""
    return idx[torch.sort(-means[idx], stable=True).indices]


def _clearest(base: torch.Tensor, top: torch.Tensor, rivals: torch.Tensor, stat) -> torch.Tensor:
    """Each rival against each of the candidates ``top`` (never itself): ``stat`` of the per-timestep
    differences comparator - rival ([pairs, n] -> [pairs], smaller is clearer) and the smallest over
    the comparators, [rivals]. ``base`` [K, n]: the scores the differences are taken of."""
    n = base.shape[1]
    d = base[top][:, None, :] - base[rivals][None, :, :]  # [comparators, rivals, n]
    v = stat(d.reshape(-1, n)).reshape(len(top), len(rivals))
    v[top[:, None] == rivals[None, :]] = 1.0  # a candidate is not compared with itself
    return v.min(dim=0).values


def _leader_diffs(scores: torch.Tensor, live: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """[R, n] the per-timestep differences of the live leader (the highest (weighted) mean) over each
    live rival, from ``scores`` [K, n]."""
    idx = live.nonzero().flatten()
    best = idx[torch.argmax(weighted_mean(scores.double(), w)[idx])]
    return scores[best][None, :].double() - scores[idx[idx != best]].double()


def _leader_gaps(scores: torch.Tensor, live: torch.Tensor, w: torch.Tensor | None = None):
    """The live leader's (weighted) mean difference over each live rival and the differences' spread,
    ``mean`` [R] and ``sd`` [R] (what futility judges), from ``scores`` [K, n]."""
    d = _leader_diffs(scores, live, w)
    return weighted_mean(d, w), _wsd(d, w)


def _chance_ahead(d: torch.Tensor, T: int) -> torch.Tensor:
    """[R, n] per-timestep differences ``d`` = a - r of n timesteps seen -> [R] the predictive probability
    that r's mean over the whole plan (T timesteps) ends above a's, the T - n to come drawn like those
    seen: the full plan's mean difference is predicted normal around the mean m with variance
    s^2 (T - n) / (n T), so a stays ahead with the t distribution's probability (n - 1 degrees of freedom)
    at t_n sqrt(T / (T - n)), t_n = m sqrt(n) / s. No spread: 0 when every difference is positive, else 1."""
    from scipy.stats import t as student_t

    n = d.shape[1]
    d = d.double()
    m, sd = d.mean(dim=1), d.std(dim=1, unbiased=True)
    spread = sd > 0
    z = torch.where(spread, m * n**0.5 / sd.clamp_min(1e-300) * (T / (T - n)) ** 0.5, torch.zeros_like(m))
    stay = torch.from_numpy(student_t.cdf(z.numpy(), n - 1))
    stay = torch.where(spread, stay, (m > 0).double())  # no spread: the same difference at every timestep
    return 1.0 - stay


def _may_settle(opts: RaceOptions, n: int, T: int) -> bool:
    """Whether the settled stop and drops may act after n of the plan's T timesteps: ``settled`` > 0,
    ``keep=1``, racing on (alpha 0: the full plan), from ``min_timesteps`` on and before the plan's end."""
    return opts.settled > 0.0 and opts.alpha > 0.0 and opts.keep == 1 and opts.min_timesteps <= n < T


def settled_item(scores: torch.Tensor, live: torch.Tensor, T: int, opts: RaceOptions, spent: float = 0.0) -> bool:
    """Whether the whole plan's choice is all but decided (``opts.settled`` = epsilon > 0, ``keep=1``):
    the predictive probabilities that some live rival r of the leader b ends the whole plan (all T
    timesteps) above b (:func:`_chance_ahead`) sum to at most epsilon - ``spent`` (what this item's
    settled drops already risked, :func:`settled_drops`). Stopping then changes the full plan's choice
    with probability at most epsilon per item (a union bound over the rivals: with 172 classes still
    live after 10 timesteps, each 96% likely to stay behind, the item is far from settled, although
    each rival alone would pass a per-rival 95%). This keeps the full plan's answers; it does not
    certify the truth (the drop tests do). Uniform weights only."""
    if not _may_settle(opts, scores.shape[1], T) or int(live.sum()) <= 1:
        return False
    return bool(_chance_ahead(_leader_diffs(scores, live), T).sum() + spent <= opts.settled)


# The share of ``settled`` an item's settled drops may risk (the stop keeps the rest, and all of it where
# nothing was dropped so: a 2-way item's stop is unchanged). Chosen on the tuning sets (bench/RESULTS.md).
DROP_SHARE = 0.2


def settled_drops(scores: torch.Tensor, live: torch.Tensor, T: int, opts: RaceOptions,
                  spent: float = 0.0) -> tuple[torch.Tensor, float]:
    """Drop the live rivals that all but surely do not win the whole plan (``keep=1``, ``settled`` > 0,
    at least two live rivals: with one, this is the settled stop's question). A rival r is the whole
    plan's choice only if it ends ahead of every other candidate, so its chance of that is at most its
    predictive chance (:func:`_chance_ahead`) of ending ahead of the live candidate that beats it most
    clearly, among the :data:`COMPARATORS` strongest. r is dropped when that chance is at most
    ``settled * DROP_SHARE / (K - 1)``; each drop adds its chance to ``spent``, which the settled stop
    (:func:`settled_item`) counts against the same per-item ``settled``: drops and stop together change
    the full plan's choice with probability at most ``settled`` per item. Where the drop tests
    (:func:`step`) certify the truth against a rival, this keeps the full plan's answers while the
    clearly wrong rivals of a many-candidate item leave sooner. ``scores`` [K, n] the n timesteps seen
    (every live candidate scored at each); returns the new ``live`` and ``spent``. Uniform weights only."""
    K, n = scores.shape
    live = live.clone()
    if not _may_settle(opts, n, T) or DROP_SHARE == 0.0 or int(live.sum()) < 3:
        return live, spent
    order = _by_mean(live.nonzero().flatten(), scores.double().mean(dim=1))
    rivals = order[1:]
    chance = _clearest(scores.double(), order[:COMPARATORS], rivals, lambda d: _chance_ahead(d, T))
    cap = opts.settled * DROP_SHARE / (K - 1)
    for k in torch.sort(chance, stable=True).indices.tolist():  # the surest first
        if float(chance[k]) > cap or int(live.sum()) <= 2:
            break  # the last rival is the settled stop's to judge
        live[rivals[k]] = False
        spent += float(chance[k])
    return live, spent


def stops_early(scores: torch.Tensor, live: torch.Tensor, T: int, opts: RaceOptions, w: torch.Tensor | None = None,
                w_plan: torch.Tensor | None = None, spent: float = 0.0) -> bool:
    """Whether a race still running stops after this look: its answer is settled (:func:`settled_item`,
    uniform weights, ``spent`` by its settled drops) or it is futile (:func:`futile`). Arguments as
    :func:`futile`'s."""
    return (w is None and w_plan is None and settled_item(scores, live, T, opts, spent)) or \
        futile(scores, live, T, opts, w, w_plan)


def look(scores: torch.Tensor, live: torch.Tensor, T: int, opts: RaceOptions, computed: torch.Tensor | None = None,
         w: torch.Tensor | None = None, w_plan: torch.Tensor | None = None,
         spent: float = 0.0) -> tuple[torch.Tensor, float, bool]:
    """Everything racing decides after one round, for the engine and :func:`simulate` alike: the drop test
    (:func:`step`), the settled drops (:func:`settled_drops`, uniform weights only), then whether the race
    stops (``keep`` left, settled or futile: :func:`stops_early`; a race of no more than ``keep``
    candidates has nothing to decide and never stops). Arguments as :func:`step`'s and :func:`futile`'s;
    ``spent``: what the race's settled drops risked so far. Returns the new ``live``, ``spent`` and
    whether the race stops."""
    live = step(scores, live, T, opts, computed, w)
    if w is None and w_plan is None:
        live, spent = settled_drops(scores, live, T, opts, spent)
    stop = scores.shape[0] > opts.keep and \
        (int(live.sum()) <= opts.keep or stops_early(scores, live, T, opts, w, w_plan, spent))
    return live, spent, stop


def futile(scores: torch.Tensor, live: torch.Tensor, T: int, opts: RaceOptions, w: torch.Tensor | None = None,
           w_plan: torch.Tensor | None = None) -> bool:
    """Whether the item should stop for futility (module docstring): ``scores`` [K, n] of the n
    timesteps evaluated so far, ``live`` [K] after this look's drops; ``w`` [n] their weights and
    ``w_plan`` [T] the whole plan's (None: uniform)."""
    from scipy.stats import t as student_t

    K, n = scores.shape
    if opts.futility == 0.0 or opts.alpha == 0.0 or n < 2 * opts.min_timesteps or n >= T:
        return False
    if int(live.sum()) <= opts.keep:
        return False  # already decided
    w = None if w is None else w.double()
    if w is not None and not float(w.sum()) > 0:
        return False
    mean, sd = _leader_gaps(scores, live, w)
    # The t statistic the whole plan would reach at this mean difference and spread (an exact tie: 0).
    factor, dof = _t_scale(None if w_plan is None else w_plan.double(), T)
    if dof <= 0:
        return False
    projected = torch.where(sd > 0, mean / (sd * factor), torch.where(mean > 0, float("inf"), 0.0))
    critical = float(student_t.isf(opts.level(T, K), dof))
    return bool((projected < opts.futility * critical).all())


@dataclass
class Race:
    """The outcome of racing one item: ``live`` [K] survivors; ``timesteps`` [K] how many timesteps
    each candidate was scored at; ``means`` [K] each candidate's mean over those; ``stopped`` the
    number of timesteps the item ran (``T``: the plan's end); ``choice`` the best survivor."""

    live: torch.Tensor
    timesteps: torch.Tensor
    means: torch.Tensor
    stopped: int
    choice: int

    @property
    def rows(self) -> int:
        """Conditional denoiser rows spent on the item (candidate x timestep)."""
        return int(self.timesteps.sum())


def simulate(per_t: torch.Tensor, opts: RaceOptions, order: list[int] | None = None,
             w: torch.Tensor | None = None) -> Race:
    """Race one item on per-timestep scores already computed: ``per_t`` [K, T] in plan order
    (``order``: the evaluation order of the plan's indices, by default the spread order; ``w`` [T]
    the timestep weights in plan order, None for uniform). What racing would have decided and spent;
    the engine's racing takes the same decisions (:func:`look`) on the rows it computes."""

    K, T = per_t.shape
    order = spread_order(T) if order is None else list(order)
    if sorted(order) != list(range(T)):
        raise ValueError(f"order must be a permutation of the plan's {T} timestep indices")
    scores = per_t[:, order]
    wo = None if w is None else w.double()[order]
    live = torch.ones(K, dtype=torch.bool)
    used = torch.zeros(K, dtype=torch.long)
    n, spent = 0, 0.0
    for stop in opts.looks(T) + [T]:
        used[live] += stop - n
        n = stop
        if n == T:
            break
        computed = torch.arange(n)[None, :] < used[:, None]  # as the engine computes: none after a drop
        seen_w = None if wo is None else wo[:n]
        live, spent, stop_now = look(scores[:, :n], live, T, opts, computed, seen_w, wo, spent)
        if stop_now:
            break
    means = torch.stack([weighted_mean(scores[k, : used[k]].double(), None if wo is None else wo[: used[k]])
                         for k in range(K)])
    cand = live.nonzero().flatten()
    choice = int(cand[torch.argmax(means[cand])])
    return Race(live=live, timesteps=used, means=means, stopped=n, choice=choice)
