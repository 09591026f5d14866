"""Timestep weights (fastitm.core.weights): weighted scores against a hand computation from the same run's
per-timestep scores, uniform weights bit for bit today's, engine == reference, tables and files, clear
errors, and through fastitm eval."""

import json
import math

import pytest
import torch

import fastitm
from fastitm.cli import main

IMGS = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
TEXTS = ["a red circle", "a cat", "green"]


def by_hand(res, w):
    w = torch.tensor(w, dtype=torch.float64)
    return (res.per_timestep.double() * w).sum(dim=2) / w.sum()


def test_exp_weights_by_hand_and_uniform_unchanged(tiny):
    plain = fastitm.score(IMGS, TEXTS, model=tiny, timesteps=5, seed=0)
    assert torch.equal(fastitm.score(IMGS, TEXTS, model=tiny, timesteps=5, seed=0, weights="uniform").matrix,
                       plain.matrix)  # the default, bit for bit
    res = fastitm.score(IMGS, TEXTS, model=tiny, timesteps=5, seed=0, weights={"kind": "exp", "rate": 7})
    ts = res.plan.timesteps.tolist()
    want = by_hand(res, [math.exp(-7 * t / 1000) for t in ts])
    torch.testing.assert_close(res.matrix.double(), want, rtol=1e-6, atol=1e-7)
    assert torch.equal(res.per_timestep, plain.per_timestep)  # the stored scores are unweighted
    assert res.stats["weights"] == {"kind": "exp", "rate": 7}
    ref = fastitm.reference.score(IMGS, TEXTS, model=tiny, plan=res.plan, weights={"kind": "exp", "rate": 7})
    torch.testing.assert_close(res.matrix, ref.matrix, rtol=1e-5, atol=2e-5)


def test_tables_files_and_errors(tiny, tmp_path):
    plan = fastitm.make_plan(tiny, 4, seed=1)
    ts = plan.timesteps.tolist()
    table = {t: float(k + 1) for k, t in enumerate(ts)}
    res = fastitm.score(IMGS, TEXTS, model=tiny, plan=plan, weights=table)
    torch.testing.assert_close(res.matrix.double(), by_hand(res, [table[t] for t in ts]), rtol=1e-6, atol=1e-7)
    f = tmp_path / "w.json"
    f.write_text(json.dumps({"weights": {str(t): w for t, w in table.items()}, "fitted": "by hand"}))
    assert torch.equal(fastitm.score(IMGS, TEXTS, model=tiny, plan=plan, weights=str(f)).matrix, res.matrix)
    for bad, match in (({ts[0]: 1.0}, rf"no weight for the plan's timesteps \[{ts[1]}"),
                       ({t: -1.0 for t in ts}, "non-negative and not all 0"),
                       ({"kind": "cosine"}, "unknown weights"),
                       (str(tmp_path / "none.json"), "weights file not found")):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            fastitm.score(IMGS, TEXTS, model=tiny, plan=plan, weights=bad)
    with pytest.raises(ValueError, match="weights= with elimination= is not supported"):
        fastitm.score(IMGS, TEXTS, model=tiny, plan=plan, weights=table, method="diffusion_classifier",
                      elimination=[(2, 1)])


def test_eval_with_weights(tmp_path, capsys):
    from fastitm import data

    lines = []
    for n, e in enumerate(data.make_dataset(3, "heldout", seed=4, size=16)):
        e.image.save(tmp_path / f"{n}.png")
        lines.append({"image": f"{n}.png", "texts": [e.caption, next(iter(e.negatives.values()))], "label": 0})
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    assert main(["eval", "jsonl", "--data", str(tmp_path / "d.jsonl"), "--model", "tiny", "--timesteps", "4",
                 "--out", str(tmp_path / "out"), "--no-progress", "--weights", "exp:5"]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["options"]["weights"] == {"kind": "exp", "rate": 5.0}
    assert rep["accuracy_vs_timesteps"][-1]["metrics"]["accuracy"] == rep["metrics"]["accuracy"]
    ts = rep["plan"]["timesteps"]
    w = [math.exp(-5 * t / 1000) for t in ts]
    item = rep["items"][0]
    tiny = fastitm.testing.tiny_model(0)
    from PIL import Image

    # text choices only: DiffusionITM without the empty prompt's row (the runner's text_choice_only)
    raw = fastitm.score([Image.open(tmp_path / "0.png").convert("RGB")], lines[0]["texts"], model=tiny, timesteps=4,
                        seed=0, normalize=False)
    want = (raw.per_timestep[0].double() * torch.tensor(w, dtype=torch.float64)).sum(1) / sum(w)
    torch.testing.assert_close(torch.tensor(item["scores"], dtype=torch.float64), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(SystemExit):
        main(["eval", "jsonl", "--data", "x.jsonl", "--model", "tiny", "--weights", "exp:fast"])
    assert "argument --weights: exp:RATE needs a number, got 'fast'" in capsys.readouterr().err
