"""The evaluation harness's own cost: ``fastitm.evaluate.run`` on a jsonl task (reading the file,
decoding PNGs a few items ahead, metrics, the accuracy-vs-timesteps curve) against the same items
scored by bare ``fastitm.score`` calls on images already in memory, same plan, in one run, the two
timed in alternating rounds (median of 7 each).

Embedded default model, DiffusionITM, 10 timesteps, 24 held-out synthetic images, each against its
true caption and two hard negatives. Run: pytest bench/test_eval_bench.py -s
"""

import json
import statistics

import torch
from benchutil import context, median_ms

import fastitm
from fastitm import data

T = 10
N = 24


def test_harness_overhead_cpu(tmp_path, report, benchmark):
    model = fastitm.load_model()
    examples = data.make_dataset(N, "heldout", seed=4, size=model.resolution)
    lines, items = [], []
    for n, e in enumerate(examples):
        e.image.save(tmp_path / f"{n}.png")
        texts = [e.caption, *list(e.negatives.values())[:2]]
        lines.append({"image": f"{n}.png", "texts": texts, "label": 0})
        items.append((e.image.copy(), texts))
    f = tmp_path / "set.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines))
    plan = fastitm.make_plan(model, T, seed=0)

    def bare():  # text choices only: the harness runs DiffusionITM without the empty prompt's row too
        return [fastitm.score([img], texts, model=model, plan=plan, progress=False, normalize=False)
                for img, texts in items]

    def harness():
        return fastitm.evaluate.run("jsonl", f, model=model, timesteps=T, seed=0, progress=False)

    for k, v in context(model.device, model.dtype, model=model.source, items=N, texts_per_item=3, timesteps=T,
                        method="diffusion_itm").items():
        report(k, v)
    # Interleaved rounds: this machine's speed drifts over a minute by more than the effect measured.
    bare(), harness()
    b, h = [], []
    for _ in range(7):
        b.append(median_ms(bare, model.device, rounds=1, warmup=0)[0])
        h.append(median_ms(harness, model.device, rounds=1, warmup=0)[0])
    bare_ms, b_lo, b_hi = statistics.median(b), min(b), max(b)
    harness_ms, h_lo, h_hi = statistics.median(h), min(h), max(h)
    rep = harness()
    want = [r.matrix[0].tolist() for r in bare()]
    # the harness computes the bare scores, to float rounding (its calls batch several items together)
    torch.testing.assert_close(torch.tensor([x["scores"] for x in rep.items]), torch.tensor(want), rtol=1e-5, atol=1e-5)
    overhead = harness_ms / bare_ms - 1
    report("bare_score_ms", f"{bare_ms:.0f} (min {b_lo:.0f}, max {b_hi:.0f})")
    report("evaluate_run_ms", f"{harness_ms:.0f} (min {h_lo:.0f}, max {h_hi:.0f})")
    report("harness_overhead", f"{100 * overhead:.1f}%")
    benchmark.pedantic(harness, rounds=1, warmup_rounds=0)
    assert overhead < 0.05, f"the harness costs {100 * overhead:.1f}% on top of scoring"
    assert torch.isfinite(torch.tensor(want)).all()
