"""Racing's rules on several sets, tuned on some seeds and reported on others (issue 36).

    python bench/racing_sets_bench.py [--images 40] [--timesteps 50] [--out racing-sets] [--json out.json]
        [--scores FILE] [--wall ROUNDS [--wall-only] [--wall-sets ...] [--no-empty-row]]
        [--held-out-seed 23 [--held-out-only]]

The embedded model (DiffusionITM, the full plan of ``--timesteps``) scores held-out synthetic images
(:func:`fastitm.data.make_dataset`) once per set, and racing is replayed on those per-timestep scores
(:func:`fastitm.engine.racing.simulate`, the decisions the engine takes on the rows it computes):

- ``2-way``: each image against its caption and one hard negative, one item per negative kind;
- ``3/6-way``: each image against its caption and all its hard negatives (2 for one-object scenes,
  5 for two-object scenes);
- ``24-class``: zero-shot classification of one-object images over the 24 colour x shape captions,
  with the Diffusion Classifier (the many-candidate case).

Each set is drawn twice: with the tuning seed (where a default may be chosen) and with a held-out seed
(where it is reported). For each rule (``against``: leader, strongest) and level (``alpha``, with and
without futility) it reports the conditional denoiser rows against the full plan's (and, with
DiffusionITM, all rows: the empty prompt's one per item and timestep run), accuracy, and how
many of the items whose full-plan choice is significant (a paired t-test of the choice against each
other candidate over every timestep, p < 0.01 against all) keep it. ``accuracy_vs_rows.png``: racing's
points, and racing's defaults over alpha (``settled`` follows it) and the plan's length (plans of the
first n of the spread order, the fixed curve's plans), beside the fixed plan's curve over its number of
timesteps, per set, and each curve as the best it reaches within the rows (dashed). The JSON's
``curve_against_fixed`` reads issue 36's criterion on those curves: racing over alpha
(:data:`CURVE_ALPHAS`) and every plan length (1..T) against the fixed plan over T, each the best it
reaches within each fixed plan's rows (``curve_against_fixed_by_alpha``: each alpha's curve alone, and
how many of its plans' choices it kept);
``against_fixed_plan`` compares each racing point on its own with the fixed plan given the same rows (the
longest fixed plan that spends no more) and counts the points below it; ``settled_changes`` counts how often
the defaults' settled stop ended an item on another choice than its plan's, over the plan lengths
(the races replayed for the curve, not run again).
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch
from benchutil import emit, machine

SEEDS = {"tune": 7, "held-out": 23}
KINDS = ("2-way", "3/6-way", "24-class")
# --wall-sets may also time the 3/6-way set's items of one size alone (the replay splits them already)
SPLITS = {"3-way": 3, "6-way": 6}
GRID = [(against, alpha, fut, 0.0) for against in ("leader", "strongest") for alpha in (0.01, 0.05, 0.2)
        for fut in (0.0, 0.5)] + [("strongest", alpha, 0.0, eps) for alpha in (0.01, 0.05, 0.2) for eps in (0.01, 0.05)]


def items_of(examples, kind: str):
    """[(image, [texts], truth 0)] for a set."""
    out = []
    for e in examples:
        negs = list(e.negatives.values())
        if kind == "2-way":
            out += [(e.image, [e.caption, n]) for n in negs]
        else:
            out.append((e.image, [e.caption, *negs]))
    return out


def pack(items):
    """(images, texts, spans, pairs): every item's image against its own candidates in one call."""
    images, texts, spans = [], [], []
    for image, cands in items:
        images.append(image)
        spans.append((len(texts), len(texts) + len(cands)))
        texts += cands
    pairs = torch.zeros(len(images), len(texts), dtype=torch.bool)
    for i, (a, b) in enumerate(spans):
        pairs[i, a:b] = True
    return images, texts, spans, pairs


def full_plan(model, items, T):
    import fastitm

    images, texts, spans, pairs = pack(items)
    plan = fastitm.make_plan(model, T, seed=0)
    t0 = time.perf_counter()
    res = fastitm.score(images, texts, model=model, plan=plan, pairs=pairs, progress=False)
    return [res.per_timestep[i, a:b].double() for i, (a, b) in enumerate(spans)], time.perf_counter() - t0, res


def class_items(model, data, seed: int, n: int):
    """The 24-class set: (images, the 24 captions "a big <colour> <shape>", true class indices) of n
    one-object held-out images."""
    labels = [(c, sh) for c in data.COLORS for sh in data.SHAPES]
    texts = [data.Scene((data.Obj(c, sh, "big"),)).caption for c, sh in labels]
    ex = [e for e in data.make_dataset(8 * n, "heldout", seed=seed, size=model.resolution, two_object_share=0.0)
          if e.scene.objects[0].size == "big"][:n]
    truth = [labels.index((e.scene.objects[0].color, e.scene.objects[0].shape)) for e in ex]
    return [e.image for e in ex], texts, truth


def classification(model, data, seed: int, n: int, T: int):
    """24-way zero-shot classification (6 colours x 4 shapes) of one-object held-out images with the
    Diffusion Classifier: per image its [24, T] scores with the true class first, the wall time, the run."""
    import fastitm

    images, texts, truth = class_items(model, data, seed, n)
    plan = fastitm.make_plan(model, T, seed=0)
    t0 = time.perf_counter()
    res = fastitm.score(images, texts, model=model, method="diffusion_classifier", plan=plan, progress=False)
    wall = time.perf_counter() - t0
    scores = []
    for i, k in enumerate(truth):
        perm = [k] + [j for j in range(len(texts)) if j != k]
        scores.append(res.per_timestep[i, perm].double())
    return scores, wall, res


def significant(per_t: torch.Tensor) -> bool:
    """Whether the full plan's choice beats every other candidate by a paired t-test over the plan's
    timesteps (p < 0.01 against each). Against each, not only the runner-up by mean: a third candidate
    can trail the choice by less than the runner-up's noise (an item of seed 7 chose 0.7149 over
    0.7135, p < 0.01, and over 0.7129, p = 0.87)."""
    from scipy.stats import ttest_1samp

    best = int(per_t.mean(dim=1).argmax())
    for k in range(per_t.shape[0]):
        if k == best:
            continue
        d = (per_t[best] - per_t[k]).numpy()
        if not (d.std() > 0 and ttest_1samp(d, 0.0).pvalue < 0.01):
            return False
    return True


def replay(scores: list[torch.Tensor], opts) -> dict:
    from fastitm.engine.racing import simulate

    rows = right = 0
    choices, races = [], []
    for s in scores:
        race = simulate(s, opts)
        rows += race.rows
        right += race.choice == 0
        choices.append(race.choice)
        races.append(race)
    # the empty prompt's rows (DiffusionITM): one per timestep an item ran, whatever its candidates
    return {"rows": rows, "right": right, "choices": choices, "races": races,
            "empty_prompt_rows": sum(r.stopped for r in races)}


def by_candidates(scores: list[torch.Tensor], r: dict, full_choice: list[int], sig: list[bool],
                  empty: bool) -> dict:
    """The defaults' replay ``r`` split by the items' number of candidates (the 3/6-way set's 3-way and
    6-way items; ``full_choice`` and ``sig``: each item's full-plan choice and whether it is
    significant): items, rows against the full plan's (conditional; with ``empty``, also all rows, the
    empty prompt's one per item and timestep run), accuracy of both, significant choices kept, same
    choice."""
    out = {}
    for k in sorted({s.shape[0] for s in scores}):
        ix = [i for i, s in enumerate(scores) if s.shape[0] == k]
        T = scores[ix[0]].shape[1]
        races = [r["races"][i] for i in ix]
        full = [full_choice[i] for i in ix]
        rows = sum(x.rows for x in races)
        same = [x.choice == f for x, f in zip(races, full, strict=True)]
        kept = sum(s for s, i in zip(same, ix, strict=True) if sig[i])
        entry = {"items": len(ix), "rows_vs_full": round(len(ix) * k * T / rows, 3)}
        if empty:  # the full plan's rows with one empty prompt's per item and timestep
            sub = {"rows": rows, "empty_prompt_rows": sum(x.stopped for x in races)}
            entry.update(all_rows(sub, len(ix) * (k + 1) * T, len(ix) * k * T))
        entry.update({"accuracy_full": round(sum(c == 0 for c in full) / len(ix), 4),
                      "accuracy": round(sum(x.choice == 0 for x in races) / len(ix), 4),
                      "significant_kept": f"{kept}/{sum(sig[i] for i in ix)}",
                      "same_choice_as_full": f"{sum(same)}/{len(ix)}"})
        out[str(k)] = entry
    return out


def all_rows(r: dict, unet_rows: int, full_rows: int) -> dict:
    """The full plan's denoiser rows (the empty prompt's included) over racing's, where the method has an
    empty prompt's row (DiffusionITM; the Diffusion Classifier's full plan spends only ``full_rows``)."""
    if unet_rows == full_rows:
        return {}
    return {"rows_with_empty_prompt_vs_full": round(unet_rows / (r["rows"] + r["empty_prompt_rows"]), 3)}


def fixed_curve(scores: list[torch.Tensor], T: int) -> list[tuple[int, float, list[bool]]]:
    """(conditional rows, accuracy, whether each item is right) of the fixed plan with its first n
    timesteps of the spread order, for n = 1..T."""
    from fastitm.core.methods import spread_order

    order = spread_order(T)
    out = []
    for n in range(1, T + 1):
        ks = order[:n]
        right = [int(s[:, ks].mean(dim=1).argmax()) == 0 for s in scores]
        out.append((sum(s.shape[0] * n for s in scores), sum(right) / len(scores), right))
    return out


PLAN_LENGTHS = (5, 10, 20, 30, 40)  # racing's defaults on shorter plans: the first n of the spread order
# racing's curve over alpha (``settled`` follows it) and the plan's length; 0.001 all but keeps each plan's answers
CURVE_ALPHAS = (0.001, 0.01, 0.05, 0.2)


def sub_plan(per_t: torch.Tensor, n: int) -> torch.Tensor:
    """The per-timestep scores of the plan made of the first ``n`` timesteps of the spread order (the
    fixed curve's plan of n), in plan order."""
    from fastitm.core.methods import spread_order

    return per_t[:, sorted(spread_order(per_t.shape[1])[:n])]


def settled_changes(runs: list[tuple[list[torch.Tensor], list]]) -> dict:
    """How the defaults' stops kept each plan's choice, from ``runs``: (each item's per-timestep scores
    on one plan, the defaults' races replayed on them), one per plan length. Items stopped settled
    (before the plan's end, more than one candidate live), how many of those ended on another choice
    than their plan's (the settled stop's stated risk: at most ``settled`` per item) and which way (to
    the truth, candidate 0, or away from it), and how many plans' choices a drop test removed."""
    out = {"stopped_settled": 0, "changed": 0, "to_truth": 0, "from_truth": 0, "plan_choice_dropped": 0}
    for plan_scores, races in runs:
        for sub, r in zip(plan_scores, races, strict=True):
            n = sub.shape[1]
            full = int(sub.mean(dim=1).argmax())
            settled = r.stopped < n and int(r.live.sum()) > 1
            out["stopped_settled"] += settled
            if r.choice != full:
                if not r.live[full]:
                    out["plan_choice_dropped"] += 1
                elif settled:
                    out["changed"] += 1
                    out["to_truth"] += r.choice == 0
                    out["from_truth"] += full == 0
    return out


def mcnemar_below(racing_right: list[bool], fixed_right: list[bool]) -> tuple[int, int, float]:
    """The items racing alone and the fixed plan alone get right, and McNemar's exact one-sided p-value
    that racing is the worse of the two on such items (small only where a gap is more than the items'
    noise; 1 where the fixed plan alone gets none right: nothing says racing is worse)."""
    from scipy.stats import binomtest

    only_racing = sum(a and not b for a, b in zip(racing_right, fixed_right, strict=True))
    only_fixed = sum(b and not a for a, b in zip(racing_right, fixed_right, strict=True))
    if not only_fixed:
        return only_racing, only_fixed, 1.0
    return only_racing, only_fixed, binomtest(only_fixed, only_racing + only_fixed, 0.5, alternative="greater").pvalue


def against_fixed(points, fixed, choices) -> list[dict]:
    """Each racing point (rows, accuracy) against the fixed plan given the same rows (``fixed``:
    :func:`fixed_curve`): the longest fixed plan whose rows are at most racing's (the shortest when
    racing spent fewer). ``gap`` < 0: below. With ``choices`` (each point's choice per item), also the
    items each side gets right alone and McNemar's exact one-sided p-value that racing is the worse of
    the two on such items (``p_below``: :func:`mcnemar_below`)."""
    out = []
    for (label, alpha, fut, rows, acc), chosen in zip(points, choices, strict=True):
        n = sum(r <= rows for r, _, _ in fixed) or 1  # the fixed plan's number of timesteps at these rows
        _, fixed_acc, fixed_right = fixed[n - 1]
        only_racing, only_fixed, p_below = mcnemar_below([c == 0 for c in chosen], fixed_right)
        out.append({"rule": label, "alpha": alpha, "futility": fut, "rows": rows, "accuracy": round(acc, 4),
                    "fixed_timesteps": n, "fixed_accuracy_at_rows": round(fixed_acc, 4),
                    "gap": round(acc - fixed_acc, 4), "only_racing_right": only_racing,
                    "only_fixed_right": only_fixed, "p_below": round(p_below, 4)})
    return out


def curve_against_fixed(racing, fixed) -> dict:
    """Racing's curve against the fixed plan's, each read as the best its own knobs reach within a
    budget of rows: at each fixed plan's rows (the first n timesteps of the spread order, n = 1..T), the
    best accuracy of racing among its points that spend no more (``racing``: (its knobs, rows, accuracy,
    choices); the defaults over every plan length 1..T, or those over alpha as well, issue 36's curve),
    against the best fixed plan of at most n timesteps. ``gap`` < 0: racing's curve is below the fixed
    curve there. The fixed plan's noise (its accuracy can fall with more timesteps) is read the same way
    on both sides. With the worst point, the items each side's plan gets right alone and McNemar's exact
    one-sided p that racing's is the worse (:func:`mcnemar_below`)."""
    points, best_fixed = [], None
    for n, (rows, acc, right) in enumerate(fixed, start=1):
        if best_fixed is None or acc > best_fixed[1]:
            best_fixed = (n, acc, right)
        affordable = [p for p in racing if p[1] <= rows]
        plan, r_rows, r_acc, r_choices = max(affordable, key=lambda p: (p[2], -p[1]))
        points.append({"fixed_timesteps": n, "rows": rows, "fixed_best_plan": best_fixed[0],
                       "fixed_accuracy": round(best_fixed[1], 4), "racing_plan": plan, "racing_rows": r_rows,
                       "racing_accuracy": round(r_acc, 4), "gap": round(r_acc - best_fixed[1], 4),
                       "_right": ([c == 0 for c in r_choices], best_fixed[2])})
    worst = min(points, key=lambda p: p["gap"])
    only_racing, only_fixed, p_below = mcnemar_below(*worst["_right"])
    for p in points:
        del p["_right"]
    return {"points": len(points), "below": sum(p["gap"] < 0 for p in points),
            "worst_gap": worst["gap"], "worst_at_fixed_timesteps": worst["fixed_timesteps"],
            "worst_only_racing_right": only_racing, "worst_only_fixed_right": only_fixed,
            "worst_p_below": round(p_below, 4), "detail": points}


def plan_choices_kept(plans: dict, runs: dict) -> str:
    """"kept/total": over every plan length n, the items whose race on the plan of n (``runs[n]``, a
    :func:`replay`) ends on that plan's own choice (``plans[n]``: the items' scores on it). A race ends
    elsewhere only when a drop removed that choice or it stopped early with others live (at the plan's
    end the live candidates' full means rank it first), which :func:`settled_changes` counts."""
    counts = settled_changes([(subs, runs[n]["races"]) for n, subs in plans.items()])
    total = sum(len(subs) for subs in plans.values())
    return f"{total - counts['plan_choice_dropped'] - counts['changed']}/{total}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--timesteps", type=int, default=50)
    p.add_argument("--out", default="racing-sets")
    p.add_argument("--json", default=None)
    p.add_argument("--scores", default=None, help="a file of the full plans' per-timestep scores: read when it "
                   "exists (the replay alone, no scoring), else written")
    p.add_argument("--wall", type=int, default=0, metavar="ROUNDS",
                   help="also time the engine on the held-out sets: the full plan against racing with its defaults, "
                        "alternating, ROUNDS rounds (medians)")
    p.add_argument("--wall-only", action="store_true", help="only the engine timings of --wall (no replay)")
    p.add_argument("--held-out-seed", type=int, default=SEEDS["held-out"],
                   help="the held-out draw's seed (23; another, e.g. 41, draws sets that no choice of the defaults saw)")
    p.add_argument("--held-out-only", action="store_true", help="score and replay the held-out sets alone")
    p.add_argument("--no-empty-row", action="store_true",
                   help="--wall's DiffusionITM arms without the empty prompt's row (normalize=False), as `fastitm "
                        "eval` runs items that choose among one image's texts: the same choices, fewer rows")
    p.add_argument("--wall-sets", default=",".join(KINDS), help="which held-out sets --wall times "
                   f"(comma-separated; also {', '.join(SPLITS)}: the 3/6-way set's items of that size alone)")
    args = p.parse_args(argv)
    args.wall_sets = [k.strip() for k in args.wall_sets.split(",")]
    unknown = sorted(set(args.wall_sets) - set(KINDS) - set(SPLITS))
    if unknown:  # before the model loads and the replay runs, not after
        p.error(f"--wall-sets: unknown set(s) {unknown}; choose from {', '.join(KINDS + tuple(SPLITS))}")
    if args.wall_only and args.wall < 1:
        p.error("--wall-only times the engine: give the number of rounds with --wall ROUNDS (1 or more)")
    if args.held_out_seed == SEEDS["tune"]:
        p.error(f"--held-out-seed: {SEEDS['tune']} is the tuning seed")
    args.seeds = {"held-out": args.held_out_seed} if args.held_out_only else \
        {**SEEDS, "held-out": args.held_out_seed}

    import fastitm
    from fastitm import data
    from fastitm.engine.racing import RaceOptions

    model = fastitm.load_model()
    T = args.timesteps
    out = {"machine": machine(), "model": model.source, "timesteps": T,
           "method": "diffusion_itm (24-class: diffusion_classifier)", "sets": {}}
    curves = {}
    saved = torch.load(args.scores) if args.scores and Path(args.scores).is_file() else {}
    if args.wall_only:
        out["wall"] = wall_times(model, data, args, T)
        emit(out, args.json)
        return 0
    for role, seed in args.seeds.items():
        examples = data.make_dataset(args.images, "heldout", seed=seed, size=model.resolution)
        for kind in KINDS:
            key = f"{kind}/{seed}/{args.images}/{T}"
            if key not in saved:
                if kind == "24-class":
                    scores, wall, res = classification(model, data, seed, args.images, T)
                else:
                    scores, wall, res = full_plan(model, items_of(examples, kind), T)
                saved[key] = (scores, wall, res.stats["unet_rows"])
            scores, wall, unet_rows = saved[key]
            items = scores
            out["timesteps"] = scores[0].shape[1]  # the plan's grid may hold fewer than asked (50 -> 49)
            full_rows = sum(s.shape[0] * s.shape[1] for s in scores)
            full_choice = [int(s.mean(dim=1).argmax()) for s in scores]
            sig = [significant(s) for s in scores]
            name = f"{kind} ({role}, seed {seed})"
            entry = {"items": len(items), "candidates": sorted({s.shape[0] for s in scores}),
                     "full": {"conditional_rows": full_rows,
                              "accuracy": round(sum(c == 0 for c in full_choice) / len(items), 4),
                              "significant_items": sum(sig), "wall_s": round(wall, 1),
                              "unet_rows_with_empty_prompt": unet_rows},
                     "racing": []}
            points, point_choices = [], []
            defaults = []  # (scores on a plan, the defaults' races on it) per plan length: settled_changes
            # racing over alpha and every plan length: its curve, one point per (alpha, length)
            plans = {n: [sub_plan(s, n) for s in scores] for n in range(1, scores[0].shape[1] + 1)}
            Tp = len(plans)
            curve_runs = {a: {n: replay(subs, RaceOptions(alpha=a)) for n, subs in plans.items()}
                          for a in CURVE_ALPHAS}
            default_alpha = RaceOptions().alpha
            for against, alpha, fut, eps in GRID:
                opts = RaceOptions(alpha=alpha, futility=fut, against=against, settled=eps)
                is_default = opts == RaceOptions()
                r = curve_runs[default_alpha][Tp] if is_default else replay(scores, opts)
                if is_default:
                    defaults.append((scores, r["races"]))
                    if len(entry["candidates"]) > 1:
                        entry["defaults_by_candidates"] = by_candidates(scores, r, full_choice, sig,
                                                                         unet_rows != full_rows)
                kept = sum(c == f for c, f, s in zip(r["choices"], full_choice, sig, strict=True) if s)
                acc = r["right"] / len(items)
                same = sum(c == f for c, f in zip(r["choices"], full_choice, strict=True))
                entry["racing"].append({"against": against, "alpha": alpha, "futility": fut, "settled": eps,
                                        "rows_vs_full": round(full_rows / r["rows"], 3),
                                        **all_rows(r, unet_rows, full_rows),
                                        "accuracy": round(acc, 4),
                                        "significant_kept": f"{kept}/{sum(sig)}",
                                        "same_choice_as_full": f"{same}/{len(items)}"})
                label = f"defaults, plan {Tp}" if is_default else against if not eps else f"settled {eps}"
                points.append((label, alpha, fut, r["rows"], acc))
                point_choices.append(r["choices"])
            for n in (*PLAN_LENGTHS, Tp):  # the defaults over alpha and the plan's length (the points drawn)
                for alpha in CURVE_ALPHAS:
                    if n == Tp and alpha == default_alpha:
                        continue  # the grid's default point
                    r = curve_runs[alpha][n]
                    if alpha == default_alpha:
                        defaults.append((plans[n], r["races"]))
                    points.append((f"defaults, plan {n}", alpha, 0.0, r["rows"], r["right"] / len(items)))
                    point_choices.append(r["choices"])
            fixed = fixed_curve(scores, scores[0].shape[1])
            by_alpha = {a: [((a, n), r["rows"], r["right"] / len(items), r["choices"]) for n, r in runs.items()]
                        for a, runs in curve_runs.items()}
            # issue 36's curve: racing over alpha and the plan's length; each alpha's alone beside it
            entry["curve_against_fixed"] = curve_against_fixed([p for c in by_alpha.values() for p in c], fixed)
            entry["curve_against_fixed_by_alpha"] = {
                str(a): {**{k: v for k, v in curve_against_fixed(c, fixed).items() if k != "detail"},
                         "plan_choices_kept": plan_choices_kept(plans, curve_runs[a]),
                         "rows_vs_full_at_the_full_plan": round(full_rows / curve_runs[a][Tp]["rows"], 3)}
                for a, c in by_alpha.items()}
            checked = against_fixed(points, fixed, point_choices)
            below = [c for c in checked if c["gap"] < 0]
            mine = [c for c in checked if c["rule"].startswith("defaults") and c["futility"] == 0]
            entry["against_fixed_plan"] = {
                "points": len(checked), "below": len(below), "worst_gap": min(c["gap"] for c in checked),
                "defaults_points": len(mine), "defaults_below": sum(c["gap"] < 0 for c in mine),
                "defaults_worst_gap": min(c["gap"] for c in mine),
                "defaults_smallest_p_below": min(c["p_below"] for c in mine), "detail": checked}
            entry["settled_changes"] = settled_changes(defaults)
            out["sets"][name] = entry
            curves[name] = (fixed, points, {a: [(rows, acc) for _, rows, acc, _ in c] for a, c in by_alpha.items()})
    if args.wall:
        out["wall"] = wall_times(model, data, args, T)
    if args.scores and not Path(args.scores).is_file():
        torch.save(saved, args.scores)
    emit(out, args.json)
    _plot(curves, Path(args.out))
    return 0


def wall_times(model, data, args, T) -> dict:
    """The engine side by side on the held-out sets: the full plan and racing's defaults, the same inputs,
    alternating rounds, medians; rows and choices of each."""
    import statistics

    import fastitm

    out = {}
    seed = args.seeds["held-out"]
    examples = data.make_dataset(args.images, "heldout", seed=seed, size=model.resolution)
    for kind in args.wall_sets:
        if kind == "24-class":  # every image against the same 24 captions, the Diffusion Classifier
            images, texts, truth = class_items(model, data, seed, args.images)
            pairs, method = None, "diffusion_classifier"
            spans = [(0, len(texts))] * len(images)
            items = [(k,) for k in truth]
        else:
            items = items_of(examples, "3/6-way" if kind in SPLITS else kind)
            if kind in SPLITS:
                items = [it for it in items if len(it[1]) == SPLITS[kind]]
            images, texts, spans, pairs = pack(items)
            method, truth = "diffusion_itm", [0] * len(items)
        options = {"normalize": False} if args.no_empty_row and method == "diffusion_itm" else {}
        plan = fastitm.make_plan(model, T, seed=0)
        times: dict[str, list[float]] = {"full": [], "racing": []}
        res = {}
        for _ in range(args.wall):
            for arm, adaptive in (("full", None), ("racing", True)):
                t0 = time.perf_counter()
                res[arm] = fastitm.score(images, texts, model=model, method=method, plan=plan, pairs=pairs,
                                         adaptive=adaptive, progress=False, **options)
                times[arm].append(time.perf_counter() - t0)
        choice = {arm: [int(r.matrix[i, a:b].argmax()) for i, (a, b) in enumerate(spans)] for arm, r in res.items()}
        med = {arm: statistics.median(v) for arm, v in times.items()}
        out[kind] = {"items": len(items), "rounds": args.wall, "seed": seed, **options,
                     "wall_s": {arm: [round(x, 2) for x in v] for arm, v in times.items()},
                     "wall_vs_full": round(med["full"] / med["racing"], 3),
                     "unet_rows": {arm: r.stats["unet_rows"] for arm, r in res.items()},
                     "unet_rows_vs_full": round(res["full"].stats["unet_rows"] / res["racing"].stats["unet_rows"], 3),
                     "accuracy": {arm: round(sum(c == k for c, k in zip(v, truth, strict=True)) / len(v), 4)
                                  for arm, v in choice.items()},
                     "same_choice": f"{sum(a == b for a, b in zip(choice['full'], choice['racing'], strict=True))}"
                                    f"/{len(items)}"}
    return out


def _plot(curves, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    from fastitm.engine.racing import RaceOptions

    default_alpha = RaceOptions().alpha
    out.mkdir(parents=True, exist_ok=True)
    cols = min(len(curves), len(KINDS))  # one row per seed: the tuning sets above the held-out ones
    rows = -(-len(curves) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.5 * rows), dpi=100, squeeze=False)
    for ax in axes.flat[len(curves):]:
        ax.axis("off")
    for ax, (name, (fixed, points, by_alpha)) in zip(axes.flat, curves.items(), strict=False):
        ax.plot([r for r, _, _ in fixed], [a for _, a, _ in fixed], color="black", label="fixed plan (over T)")
        # each curve as the best its knobs reach within the rows (curve_against_fixed's reading)
        every = [p for c in by_alpha.values() for p in c]
        for pts, colour, style, label in (
                (fixed, "black", "--", "fixed plan, best within the rows"),
                (every, "tab:purple", "--", "racing over alpha and the plan's length, best within the rows"),
                (by_alpha[default_alpha], "tab:red", ":",
                 f"racing at alpha {default_alpha} (the defaults) over the plan's length, best within")):
            pts = sorted((r, a) for r, a, *_ in pts)
            best = list(itertools.accumulate((a for _, a in pts), max))
            xs = [r for r, _ in pts] + [fixed[-1][0]]  # flat to the full plan's rows: the best stays in reach
            ax.step(xs, best + best[-1:], where="post", color=colour, linestyle=style, linewidth=1, label=label)
        for against, marker in (("leader", "o"), ("strongest", "s"), ("settled 0.01", "^"), ("settled 0.05", "v")):
            for fut, fill in ((0.0, "none"), (0.5, "full")):
                pts = [(r, a) for g, _, f, r, a in points if g == against and f == fut]
                ax.plot([r for r, _ in pts], [a for _, a in pts], marker=marker, linestyle="",
                        fillstyle=fill, label=f"racing {against}, futility {fut}")
        # the defaults over the plan's length, joined per alpha: racing's own curve beside the fixed plan's
        for alpha, colour in zip(CURVE_ALPHAS, ("tab:olive", "tab:blue", "tab:red", "tab:green"), strict=True):
            pts = sorted((r, a) for g, al, _, r, a in points if g.startswith("defaults") and al == alpha)
            ax.plot([r for r, _ in pts], [a for _, a in pts], marker=".", color=colour,
                    label=f"racing defaults, alpha {alpha}, over the plan's length")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("conditional denoiser rows")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    # one legend for all panels, below them, so that it hides no panel's points
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.2 / rows, 1, 1))
    fig.savefig(out / "accuracy_vs_rows.png")
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
