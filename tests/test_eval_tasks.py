"""Benchmark tasks on fixtures written in each dataset's exact on-disk format, end to end through the CLI,
with the metrics checked against a hand computation from independently computed scores."""

import json

import pytest
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


def scores(model, images, texts):
    """The scores the report must hold, computed directly with the same plan arguments."""
    return fastitm.score(images, texts, model=model, timesteps=T, seed=0)


def strict_rank(s, label):
    others = torch.cat([s[:label], s[label + 1 :]])
    return int((others >= s[label]).sum())


@pytest.fixture
def flickr_dir(tmp_path, examples):
    root = tmp_path / "gdbench"
    (root / "flickr30k" / "images").mkdir(parents=True)
    paths = []
    for n, e in enumerate(examples):
        e.image.save(root / "flickr30k" / "images" / f"{n}.jpg", quality=95)
        paths.append(f"datasets/flickr30k/images/{n}.jpg")  # as the published files name them
    caps = [e.caption for e in examples]
    text = {paths[n]: [caps[n]] + [c for m, c in enumerate(caps) if m != n] for n in range(len(paths))}
    (root / "flickr30k" / "val_top10_RN50x64_text.json").write_text(json.dumps(text))
    # caption -> images; the published loader keeps every 5th caption
    image = {}
    for n in range(len(paths)):
        for k in range(5):
            image[f"{caps[n]} #{k}" if k else caps[n]] = [paths[n]] + [p for m, p in enumerate(paths) if m != n]
    (root / "flickr30k" / "val_top10_RN50x64.json").write_text(json.dumps(image))
    return root


def test_flickr30k_text_retrieval_cli(tiny, tiny_dir, flickr_dir, tmp_path, examples):
    out = tmp_path / "rep"
    rc = main(["eval", "flickr30k_text", "--data", str(flickr_dir), "--model", str(tiny_dir), "--timesteps", str(T),
               "--out", str(out), "--no-progress"])
    assert rc == 0 and (out / "report.md").is_file() and (out / "accuracy_vs_timesteps.png").is_file()
    rep = json.loads((out / "report.json").read_text())
    items = load_task("flickr30k_text", flickr_dir)
    ranks = []
    for item, rec in zip(items, rep["items"]):
        img = Image.open(item.images[0]).convert("RGB")
        s = scores(tiny, [img], item.texts).matrix[0]
        torch.testing.assert_close(torch.tensor(rec["scores"]), s, rtol=1e-5, atol=1e-5)
        ranks.append(strict_rank(s, 0))
    n = len(ranks)
    assert rep["metrics"]["R@1"] == pytest.approx(sum(r == 0 for r in ranks) / n)
    assert rep["metrics"]["R@5"] == pytest.approx(sum(r < 5 for r in ranks) / n)
    assert rep["metrics"]["items"] == n == 6
    # accuracy vs timesteps: T rows; the last is the full run's metrics
    curve = rep["accuracy_vs_timesteps"]
    assert [r["timesteps"] for r in curve] == [1, 2, 3]
    assert curve[-1]["metrics"]["R@1"] == pytest.approx(rep["metrics"]["R@1"])


def test_flickr30k_image_retrieval_keeps_every_fifth_caption(tiny, tiny_dir, flickr_dir, examples, tmp_path):
    out = tmp_path / "img"
    assert main(["eval", "flickr30k_image", "--data", str(flickr_dir), "--model", str(tiny_dir), "--timesteps",
                 str(T), "--out", str(out), "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["metrics"]["items"] == 6  # 30 captions, every 5th
    items = load_task("flickr30k_image", flickr_dir)
    assert [i.texts[0] for i in items] == [e.caption for e in examples]
    ranks = []
    for item, rec in zip(items, rep["items"]):
        imgs = [Image.open(p).convert("RGB") for p in item.images]
        s = scores(tiny, imgs, item.texts).matrix[:, 0]
        torch.testing.assert_close(torch.tensor(rec["scores"]), s, rtol=1e-5, atol=1e-4)
        ranks.append(strict_rank(s, 0))
    assert rep["metrics"]["R@1"] == pytest.approx(sum(r == 0 for r in ranks) / len(ranks))


def test_first_timesteps_of_the_curve_by_hand(tiny, flickr_dir):
    from fastitm.methods import spread_order

    rep = fastitm.evaluate.run("flickr30k_text", flickr_dir, model=tiny, timesteps=T)
    k0 = spread_order(T)[0]
    right = 0
    for item in load_task("flickr30k_text", flickr_dir):
        res = scores(tiny, [Image.open(item.images[0]).convert("RGB")], item.texts)
        right += strict_rank(res.per_timestep[0, :, k0], 0) == 0
    assert rep.curve[0]["metrics"]["R@1"] == pytest.approx(right / 6)


@pytest.fixture
def winoground_dir(tmp_path, examples):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({
        "id": datasets.Value("int32"), "image_0": datasets.Image(), "image_1": datasets.Image(),
        "caption_0": datasets.Value("string"), "caption_1": datasets.Value("string"),
        "tag": datasets.Value("string"), "secondary_tag": datasets.Value("string"),
        "num_main_preds": datasets.Value("int32"), "collapsed_tag": datasets.Value("string"),
    })
    rows = {k: [] for k in feats}
    for g in range(3):
        a, b = examples[2 * g], examples[2 * g + 1]
        rows["id"].append(g)
        rows["image_0"].append(a.image)
        rows["image_1"].append(b.image)
        rows["caption_0"].append(a.caption)
        rows["caption_1"].append(b.caption)
        rows["tag"].append("Object" if g < 2 else "Relation")
        rows["secondary_tag"].append("")
        rows["num_main_preds"].append(1)
        rows["collapsed_tag"].append("Object" if g < 2 else "Relation")
    path = tmp_path / "winoground"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=feats)}).save_to_disk(str(path))
    return path


def test_winoground_cli(tiny, tiny_dir, winoground_dir, tmp_path, examples):
    out = tmp_path / "wg"
    rc = main(["eval", "winoground", "--data", str(winoground_dir), "--model", str(tiny_dir), "--timesteps", str(T),
               "--out", str(out), "--no-progress"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    text = image = group = 0
    per_tag = {"Object": [], "Relation": []}
    for g in range(3):
        a, b = examples[2 * g], examples[2 * g + 1]
        m = scores(tiny, [a.image, b.image], [a.caption, b.caption]).matrix
        torch.testing.assert_close(torch.tensor(rep["items"][g]["scores"]), m, rtol=1e-5, atol=1e-4)
        t = bool(m[0, 0] > m[0, 1] and m[1, 1] > m[1, 0])
        i = bool(m[0, 0] > m[1, 0] and m[1, 1] > m[0, 1])
        text, image, group = text + t, image + i, group + (t and i)
        per_tag["Object" if g < 2 else "Relation"].append(t)
    assert rep["metrics"]["text"] == pytest.approx(text / 3)
    assert rep["metrics"]["image"] == pytest.approx(image / 3)
    assert rep["metrics"]["group"] == pytest.approx(group / 3)
    assert rep["metrics"]["by_tag"]["tag=Object"]["text"] == pytest.approx(sum(per_tag["Object"]) / 2)
    assert rep["metrics"]["by_tag"]["tag=Relation"]["items"] == 1


def _jsonl(tmp_path, examples, lines):
    for n, e in enumerate(examples):
        e.image.save(tmp_path / f"{n}.png")
    f = tmp_path / "set.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return f


def test_jsonl_both_item_kinds_and_ties(tiny, tmp_path, examples):
    lines = [
        {"image": "0.png", "texts": [examples[1].caption, examples[0].caption], "label": 1},
        {"images": ["2.png", "3.png", "4.png"], "text": examples[4].caption, "label": 2},
        {"image": "5.png", "texts": ["a cat", "a cat"], "label": 0},  # a tie: never right
    ]
    f = _jsonl(tmp_path, examples, lines)
    out = tmp_path / "out"
    assert main(["eval", "jsonl", "--data", str(f), "--model", "tiny", "--timesteps", str(T), "--out", str(out),
                 "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["metrics"]["ties"] == 1 and rep["items"][2]["scores"][0] == rep["items"][2]["scores"][1]
    right = 0
    for x, rec in zip(lines[:2], rep["items"]):
        s = torch.tensor(rec["scores"])
        assert rec["label"] == x["label"] and len(s) == len(x.get("texts", x.get("images")))
        right += strict_rank(s, x["label"]) == 0
    assert rep["metrics"]["accuracy"] == pytest.approx(right / 3)


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
    assert main(["eval", "jsonl", "--data", str(tmp_path / "none.jsonl"), "--model", "tiny", "--no-progress"]) == 2
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


def test_svo_accuracy_per_negative_type(tmp_path, examples):
    root = tmp_path / "data"
    rows = []
    for n, e in enumerate(examples):
        _save(e.image, root / "svo" / "images" / f"{n}.jpg")
    for n in range(0, 6, 2):
        rows.append({"sentence": examples[n].caption, "pos_id": f"{n}.jpg", "neg_id": f"{n + 1}.jpg",
                     "neg_type": ["subj", "verb", "obj"][n // 2]})
    (root / "svo" / "svo.json").write_text(json.dumps(rows))
    rep = _report("svo", root, tmp_path)
    assert rep["metrics"]["accuracy"] == pytest.approx(_accuracy_by_hand(rep))
    assert sorted(rep["metrics"]["by_tag"]) == ["neg_type=obj", "neg_type=subj", "neg_type=verb"]
    assert all(len(r["scores"]) == 2 and r["kind"] == "image" for r in rep["items"])


def test_imagecode_static_sets_only(tmp_path, examples):
    root = tmp_path / "data" / "imagecode"
    for name in ("open-images-1", "video-clip-7"):
        for k, e in enumerate(examples):
            _save(e.image, root / "image-sets" / name / f"img{k}.jpg")
    (root / "valid_data.json").write_text(json.dumps({
        "open-images-1": {"3": examples[3].caption, "5": examples[5].caption},
        "video-clip-7": {"0": "a video frame"}}))
    rep = _report("imagecode", tmp_path / "data", tmp_path)
    assert [r["label"] for r in rep["items"]] == [3, 5] and len(rep["items"][0]["scores"]) == 6
    assert rep["metrics"]["R@1"] == pytest.approx(_accuracy_by_hand(rep))
    ranks = [strict_rank(torch.tensor(r["scores"]), r["label"]) for r in rep["items"]]
    assert rep["metrics"]["R@5"] == pytest.approx(sum(r < 5 for r in ranks) / 2)


def test_clevr_seven_subtasks(tmp_path, examples):
    from fastitm.evaluate.tasks import CLEVR_SUBTASKS

    root = tmp_path / "clevr"
    _save(examples[0].image, root / "images" / "a.png")
    for sub in CLEVR_SUBTASKS:
        caps = ["left", "a red circle left of a square", "a red circle right of a square"] if sub == "spatial" \
            else [examples[0].caption, examples[1].caption]
        (root / "captions").mkdir(parents=True, exist_ok=True)
        (root / "captions" / f"{sub}.json").write_text(json.dumps({"a.png": [caps]}))
    rep = _report("clevr", root, tmp_path)
    assert len(rep["metrics"]["by_tag"]) == 7 and rep["metrics"]["items"] == 7
    items = load_task("clevr", root)
    spatial = next(i for i in items if i.tags["subtask"] == "spatial")
    assert spatial.texts == ["a red circle left of a square", "a red circle right of a square"]
    assert rep["metrics"]["accuracy"] == pytest.approx(_accuracy_by_hand(rep))


@pytest.mark.parametrize("task", ["vg_relation", "vg_attribution"])
def test_visual_genome_crops_to_the_box(tiny, tmp_path, examples, task):
    root = tmp_path / "aro"
    big = Image.new("RGB", (40, 30), "white")
    big.paste(examples[0].image, (10, 5))
    _save(big, root / "images" / "1.jpg")
    name = task.split("_")[1]
    row = {"image_path": "1.jpg", "bbox_x": 10, "bbox_y": 5, "bbox_w": 16, "bbox_h": 16,
           "true_caption": examples[0].caption, "false_caption": examples[1].caption,
           "relation_name": "left of", "attributes": ["red", "blue"]}
    (root / f"visual_genome_{name}.json").write_text(json.dumps([row, row]))
    rep = _report(task, root, tmp_path)
    crop = Image.open(root / "images" / "1.jpg").convert("RGB").crop((10, 5, 26, 21))
    want = fastitm.score([crop], [examples[0].caption, examples[1].caption], model=tiny, timesteps=2, seed=0).matrix[0]
    torch.testing.assert_close(torch.tensor(rep["items"][0]["scores"]), want, rtol=1e-5, atol=1e-4)
    assert rep["metrics"]["accuracy"] == pytest.approx(_accuracy_by_hand(rep))


def test_pets_uses_diffusion_classifier_with_elimination(tmp_path, examples):
    root = tmp_path / "pets"
    classes = ["abyssinian", "basset hound", "beagle", "bombay", "boxer", "pug", "sphynx"]
    (root).mkdir()
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    _save(examples[0].image, root / "images" / "Basset_hound_12.jpg")
    _save(examples[1].image, root / "images" / "pug_3.jpg")
    out = tmp_path / "pets-out"
    assert main(["eval", "pets", "--data", str(root), "--model", "tiny", "--timesteps", "5", "--out", str(out),
                 "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == "diffusion_classifier" and rep["options"]["elimination"] == [[1, 5], [2, 1]]
    assert [r["label"] for r in rep["items"]] == [1, 5]
    for r in rep["items"]:  # one survivor per image, the rest eliminated (null)
        assert sum(v is not None for v in r["scores"]) == 1
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
    for n, (g, folder) in enumerate(groups.items()):
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


def test_coco_order_through_the_cli(tmp_path, examples, monkeypatch):
    from fastitm.evaluate import order

    monkeypatch.setattr(order, "TAGGER", lambda t: [(w, "NN" if len(w) > 4 else "JJ") for w in t.split()])
    monkeypatch.setattr(order, "TOKENIZER", lambda t: t.split())
    root = tmp_path / "data" / "coco_order"
    _save(examples[0].image, root / "val2014" / "x.jpg")
    (root / "coco_karpathy_test.json").write_text(json.dumps(
        [{"image": "val2014/x.jpg", "caption": [examples[0].caption, examples[2].caption]}]))
    rep = _report("coco_order", tmp_path / "data", tmp_path)
    assert rep["metrics"]["items"] == 2 and all(len(r["scores"]) == 5 for r in rep["items"])
    assert rep["metrics"]["R@1"] == pytest.approx(_accuracy_by_hand(rep))


def test_order_tasks_say_what_model_is_missing(tmp_path, monkeypatch):
    from fastitm.evaluate import order

    monkeypatch.setattr(order, "TAGGER", None)
    monkeypatch.setitem(__import__("sys").modules, "spacy", None)  # as if spaCy were not installed
    root = tmp_path / "flickr30k"
    root.mkdir()
    (root / "flickr30k_val.json").write_text(json.dumps([{"image": "a.jpg", "caption": ["a dog"]}]))
    with pytest.raises(DataError, match="en_core_web_sm"):
        load_task("flickr30k_order", tmp_path)
