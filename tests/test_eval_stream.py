"""Evaluation streams many items through one engine call (full batches across item boundaries) and
races text-choice items with ``adaptive=``; each item's scores stay what scoring it alone gives."""

import json

import pytest
import torch

import fastitm
from fastitm import data
from fastitm.cli import main
from fastitm.engine.racing import RaceOptions, simulate

LOOSE = {"alpha": 0.6, "min_timesteps": 3, "round_size": 2, "settled": 0.05}  # settled: alpha is past its range


@pytest.fixture(scope="module")
def jsonl_set(tmp_path_factory):
    """20 text-choice items (an image, its caption and two others) and 4 image-choice items."""
    root = tmp_path_factory.mktemp("stream")
    ex, seen = [], set()
    for e in data.make_dataset(40, "heldout", seed=5, size=16):  # 8 distinct captions: no identical candidates
        if e.caption not in seen and len(ex) < 8:
            ex.append(e)
            seen.add(e.caption)
    for n, e in enumerate(ex):
        e.image.save(root / f"{n}.png")
    caps = [e.caption for e in ex]
    lines = [{"image": f"{n % 8}.png", "texts": [caps[n % 8], caps[(n + 1) % 8], caps[(n + 3) % 8]], "label": 0}
             for n in range(20)]
    lines += [{"images": [f"{n}.png", f"{(n + 2) % 8}.png"], "text": caps[n], "label": 0} for n in range(4)]
    f = root / "set.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return f, lines, ex


def test_streamed_items_score_as_alone_with_full_batches(tiny, jsonl_set):
    f, lines, ex = jsonl_set
    streamed = fastitm.evaluate.run("jsonl", f, model=tiny, timesteps=3, batch_size=16)
    img = {f"{n}.png": e.image for n, e in enumerate(ex)}
    for x, rec in zip(lines, streamed.items, strict=True):  # each item scored alone, directly
        if "texts" in x:
            alone = fastitm.score([img[x["image"]]], x["texts"], model=tiny, timesteps=3, seed=0).matrix[0]
        else:
            alone = fastitm.score([img[p] for p in x["images"]], [x["text"]], model=tiny, timesteps=3,
                                  seed=0).matrix[:, 0]
        torch.testing.assert_close(torch.tensor(rec["scores"]), alone, rtol=1e-5, atol=1e-5)
    # 20 items of 1 x (3 texts + the empty prompt) x 3 timesteps = 12 rows and 4 of 2 x 2 x 3 = 12 rows, in
    # calls of 16 batches' worth: 22 items (264 rows: 17 batches of 16), then 2 (24 rows: 2 batches);
    # one call per item would fill 12 of 16 rows per batch
    assert streamed.stats["unet_rows"] == 24 * 12
    assert streamed.stats["engine_calls"] == 2 and streamed.stats["batches"] == 19
    assert streamed.stats["batch_fill"] == pytest.approx(288 / (19 * 16), abs=1e-4)
    assert streamed.stats["batch_fill"] > 12 / 16
    assert "mean batch fill" in streamed.to_markdown()
    one_batch = fastitm.evaluate.run("jsonl", f, model=tiny, timesteps=3, batch_size=16, stream=1)
    assert one_batch.stats["engine_calls"] == 12 and one_batch.metrics == pytest.approx(streamed.metrics)


def test_adaptive_eval_races_text_items_as_simulated(tiny, jsonl_set, tmp_path):
    f, lines, ex = jsonl_set
    rep = fastitm.evaluate.run("jsonl", f, model=tiny, timesteps=12, batch_size=16, adaptive=LOOSE)
    race = RaceOptions.parse(LOOSE)
    assert rep.options["adaptive"] == dict(vars(race)) and rep.curve == [] and rep.racing == []
    rows = 0
    image_race = RaceOptions.parse({**LOOSE, "over": "images"})
    for x, rec in zip(lines, rep.items, strict=True):
        if "texts" not in x:  # image-choice items: the text's images race
            imgs = [ex[int(p.split(".")[0])].image for p in x["images"]]
            per_t = fastitm.score(imgs, [x["text"]], model=tiny, timesteps=12, seed=0).per_timestep[:, 0]
            sim = simulate(per_t, image_race)
            assert [v is not None for v in rec["scores"]] == sim.live.tolist(), rec["id"]
            assert rec["rows"] == 2 * sim.rows  # each image's text row and its unconditional row
            assert rec["rows_full"] == 2 * 2 * 12  # 2 images x (the text + the empty prompt) x 12
            rows += rec["rows"]
            continue
        img = ex[int(x["image"].split(".")[0])].image
        per_t = fastitm.score([img], x["texts"], model=tiny, timesteps=12, seed=0).per_timestep[0]
        sim = simulate(per_t, race)
        assert [v is not None for v in rec["scores"]] == sim.live.tolist(), rec["id"]  # dropped: null
        assert rec["rows"] == sim.rows + sim.stopped and rec["plan_end"] == (sim.stopped == 12)
        assert rec["rows_full"] == (3 + 1) * 12
        rows += rec["rows"]
    assert rep.stats["unet_rows"] == rows < 24 * 4 * 12
    assert "denoiser rows per item" in rep.to_markdown()
    # a full-plan checkpoint is another run's: an adaptive run does not resume from it
    ckpt = tmp_path / "eval.pt"
    fastitm.evaluate.run("jsonl", f, model=tiny, timesteps=12, batch_size=16, checkpoint=ckpt, limit=4)
    with pytest.raises(Exception, match="checkpoint"):
        fastitm.evaluate.run("jsonl", f, model=tiny, timesteps=12, batch_size=16, checkpoint=ckpt, limit=4,
                             adaptive=LOOSE)


def test_adaptive_through_the_cli(tiny_dir, jsonl_set, tmp_path, capsys):
    f, lines, ex = jsonl_set
    out = tmp_path / "out"
    assert main(["eval", "jsonl", "--data", str(f), "--model", str(tiny_dir), "--timesteps", "12", "--out", str(out),
                 "--no-progress", "--limit", "5", "--adaptive", "alpha=0.6,min_timesteps=3,round_size=2,settled=0.05"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["options"]["adaptive"]["alpha"] == 0.6 and all("rows" in r for r in rep["items"])
    assert main(["score", "--images", str(f.parent / "0.png"), "--texts", *lines[0]["texts"], "--model", str(tiny_dir),
                 "--timesteps", "12", "--adaptive", "--no-progress"]) == 0
    for bad, msg in ((["--adaptive", "alpha=x"], "expected a number"), (["--adaptive", "rounds=3"], "unknown adaptive")):
        assert main(["eval", "jsonl", "--data", str(f), "--model", "tiny", "--out", str(tmp_path / "o2"), *bad]) == 2
        assert msg in capsys.readouterr().err


def test_text_choices_run_diffusion_itm_without_the_empty_prompt_row(tiny, jsonl_set):
    """A task whose items all choose among one image's texts runs DiffusionITM with ``normalize=False``
    unless told: the empty prompt's error of an image and timestep is subtracted from every one of its
    texts, so the margins, the metrics and racing's decisions are the normalized score's, at 3 of 4
    rows per image and timestep here. Image choices (the mixed set above) keep it."""
    f, lines, ex = jsonl_set
    lines = [x for x in lines if "texts" in x]
    text = f.parent / "text_only.jsonl"
    text.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    kw = {"model": tiny, "timesteps": 4, "batch_size": 16}
    raw = fastitm.evaluate.run("jsonl", text, **kw)
    normed = fastitm.evaluate.run("jsonl", text, normalize=True, **kw)
    assert raw.options["normalize"] is False and normed.options["normalize"] is True
    assert raw.choices["normalize"].startswith("off") and "normalize" not in normed.choices
    assert "without the empty prompt's row" in raw.to_markdown()
    assert raw.stats["empty_prompt_row"] is False and normed.stats["empty_prompt_row"] is True
    # 240 rows fit one call of 16 batches of 16; the normalized run's 320 take two
    assert "240 denoiser rows in 15 batches of up to 16 (1 call, several" in raw.to_markdown()
    assert "320 denoiser rows in 20 batches of up to 16 (2 calls, several" in normed.to_markdown()
    # 8 images over 20 items: the cache hint offers the unconditional rows only where they run
    assert "would encode each once, with" in raw.to_markdown()
    assert "would encode each once and run its unconditional rows once" in normed.to_markdown()
    assert raw.stats["unet_rows"] == 20 * 3 * 4 and normed.stats["unet_rows"] == 20 * 4 * 4
    assert raw.metrics == pytest.approx(normed.metrics) and raw.curve == normed.curve
    cached = fastitm.evaluate.run("jsonl", text, image_cache=True, **kw)  # latents only: no row to reuse
    assert "Image cache: 8 images through the VAE" in cached.to_markdown()
    assert cached.stats["unet_rows_reused"] == 0 and cached.metrics == pytest.approx(raw.metrics)
    for x, a, b in zip(lines, raw.items, normed.items, strict=True):
        img = ex[int(x["image"].split(".")[0])].image
        want = fastitm.score([img], x["texts"], model=tiny, timesteps=4, seed=0, normalize=False).matrix[0]
        got, ref = torch.tensor(a["scores"]), torch.tensor(b["scores"])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # one shift per item: the empty prompt's mean error, the same for all its texts
        torch.testing.assert_close(got - got[0], ref - ref[0], rtol=1e-4, atol=1e-4)
        assert float((got - ref).std()) < 1e-4 and float((got - ref).abs().min()) > 1e-2
    # racing decides as on the normalized scores, and spends no empty prompt's row
    race = RaceOptions.parse(LOOSE)
    raced = fastitm.evaluate.run("jsonl", text, adaptive=LOOSE, **{**kw, "timesteps": 12})
    for x, rec in zip(lines, raced.items, strict=True):
        img = ex[int(x["image"].split(".")[0])].image
        sim = simulate(fastitm.score([img], x["texts"], model=tiny, timesteps=12, seed=0).per_timestep[0], race)
        assert [v is not None for v in rec["scores"]] == sim.live.tolist(), rec["id"]
        assert rec["rows"] == sim.rows
    assert raced.stats["unet_rows"] == sum(r["rows"] for r in raced.items)
    assert all(r["rows_full"] == 3 * 12 for r in raced.items)
    full = 3 * 12 * len(lines) / raced.stats["unet_rows"]
    assert f"rows per item against 36.0 for the full plan ({full:.2f}x fewer);" in raced.to_markdown()
    assert "(the empty prompt's included)" not in raced.to_markdown()
    mixed = fastitm.evaluate.run("jsonl", f, **{**kw, "timesteps": 3})
    assert mixed.options["normalize"] is True and mixed.stats["unet_rows"] == 24 * 12
