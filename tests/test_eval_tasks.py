"""Benchmark tasks on fixtures written in each dataset's exact on-disk format, end to end through the CLI,
with the metrics checked against a hand computation from independently computed scores."""

import json
import os

import pytest
import released
import torch
from PIL import Image

import fastitm
from fastitm import data
from fastitm.cli import main
from fastitm.evaluate import DataError, load_task

T = 3


@pytest.fixture(scope="module")
def examples():
    return data.make_dataset(6, "heldout", seed=2, size=16)


def scores(model, images, texts, **options):
    """The scores the report must hold, computed directly with the same plan arguments (a task of text
    choices only runs DiffusionITM with ``normalize=False``: the runner's ``text_choice_only``)."""
    return fastitm.score(images, texts, model=model, timesteps=T, seed=0, **options)


def strict_rank(s, label):
    others = torch.cat([s[:label], s[label + 1 :]])
    return int((others >= s[label]).sum())


@pytest.fixture
def flickr_dir(tmp_path):
    """GDBench's layout with the released re-ranking files: images named ``datasets/flickr30k/images/...``."""
    root = tmp_path / "gdbench"
    for name in ("val_top10_RN50x64_text.json", "val_top10_RN50x64.json"):
        ann = json.loads(released.copy(f"flickr30k/{name}", root).read_text())
        for key, cands in ann.items():
            paths = [key] if name.endswith("_text.json") else cands
            released.write_images(root, [p.replace("datasets/", "", 1) for p in paths])
    return root


def test_flickr30k_text_retrieval_cli(tiny, tiny_dir, flickr_dir, tmp_path):
    out = tmp_path / "rep"
    rc = main(["eval", "flickr30k_text", "--data", str(flickr_dir), "--model", str(tiny_dir), "--timesteps", str(T),
               "--out", str(out), "--no-progress"])
    assert rc == 0 and (out / "report.md").is_file() and (out / "accuracy_vs_timesteps.png").is_file()
    assert (out / "accuracy_vs_rows.png").is_file() and "## Racing, simulated" in (out / "report.md").read_text()
    rep = json.loads((out / "report.json").read_text())
    items = load_task("flickr30k_text", flickr_dir)
    ranks = []
    for item, rec in zip(items, rep["items"], strict=True):
        img = Image.open(item.images[0]).convert("RGB")
        s = scores(tiny, [img], item.texts, normalize=False).matrix[0]
        torch.testing.assert_close(torch.tensor(rec["scores"]), s, rtol=1e-5, atol=1e-5)
        ranks.append(strict_rank(s, 0))
    n = len(ranks)
    assert rep["metrics"]["R@1"] == pytest.approx(sum(r == 0 for r in ranks) / n)
    assert rep["metrics"]["R@5"] == pytest.approx(sum(r < 5 for r in ranks) / n)
    assert rep["metrics"]["items"] == n == 3 and [len(r["scores"]) for r in rep["items"]] == [10] * 3
    # accuracy vs timesteps: T rows; the last is the full run's metrics
    curve = rep["accuracy_vs_timesteps"]
    assert [r["timesteps"] for r in curve] == [1, 2, 3]
    assert curve[-1]["metrics"]["R@1"] == pytest.approx(rep["metrics"]["R@1"])


def test_flickr30k_image_retrieval_keeps_every_fifth_caption(tiny, tiny_dir, flickr_dir, tmp_path):
    out = tmp_path / "img"
    assert main(["eval", "flickr30k_image", "--data", str(flickr_dir), "--model", str(tiny_dir), "--timesteps",
                 str(T), "--out", str(out), "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["metrics"]["items"] == 2  # 10 captions, every 5th
    items = load_task("flickr30k_image", flickr_dir)
    captions = list(json.loads((flickr_dir / "flickr30k" / "val_top10_RN50x64.json").read_text()))
    assert [i.texts[0] for i in items] == captions[::5]
    ranks = []
    for item, rec in zip(items, rep["items"], strict=True):
        imgs = [Image.open(p).convert("RGB") for p in item.images]
        s = scores(tiny, imgs, item.texts).matrix[:, 0]
        torch.testing.assert_close(torch.tensor(rec["scores"]), s, rtol=1e-5, atol=1e-4)
        ranks.append(strict_rank(s, 0))
    assert rep["metrics"]["R@1"] == pytest.approx(sum(r == 0 for r in ranks) / len(ranks))


def test_first_timesteps_of_the_curve_by_hand(tiny, flickr_dir):
    from fastitm.core.methods import spread_order

    rep = fastitm.evaluate.run("flickr30k_text", flickr_dir, model=tiny, timesteps=T)
    k0 = spread_order(T)[0]
    right = 0
    alone = torch.zeros(T)  # each timestep alone: the items it decides rightly, and the mean margin
    margin = torch.zeros(T, dtype=torch.float64)
    for item in load_task("flickr30k_text", flickr_dir):
        res = scores(tiny, [Image.open(item.images[0]).convert("RGB")], item.texts)
        right += strict_rank(res.per_timestep[0, :, k0], 0) == 0
        for k in range(T):
            s = res.per_timestep[0, :, k].double()
            alone[k] += strict_rank(s, 0) == 0
            margin[k] += (s[0] - s[1:].max()) / 3
    assert rep.curve[0]["metrics"]["R@1"] == pytest.approx(right / 3)
    assert [r["timestep"] for r in rep.timesteps] == rep.plan["timesteps"]
    for k, row in enumerate(rep.timesteps):
        assert row["metrics"]["R@1"] == pytest.approx(alone[k].item() / 3)
        assert row["margin"] == pytest.approx(margin[k].item(), rel=1e-4, abs=1e-6)
    md = rep.to_markdown()
    assert "## Each timestep alone" in md and f"| {rep.timesteps[-1]['timestep']} | " in md


@pytest.fixture
def winoground_rows():
    return json.loads((released.RELEASED / "winoground" / "data.json").read_text())


@pytest.fixture
def winoground_dir(tmp_path, winoground_rows):
    """``facebook/winoground`` saved with save_to_disk: the released rows' fields, synthetic images."""
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({
        "id": datasets.Value("int32"), "image_0": datasets.Image(), "image_1": datasets.Image(),
        "caption_0": datasets.Value("string"), "caption_1": datasets.Value("string"),
        "tag": datasets.Value("string"), "secondary_tag": datasets.Value("string"),
        "num_main_preds": datasets.Value("int32"), "collapsed_tag": datasets.Value("string"),
    })
    rows = {k: [r.get(k) for r in winoground_rows] for k in feats if not k.startswith("image_")}
    for k in (0, 1):
        rows[f"image_{k}"] = [released.image(f"wg{r['id']}/{k}") for r in winoground_rows]
    path = tmp_path / "winoground"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=feats)}).save_to_disk(str(path))
    return path


def test_winoground_cli_counts_each_example_under_each_tag(tiny, tiny_dir, winoground_dir, tmp_path,
                                                            winoground_rows):
    out = tmp_path / "wg"
    rc = main(["eval", "winoground", "--data", str(winoground_dir), "--model", str(tiny_dir), "--timesteps", str(T),
               "--out", str(out), "--no-progress"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    per_tag: dict = {}
    text = image = group = 0
    for g, row in enumerate(winoground_rows):
        imgs = [released.image(f"wg{row['id']}/{k}") for k in (0, 1)]
        m = scores(tiny, imgs, [row["caption_0"], row["caption_1"]]).matrix
        torch.testing.assert_close(torch.tensor(rep["items"][g]["scores"]), m, rtol=1e-5, atol=1e-4)
        t = bool(m[0, 0] > m[0, 1] and m[1, 1] > m[1, 0])
        i = bool(m[0, 0] > m[1, 0] and m[1, 1] > m[0, 1])
        text, image, group = text + t, image + i, group + (t and i)
        for key in ("tag", "secondary_tag"):
            for value in row[key].split(", ") if row[key] else []:
                per_tag.setdefault(f"{key}={value}", []).append((t, i))
        per_tag.setdefault(f"collapsed_tag={row['collapsed_tag']}", []).append((t, i))
    n = len(winoground_rows)
    assert rep["metrics"]["text"] == pytest.approx(text / n) and rep["metrics"]["image"] == pytest.approx(image / n)
    assert rep["metrics"]["group"] == pytest.approx(group / n)
    by_tag = rep["metrics"]["by_tag"]
    # "Symbolic, Series" (id 41) counts under Symbolic and under Series; "Negation, Scope" under both
    assert by_tag["secondary_tag=Symbolic"]["items"] == 2 and by_tag["secondary_tag=Series"]["items"] == 2
    assert by_tag["tag=Negation"]["items"] == by_tag["tag=Scope"]["items"] == 1
    assert not any(", " in k for k in by_tag)
    assert sorted(by_tag) == sorted(per_tag)
    for key, results in per_tag.items():
        assert by_tag[key]["items"] == len(results)
        assert by_tag[key]["text"] == pytest.approx(sum(t for t, _ in results) / len(results))
        assert by_tag[key]["image"] == pytest.approx(sum(i for _, i in results) / len(results))


def _jsonl(tmp_path, examples, lines):
    for n, e in enumerate(examples):
        e.image.save(tmp_path / f"{n}.png")
    f = tmp_path / "set.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return f


def test_jsonl_both_item_kinds_ties_and_identical_candidates(tiny, tmp_path, examples):
    lines = [
        {"image": "0.png", "texts": [examples[1].caption, examples[0].caption, examples[0].caption], "label": 1},
        {"images": ["2.png", "3.png", "4.png", "./4.png"], "text": examples[4].caption, "label": 2},
        {"image": "5.png", "texts": ["a cat", "A cat"], "label": 0},  # the same tokens: a tie, never right
        {"image": "5.png", "texts": ["a dog", "a dog"], "label": 1},  # no negative at all
    ]
    f = _jsonl(tmp_path, examples, lines)
    out = tmp_path / "out"
    assert main(["eval", "jsonl", "--data", str(f), "--model", "tiny", "--timesteps", str(T), "--out", str(out),
                 "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["metrics"]["ties"] == 1 and rep["items"][2]["scores"][0] == rep["items"][2]["scores"][1]
    # a text equal to the true one and the true image's file under another name are not negatives
    assert [len(r["scores"]) for r in rep["items"]] == [2, 3, 2]
    assert rep["items"][0]["kept"] == [0, 1] and rep["items"][1]["kept"] == [0, 1, 2]
    assert rep["metrics"]["identical_dropped"] == 1 + 1 + 1 and rep["metrics"]["items_with_identical"] == 3
    assert rep["metrics"]["no_negative"] == 1 and rep["metrics"]["items"] == 3
    want = scores(tiny, [examples[0].image], [examples[1].caption, examples[0].caption]).matrix[0]
    torch.testing.assert_close(torch.tensor(rep["items"][0]["scores"]), want, rtol=1e-5, atol=1e-5)
    right = 0
    for x, rec in zip(lines[:2], rep["items"][:2], strict=True):  # the third: no negative
        s = torch.tensor(rec["scores"])
        assert rec["label"] == x["label"]
        right += strict_rank(s, x["label"]) == 0
    assert rep["metrics"]["accuracy"] == pytest.approx(right / 3)


def test_racing_simulated_on_the_runs_scores_by_hand(tiny, tmp_path, examples):
    """The report's racing table: each alpha's choices and rows equal racing each item's per-timestep
    scores (from a direct fastitm.score) by hand; the full plan's row is every candidate at every timestep."""
    from fastitm.engine.racing import RaceOptions, simulate

    caps = [e.caption for e in examples]
    lines = [{"image": f"{n}.png", "texts": caps[n:] + caps[:n], "label": 0} for n in range(3)]
    f = _jsonl(tmp_path, examples, lines)
    rep = fastitm.evaluate.run("jsonl", f, model=tiny, timesteps=16)
    assert [r["alpha"] for r in rep.racing] == [None, 0.001, 0.01, 0.05, 0.2]
    assert rep.racing[0]["rows_per_item"] == 6 * 16 and rep.racing[0]["accuracy"] == rep.metrics["accuracy"]
    per_t = [scores_t(tiny, examples[n].image, lines[n]["texts"]) for n in range(3)]
    for row in rep.racing[1:]:
        races = [simulate(p, RaceOptions(alpha=row["alpha"])) for p in per_t]
        assert row["rows_per_item"] == sum(r.rows for r in races) / 3
        right = [r.live[0] and all(r.means[0] > r.means[k] for k in range(1, 6) if r.live[k]) for r in races]
        assert row["accuracy"] == pytest.approx(sum(map(bool, right)) / 3)
        assert row["plan_end"] == pytest.approx(sum(r.stopped == 16 for r in races) / 3)


def scores_t(model, image, texts):
    return fastitm.score([image], texts, model=model, timesteps=16, seed=0).per_timestep[0]


def test_identical_pixels_are_not_a_negative(tiny, tmp_path, examples):
    """An image choice whose negative is the true image saved again (another file, same pixels)."""
    for n in (0, 1):
        examples[n].image.save(tmp_path / f"{n}.png")
    examples[0].image.save(tmp_path / "copy.png")
    f = tmp_path / "set.jsonl"
    f.write_text(json.dumps({"images": ["0.png", "copy.png", "1.png"], "text": examples[0].caption, "label": 0})
                 + "\n" + json.dumps({"images": ["copy.png", "0.png"], "text": "x", "label": 1}) + "\n")
    rep = fastitm.evaluate.run("jsonl", f, model=tiny, timesteps=2)
    assert rep.metrics["items"] == 1 and rep.metrics["no_negative"] == 1 and rep.metrics["identical_dropped"] == 2
    assert rep.items[0]["kept"] == [0, 2] and rep.items[0]["label"] == 0
    want = fastitm.score([examples[0].image, examples[1].image], [examples[0].caption], model=tiny, timesteps=2,
                         seed=0).matrix[:, 0]
    torch.testing.assert_close(torch.tensor(rep.items[0]["scores"]), want, rtol=1e-5, atol=1e-4)


def test_unreadable_image_stops_or_is_skipped(tiny, tmp_path, examples):
    lines = [{"image": "0.png", "texts": ["a", "b"], "label": 0}, {"image": "broken.png", "texts": ["a", "b"], "label": 1}]
    f = _jsonl(tmp_path, examples, lines)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        fastitm.evaluate.run("jsonl", f, model=tiny, timesteps=1)
    rep = fastitm.evaluate.run("jsonl", f, model=tiny, timesteps=1, skip_bad=True)
    assert rep.metrics["items"] == 1 and rep.skipped[0]["id"] == "2" and "broken.png" in rep.skipped[0]["error"]


@pytest.mark.parametrize("content,match", [
    ('{"image": "0.png", "texts": ["a", "b"]}', "field 'label' must be an int in \\[0, 2\\)"),
    ('{"image": "0.png", "texts": ["a"], "label": 0}', "at least 2 candidates"),
    ('{"picture": "0.png"}', "needs the fields image \\+ texts or images \\+ text"),
    ("not json", ":1: not valid JSON"),
    ("", "holds no items"),
])
def test_malformed_jsonl_names_the_line_and_field(tmp_path, content, match):
    f = tmp_path / "bad.jsonl"
    f.write_text(content + "\n")
    with pytest.raises(DataError, match=match):
        load_task("jsonl", f)


def test_missing_and_malformed_files_name_the_file(tmp_path):
    with pytest.raises(DataError, match="val_top10_RN50x64_text.json: file not found"):
        load_task("flickr30k_text", tmp_path)
    (tmp_path / "flickr30k").mkdir()
    (tmp_path / "flickr30k" / "val_top10_RN50x64.json").write_text('{"a caption": "x.jpg"}')
    with pytest.raises(DataError, match="must be a list of at least 2 image paths"):
        load_task("flickr30k_image", tmp_path)
    pytest.importorskip("datasets")
    with pytest.raises(DataError, match="not a dataset saved with save_to_disk"):
        load_task("winoground", tmp_path)
    with pytest.raises(ValueError, match="unknown task"):
        load_task("coco", tmp_path)


def test_cli_eval_errors_exit_2(tmp_path, capsys):
    assert main(["eval", "jsonl", "--data", str(tmp_path / "none.jsonl"), "--model", "tiny", "--no-progress",
                 "--out", str(tmp_path / "out")]) == 2
    assert "none.jsonl: file not found" in capsys.readouterr().err
    # an --out that cannot be made fails before the model loads (here: a folder that does not exist)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["eval", "jsonl", "--data", str(tmp_path / "none.jsonl"), "--model", str(tmp_path / "no-model"),
                 "--out", str(blocker / "report")]) == 2
    err = capsys.readouterr().err
    assert f"--out {blocker / 'report'}: the folder cannot be created" in err and "no-model" not in err
    # an --out in use by another eval, or holding another evaluation's report, is refused before the
    # model loads (--overwrite replaces the report; the same evaluation's report is simply rewritten)
    from fastitm.core.locks import held

    out = tmp_path / "busy"
    out.mkdir()
    with held(out / ".fastitm-eval.lock", lambda holder: AssertionError(holder)):
        assert main(["eval", "jsonl", "--data", "x.jsonl", "--model", str(tmp_path / "no-model"), "--out",
                     str(out)]) == 2
    assert f"--out {out} is in use by another fastitm eval (process {os.getpid()})" in capsys.readouterr().err
    (out / "report.json").write_text(json.dumps({"task": "winoground", "data": "/data/winoground"}))
    argv = ["eval", "jsonl", "--data", str(tmp_path / "none.jsonl"), "--model", "tiny", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert ('holds the report of another evaluation (task "winoground" there, "jsonl" here; data "/data/winoground" '
            f'there, "{tmp_path / "none.jsonl"}" here)') in err
    assert main([*argv, "--overwrite"]) == 2  # now past --out, to the missing data
    assert "none.jsonl: file not found" in capsys.readouterr().err


# ---- every other task on a fixture in its published layout, through the CLI -------------------------

def _save(img, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _report(task, root, tmp_path, *extra):
    out = tmp_path / f"out-{task}"
    assert main(["eval", task, "--data", str(root), "--model", "tiny", "--timesteps", "2", "--out", str(out),
                 "--no-progress", *extra]) == 0
    return json.loads((out / "report.json").read_text())


def _accuracy_by_hand(rep):
    right = [strict_rank(torch.tensor(r["scores"]), r["label"]) == 0 for r in rep["items"]]
    return sum(right) / len(right)


def test_svo_accuracy_per_negative_type(tiny, tmp_path):
    root = tmp_path / "data"
    rows = json.loads(released.copy("svo/svo.json", root).read_text())
    released.write_images(root / "svo" / "images", [p for r in rows for p in (r["pos_id"], r["neg_id"])])
    rep = _report("svo", root, tmp_path)
    assert rep["metrics"]["accuracy"] == pytest.approx(_accuracy_by_hand(rep))
    assert sorted(rep["metrics"]["by_tag"]) == ["neg_type=subj", "neg_type=verb"]  # the released sample's
    assert rep["metrics"]["by_tag"]["neg_type=subj"]["items"] == 2
    for r, row in zip(rep["items"], rows, strict=True):  # the sentence against (pos, neg), the positive first
        imgs = [released.image(row["pos_id"]), released.image(row["neg_id"])]
        want = fastitm.score(imgs, [row["sentence"]], model=tiny, timesteps=2, seed=0).matrix[:, 0]
        torch.testing.assert_close(torch.tensor(r["scores"]), want, rtol=1e-5, atol=1e-4)


def test_sugarcrepe_accuracy_per_subset_and_category(tiny, tmp_path):
    """The seven released files (their first two entries) in the repository's data/ folder, the COCO
    images in val2017/: each entry is its caption against its negative; subsets and category means by
    hand; one item scored as fastitm.score scores it."""
    from fastitm.evaluate.tasks import SUGARCREPE_SUBSETS

    root = tmp_path / "sugarcrepe"
    rows = {}
    for subset in SUGARCREPE_SUBSETS:
        f = released.copy(f"sugarcrepe/{subset}.json", tmp_path)
        (root / "data").mkdir(parents=True, exist_ok=True)
        f.rename(root / "data" / f.name)
        rows[subset] = json.loads((root / "data" / f.name).read_text())
    released.write_images(root / "val2017", sorted({r["filename"] for v in rows.values() for r in v.values()}))
    rep = _report("sugarcrepe", root, tmp_path)
    assert len(rep["items"]) == 14
    acc = {}
    for subset in SUGARCREPE_SUBSETS:
        mine = [r for r in rep["items"] if r["id"].startswith(subset + "/")]
        acc[subset] = sum(r["scores"][0] > r["scores"][1] for r in mine) / len(mine)  # a tie is wrong, as published
        assert rep["metrics"]["by_tag"][f"subset={subset}"]["accuracy"] == pytest.approx(acc[subset])
    for cat in ("add", "replace", "swap"):
        subs = [a for s, a in acc.items() if s.startswith(cat + "_")]
        assert rep["metrics"][f"{cat}_mean"] == pytest.approx(sum(subs) / len(subs))
    assert rep["metrics"]["accuracy"] == pytest.approx(_accuracy_by_hand(rep))
    first = rows["swap_obj"]["0"]
    r = next(r for r in rep["items"] if r["id"] == "swap_obj/0")
    want = fastitm.score([released.image(first["filename"])], [first["caption"], first["negative_caption"]],
                         model=tiny, timesteps=2, seed=0, normalize=False).matrix[0]
    torch.testing.assert_close(torch.tensor(r["scores"]), want, rtol=1e-5, atol=1e-4)
    only = load_task("sugarcrepe", root, split="swap_att,swap_obj")
    assert {i.tags["subset"] for i in only} == {"swap_att", "swap_obj"}
    with pytest.raises(DataError, match="unknown SugarCrepe subset"):
        load_task("sugarcrepe", root, split="add_ent")


def test_imagecode_static_sets_only(tmp_path):
    root = tmp_path / "data"
    sets = json.loads(released.copy("imagecode/valid_data.json", root).read_text())
    for name in sets:
        released.write_images(root / "imagecode" / "image-sets" / name, [f"img{k}.jpg" for k in range(10)])
    rep = _report("imagecode", root, tmp_path)
    static = next(k for k in sets if "open-images" in k)
    assert [r["label"] for r in rep["items"]] == [int(k) for k in sets[static]]  # 5, 7, 3: the video set left out
    assert [r["id"] for r in rep["items"]] == [f"{static}/{k}" for k in sets[static]]
    assert all(len(r["scores"]) == 10 for r in rep["items"])
    assert rep["metrics"]["R@1"] == pytest.approx(_accuracy_by_hand(rep))
    ranks = [strict_rank(torch.tensor(r["scores"]), r["label"]) for r in rep["items"]]
    assert rep["metrics"]["R@5"] == pytest.approx(sum(r < 5 for r in ranks) / 3)


def test_clevr_runs_on_the_released_two_string_captions(tiny, tmp_path):
    from fastitm.evaluate.tasks import CLEVR_SUBTASKS

    root = tmp_path / "clevr"
    released.copy("clevr/captions", root.parent)
    files = {sub: json.loads((root / "captions" / f"{sub}.json").read_text()) for sub in CLEVR_SUBTASKS}
    released.write_images(root / "images", {img for f in files.values() for img in f})
    rep = _report("clevr", root, tmp_path)
    assert len(rep["metrics"]["by_tag"]) == 7 and rep["metrics"]["items"] == 14  # 2 entries per image
    items = load_task("clevr", root)
    # strings 0 and 1 of every entry, spatial included, as the published numbers use them
    want = [caps for sub in CLEVR_SUBTASKS for entries in files[sub].values() for caps in entries]
    assert [i.texts for i in items] == want and all(len(c) == 2 for c in want)
    spatial = [i for i in items if i.tags["subtask"] == "spatial"]
    assert spatial[0].texts == ["On the right is a gray cylinder.", "On the left is a gray cylinder."]
    m = fastitm.score([released.image(next(iter(files["spatial"])))], spatial[0].texts, model=tiny, timesteps=2,
                      seed=0, normalize=False).matrix[0]
    rec = next(r for r in rep["items"] if r["id"] == spatial[0].id)
    torch.testing.assert_close(torch.tensor(rec["scores"]), m, rtol=1e-5, atol=1e-4)
    assert rep["metrics"]["accuracy"] == pytest.approx(_accuracy_by_hand(rep))
    for sub in CLEVR_SUBTASKS:
        recs = [r for r in rep["items"] if r["tags"]["subtask"] == sub]
        assert rep["metrics"]["by_tag"][f"subtask={sub}"]["accuracy"] == pytest.approx(
            sum(strict_rank(torch.tensor(r["scores"]), 0) == 0 for r in recs) / 2)


def test_clevr_entry_errors_name_the_entry(tmp_path):
    from fastitm.evaluate.tasks import CLEVR_SUBTASKS

    for sub in CLEVR_SUBTASKS:
        (tmp_path / "captions").mkdir(exist_ok=True)
        (tmp_path / "captions" / f"{sub}.json").write_text(json.dumps({"a.png": [["only one"]]}))
    with pytest.raises(DataError, match=r"pair_binding_size.json: entry 'a.png'\[0\] must be a list \[true caption"):
        load_task("clevr", tmp_path)


@pytest.mark.parametrize("task", ["vg_relation", "vg_attribution"])
def test_visual_genome_crops_to_the_box(tiny, tmp_path, examples, task):
    root = tmp_path / "aro"
    big = Image.new("RGB", (40, 30), "white")
    big.paste(examples[0].image, (10, 5))
    _save(big, root / "images" / "1.jpg")
    name = task.split("_")[1]
    # fractional boxes, as in ARO's files: PIL's crop rounds the edges to (10, 5, 26, 21)
    row = {"image_path": "1.jpg", "bbox_x": 9.6, "bbox_y": 5.4, "bbox_w": 16.3, "bbox_h": 15.7,
           "true_caption": examples[0].caption, "false_caption": examples[1].caption,
           "relation_name": "left of", "attributes": ["red", "blue"]}
    (root / f"visual_genome_{name}.json").write_text(json.dumps([row, row]))
    rep = _report(task, root, tmp_path)
    crop = Image.open(root / "images" / "1.jpg").convert("RGB").crop((10, 5, 26, 21))
    want = fastitm.score([crop], [examples[0].caption, examples[1].caption], model=tiny, timesteps=2, seed=0,
                         normalize=False).matrix[0]
    torch.testing.assert_close(torch.tensor(rep["items"][0]["scores"]), want, rtol=1e-5, atol=1e-4)
    assert rep["metrics"]["accuracy"] == pytest.approx(_accuracy_by_hand(rep))


def test_bad_fields_are_named_with_file_and_row(tmp_path, examples):
    """A string where ARO has a number, an empty box, a box outside its image, an SVO sentence that is
    not text, a latin-1 jsonl: each message names the file, the row and the field."""
    from fastitm.evaluate.runner import BadImage, _decode

    root = tmp_path / "aro"
    _save(Image.new("RGB", (40, 30), "white"), root / "images" / "1.jpg")
    good = {"image_path": "1.jpg", "bbox_x": 5, "bbox_y": 5, "bbox_w": 10, "bbox_h": 10, "true_caption": "a",
            "false_caption": "b", "relation_name": "on"}
    f = root / "visual_genome_relation.json"
    for change, msg in (({"bbox_x": "100"}, "row 1: bbox_x must be a number, got '100'"),
                        ({"bbox_w": 0}, r"row 1: the box is empty \(bbox_w 0, bbox_h 10\)"),
                        ({"false_caption": None}, "row 1: false_caption must be a string, got None")):
        f.write_text(json.dumps([good, {**good, **change}]))
        with pytest.raises(DataError, match=rf"{f}: {msg}"):
            load_task("vg_relation", root)
    f.write_text(json.dumps([good, {**good, "bbox_x": 100, "bbox_y": 0}]))
    items = load_task("vg_relation", root)
    assert _decode(items[0])[0].size == (10, 10)
    with pytest.raises(BadImage, match=r"item 1 image 0: its box \(100, 0, 110, 10\) .* outside the 40x30 image"):
        _decode(items[1])
    (tmp_path / "svo").mkdir()
    (tmp_path / "svo" / "svo.json").write_text(json.dumps([{"sentence": 12, "pos_id": 1, "neg_id": 2,
                                                            "neg_type": "subj"}]))
    with pytest.raises(DataError, match=r"svo.json: row 0: sentence must be a non-empty string, got 12"):
        load_task("svo", tmp_path)
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"image": "a.png", "texts": ["a", "b"], "label": 0}\n'
                    + '{"image": "b.png", "texts": ["café", "b"], "label": 0}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"{bad}:2: not UTF-8 text \(byte 0xe9 .*must be UTF-8"):
        load_task("jsonl", bad)
    bad.write_text(json.dumps({"image": "https://example.com/a.png", "texts": ["a", "b"], "label": 0}))
    with pytest.raises(DataError, match=rf"{bad}:1: https://example.com/a.png is a URL; fastitm does not fetch"):
        load_task("jsonl", bad)


def test_pets_uses_diffusion_classifier_with_elimination(tmp_path):
    root = tmp_path / "pets"
    classes = released.copy("pets/classes.txt", tmp_path).read_text().splitlines()
    released.write_images(root / "images", ["Abyssinian_100.jpg", "basset_hound_12.jpg"])  # the Pets file names
    out = tmp_path / "pets-out"
    assert main(["eval", "pets", "--data", str(root), "--model", "tiny", "--timesteps", "5", "--out", str(out),
                 "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == "diffusion_classifier" and rep["options"]["elimination"] == [[1, 5], [2, 1]]
    assert [r["label"] for r in rep["items"]] == [classes.index("abyssinian"), classes.index("basset hound")]
    for r in rep["items"]:  # 37 classes; one survivor per image, the rest eliminated (null)
        assert len(r["scores"]) == 37 and sum(v is not None for v in r["scores"]) == 1
    right = [r["scores"][r["label"]] is not None for r in rep["items"]]
    assert rep["metrics"]["accuracy"] == pytest.approx(sum(right) / 2)
    assert rep["accuracy_vs_timesteps"] == []  # eliminated texts have no full per-timestep scores


def test_mmbias_effect_sizes_by_hand(tmp_path, examples):
    import numpy as np

    root = tmp_path / "data" / "mmbias"
    good, bad = ["a red circle", "a happy photo"], ["a blue square", "a sad photo", "a broken cross"]
    root.mkdir(parents=True)
    (root / "textual_phrases.txt").write_text(json.dumps({"pleasant_phrases": good, "unpleasant_phrases": bad}))
    groups = {"Christian": "Religion/Christian", "Buddhist": "Religion/Buddhist", "Hindu": "Religion/Hindu",
              "Jewish": "Religion/Jewish"}
    for n, folder in enumerate(groups.values()):
        for k in range(2):
            _save(examples[(n + k) % 6].image, root / "data" / "Images" / folder / f"{k}.jpg")
    rep = _report("bias", tmp_path / "data", tmp_path)
    phis = {}
    for r in rep["items"]:
        s = np.array(r["scores"])
        phis.setdefault(r["tags"]["group"], []).append(s[:2].mean() - s[2:].mean())

    def d(x, y):
        return (np.mean(phis[x]) - np.mean(phis[y])) / np.concatenate([phis[x], phis[y]]).std()

    for x, y in [("Christian", "Jewish"), ("Buddhist", "Christian"), ("Buddhist", "Hindu"), ("Buddhist", "Jewish")]:
        assert rep["metrics"][f"{x}-{y}"] == pytest.approx(d(x, y), rel=1e-6)
    assert "Christian-Muslim" not in rep["metrics"]  # no Muslim images in this fixture


def test_mmbias_warns_where_the_published_split_differs(tmp_path):
    root = tmp_path / "mmbias"
    (root / "data" / "Images" / "Religion" / "Christian").mkdir(parents=True)
    _save(released.image("c"), root / "data" / "Images" / "Religion" / "Christian" / "0.jpg")
    (root / "textual_phrases.txt").write_text(json.dumps({"pleasant_phrases": ["good"],
                                                          "unpleasant_phrases": ["bad", "awful", "evil"]}))
    with pytest.warns(UserWarning, match="the published code would split them at 2, fastitm at 1"):
        items = load_task("bias", tmp_path)
    assert items[0].tags["pleasant"] == "1"


def test_gender_bias_effect_sizes_by_hand(tmp_path, examples):
    import numpy as np

    root = tmp_path / "gender"
    for word in ("suit", "apron"):
        for k in (1, 2, 7, 8):  # <= 6: men, > 6: women
            _save(examples[k % 6].image, root / f"{word}-images" / f"{k}.jpg")
    rep = _report("bias_gender", root, tmp_path)
    phi = {"male": [], "female": []}
    for r in rep["items"]:
        phi[r["tags"]["gender"]].append(r["scores"][0] - r["scores"][1])
    want = (np.mean(phi["male"]) - np.mean(phi["female"])) / np.concatenate([phi["male"], phi["female"]]).std()
    assert rep["metrics"]["clothes"] == pytest.approx(want, rel=1e-6) and rep["metrics"]["items"] == 8


def test_bias_tasks_name_what_is_missing(tmp_path):
    """A group without images, a target with one of its two folders, a target without women's images:
    each is said, naming the folder, the group or the target, and what the report leaves out."""
    from fastitm.evaluate.metrics import gender_bias_metrics

    root = tmp_path / "mmbias"
    _save(released.image("c"), root / "data" / "Images" / "Religion" / "Christian" / "0.jpg")
    (root / "textual_phrases.txt").write_text(json.dumps({"pleasant_phrases": ["good"], "unpleasant_phrases": ["bad"]}))
    with pytest.warns(UserWarning, match=r"MMBias: no images for Muslim, Jewish, .* \(folders Religion/Muslim, .* under .*Images\); the "
                                         r"pairs Christian-Muslim, Christian-Jewish, .* are left out"):
        load_task("bias", tmp_path)
    gender = tmp_path / "gender"
    for k in (1, 2):  # men only
        _save(released.image("c"), gender / "beer-images" / f"{k}.jpg")
    with pytest.warns(UserWarning, match=rf"no images in {gender / 'wine-images'}: drinks is computed from beer alone"):
        items = load_task("bias_gender", gender)
    with pytest.warns(UserWarning, match=r"drinks has no images of women \(numbered above 6\): its effect size is "
                                         r"undefined"):
        got = gender_bias_metrics(items, [torch.tensor([[0.2, 0.1]])] * len(items))
    assert got["drinks"] != got["drinks"]  # NaN (null in report.json)


def test_order_perturbations_by_hand(monkeypatch):
    import random

    from fastitm.evaluate import order

    tags = {"red": "JJ", "small": "JJ", "dog": "NN", "cat": "NN", "ball": "NN"}
    monkeypatch.setattr(order, "TAGGER", lambda t: [(w, tags.get(w, "VB")) for w in t.split()])
    monkeypatch.setattr(order, "TOKENIZER", lambda t: t.split())
    text = "a red dog chases a small cat with ball"
    out = order.shuffle_nouns_and_adj(text, random.Random(0)).split()
    # only nouns move among noun slots and adjectives among adjective slots
    assert sorted(out[i] for i in (2, 6, 8)) == ["ball", "cat", "dog"] and sorted(out[i] for i in (1, 5)) == ["red", "small"]
    assert [out[i] for i in (0, 3, 4, 7)] == ["a", "chases", "a", "with"]
    rest = order.shuffle_allbut_nouns_and_adj(text, random.Random(1)).split()
    assert [rest[i] for i in (1, 2, 5, 6, 8)] == ["red", "dog", "small", "cat", "ball"]
    within = order.shuffle_within_trigrams(text, random.Random(2)).split()
    assert [sorted(within[i : i + 3]) for i in (0, 3, 6)] == [sorted(text.split()[i : i + 3]) for i in (0, 3, 6)]
    tri = order.shuffle_trigrams(text, random.Random(3)).split()
    grams = [" ".join(tri[i : i + 3]) for i in (0, 3, 6)]
    assert sorted(grams) == sorted(" ".join(text.split()[i : i + 3]) for i in (0, 3, 6))
    assert order.pre_caption('A Dog: "runs"!  Fast.', 3) == "a dog runs"
    opts = order.caption_options("A red dog chases a small cat.", 0, seed=1)
    assert opts[0] == "a red dog chases a small cat" and len(opts) == 5
    assert opts == order.caption_options("A red dog chases a small cat.", 0, seed=1)  # seeded: repeatable


def _simple_language_models(monkeypatch):
    from fastitm.evaluate import order

    monkeypatch.setattr(order, "TAGGER", lambda t: [(w, "NN" if len(w) > 4 else "JJ") for w in t.split()])
    monkeypatch.setattr(order, "TOKENIZER", lambda t: t.split())


def test_coco_order_through_the_cli(tmp_path, examples, monkeypatch):
    _simple_language_models(monkeypatch)
    root = tmp_path / "data" / "coco_order"
    _save(examples[0].image, root / "val2014" / "x.jpg")
    (root / "coco_karpathy_test.json").write_text(json.dumps(
        [{"image": "val2014/x.jpg", "caption": [examples[0].caption, examples[2].caption]}]))
    rep = _report("coco_order", tmp_path / "data", tmp_path)
    items = load_task("coco_order", tmp_path / "data")
    assert rep["metrics"]["items"] == 2 and [len(r["scores"]) for r in rep["items"]] == [len(i.texts) for i in items]
    assert rep["metrics"]["R@1"] == pytest.approx(_accuracy_by_hand(rep))  # 5 candidates, those dropped included


@pytest.mark.parametrize("layout", ["images", "flickr30k-images"])  # GDBench's folder, ARO's
def test_flickr30k_order_reads_either_layout_and_drops_identical_shuffles(tiny, tmp_path, monkeypatch, layout):
    from fastitm.evaluate import order

    _simple_language_models(monkeypatch)
    root = tmp_path / "data"
    ann = json.loads(released.copy("flickr30k/flickr30k_val.json", root).read_text())
    name = ann[0]["image"].split("/")[-1]
    released.write_images(root / "flickr30k" / layout, [name])
    # a caption of one trigram: shuffling the trigrams gives the caption back, which is no negative
    ann[0]["caption"].append("Workers load wool.")
    (root / "flickr30k" / "flickr30k_val.json").write_text(json.dumps(ann))
    out = tmp_path / "out"
    assert main(["eval", "flickr30k_order", "--data", str(root), "--model", "tiny", "--timesteps", "2",
                 "--out", str(out), "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    dropped = n_items = no_neg = 0
    right = []
    for c, cap in enumerate(ann[0]["caption"]):
        opts = order.caption_options(cap, c)
        negs = [o for o in opts[1:] if o != opts[0]]
        dropped += len(opts) - 1 - len(negs)
        if not negs:
            no_neg += 1
            continue
        rec = rep["items"][n_items]
        n_items += 1
        assert rec["id"] == f"0/{c}" and len(rec["scores"]) == 1 + len(negs)
        want = fastitm.score([released.image(name)], [opts[0]] + negs, model=tiny, timesteps=2, seed=0,
                             normalize=False).matrix[0]
        torch.testing.assert_close(torch.tensor(rec["scores"]), want, rtol=1e-5, atol=1e-4)
        right.append(strict_rank(want, 0) == 0)
    assert order.caption_options("Workers load wool.", 5)[4] == "workers load wool"  # the shuffle equals the truth
    assert dropped >= 1 and rep["metrics"]["identical_dropped"] == dropped
    assert rep["metrics"]["no_negative"] == no_neg and rep["metrics"]["items"] == n_items
    assert rep["metrics"]["accuracy"] == pytest.approx(sum(right) / n_items)


def test_flickr30k_order_missing_image_names_both_layouts(tmp_path, monkeypatch):
    _simple_language_models(monkeypatch)
    released.copy("flickr30k/flickr30k_val.json", tmp_path)
    with pytest.raises(DataError, match=r"flickr30k/images/1018148011.jpg or .*flickr30k/flickr30k-images/1018148011"):
        fastitm.evaluate.run("flickr30k_order", tmp_path, model=fastitm.testing.tiny_model(), timesteps=1)


def test_order_tasks_say_what_model_is_missing(tmp_path, monkeypatch):
    from fastitm.evaluate import order

    monkeypatch.setattr(order, "TAGGER", None)
    monkeypatch.setitem(__import__("sys").modules, "spacy", None)  # as if spaCy were not installed
    root = tmp_path / "flickr30k"
    root.mkdir()
    (root / "flickr30k_val.json").write_text(json.dumps([{"image": "a.jpg", "caption": ["a dog"]}]))
    with pytest.raises(DataError, match="en_core_web_sm"):
        load_task("flickr30k_order", tmp_path)
