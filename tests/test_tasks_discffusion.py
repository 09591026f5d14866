"""The Discffusion paper's tasks (comvg, vqa, refcocog, vlchecklist) on verbatim excerpts of their released
files (tests/fixtures/released/SOURCES.md), their metrics by hand, the published item lists rebuilt
here the way the published code builds them, and the few-shot protocol's split."""

import csv
import json
import pickle
import random
import shutil
import warnings

import pytest
import released
import torch

from fastitm.cli import main
from fastitm.evaluate.fewshot import fewshot
from fastitm.evaluate.tasks import DataError, load_task

FIX = released.RELEASED


def _first(ref):
    return ref[0] if isinstance(ref, tuple) else ref


def _images(items, root):
    """A synthetic image at the first layout of every image the items name."""
    from pathlib import Path

    released.write_images(root, [Path(_first(p)).relative_to(root) for i in items for p in i.images])


def _eval(task, root, tmp_path, *extra, out="out"):
    assert main(["eval", task, "--data", str(root), "--model", "tiny", "--timesteps", "2", "--no-progress",
                 "--out", str(tmp_path / out), *extra]) == 0
    return json.loads((tmp_path / out / "report.json").read_text())


def _hand(records, labels=None):
    """accuracy (and R@5) from the report's per-item scores, ties counted wrong."""
    right, top5 = 0, 0
    for r in records:
        s = r["scores"]
        above = sum(v >= s[0] for v in s[1:])
        right += above == 0
        top5 += above < 5
    return right / len(records), top5 / len(records)


# ---- ComVG --------------------------------------------------------------------------------------------

@pytest.fixture
def comvg(tmp_path):
    root = tmp_path / "comvg"
    root.mkdir()
    shutil.copy(FIX / "discffusion" / "compositional_visual_genome.csv", root)
    _images(load_task("comvg", root), root)
    return root


def test_comvg_items_splits_and_metrics(comvg, tmp_path):
    rows = list(csv.DictReader(open(comvg / "compositional_visual_genome.csv")))
    items = load_task("comvg", comvg)
    assert [i.id for i in items] == [r["id"] for r in rows]
    for i, r in zip(items, rows, strict=True):
        assert i.kind == "image" and i.texts == [r["sentence"]] and i.label == 0
        assert _first(i.images[0]).endswith(f"vg_concept/{r['pos_image_id']}.jpg")
        assert _first(i.images[1]).endswith(f"vg_concept/{r['neg_image_id']}.jpg")
        assert i.tags == {"neg_value": r["neg_value"]}
    assert [i.id for i in load_task("comvg", comvg, "verb")] == ["4121", "4122", "4123"]
    assert [i.id for i in load_task("comvg", comvg, "sub,sub")] == ["1", "2", "3"]  # ComVG_sub; named twice: once
    with pytest.raises(DataError, match=r"comvg: unknown split \['adjective'\]"):
        load_task("comvg", comvg, "adjective")
    rep = _eval("comvg", comvg, tmp_path)
    assert rep["metrics"]["accuracy"] == pytest.approx(_hand(rep["items"])[0])
    for value in ("subject", "object", "verb"):
        mine = [r for r in rep["items"] if r["tags"]["neg_value"] == value]
        assert rep["metrics"]["by_tag"][f"neg_value={value}"]["accuracy"] == pytest.approx(_hand(mine)[0])
        assert rep["metrics"]["by_tag"][f"neg_value={value}"]["items"] == 3


# ---- VQA ----------------------------------------------------------------------------------------------

@pytest.fixture
def vqa(tmp_path):
    root = tmp_path / "vqav2"
    root.mkdir()
    for f in ("vqa_text_test.csv", "test.txt"):
        shutil.copy(FIX / "discffusion" / f, root)
    _images(load_task("vqa", root), root)
    return root


def _binary_lines(root):
    out = []
    for line in (root / "test.txt").read_text().splitlines():
        image, text = line.strip().split("*")
        if "The question is asking about yes or no" in text:
            out.append((image, text.split(": ", 1)[-1]))
    return out


def test_vqa_other_and_binary_items(vqa):
    rows = list(csv.DictReader(open(vqa / "vqa_text_test.csv")))
    other = load_task("vqa", vqa, "other")
    assert len(other) == 8
    for i, r in zip(other, rows, strict=True):
        assert i.kind == "text" and i.texts == [r["sentence"]] + [r[f"neg_sentence_{k}"] for k in range(1, 10)]
        assert _first(i.images[0]).endswith(f"val2014/COCO_val2014_{r['pos_image_id'].zfill(12)}.jpg")
    # the two positives answering yes or no (no negative does)
    assert [i.tags["answer"] for i in other].count("yes/no") == 2
    assert {i.texts[0] for i in other if i.tags["answer"] == "yes/no"} == {"Is anyone wearing a hat? no",
                                                                           "Is this broccoli? no"}
    lines = _binary_lines(vqa)
    binary = load_task("vqa", vqa, "binary")
    assert [i.texts for i in binary] == [[t] for _, t in lines] and len(binary) == 15
    for i, (image, _) in zip(binary, lines, strict=True):
        names = [_first(p).rsplit("/", 1)[1] for p in i.images]
        assert names[0] == image and image not in names[1:] and len(set(names[1:])) == 9
    assert [i.id for i in load_task("vqa", vqa)] == [i.id for i in other + binary]  # both by default
    assert [i.images for i in load_task("vqa", vqa, "binary")] == [i.images for i in binary]  # seeded


def test_vqa_binary_published_draw(vqa):
    # dsd_infer.py: random.seed(args.seed) (0), then VQADataset_eval.load_data draws, line by line,
    # random.sample([neg for neg in all_imgs if neg != img_path], 9) from every binary line's image
    lines = _binary_lines(vqa)
    all_imgs = [image for image, _ in lines]
    state = random.getstate()
    random.seed(0)
    want = [random.sample([neg for neg in all_imgs if neg != image], 9) for image, _ in lines]
    random.setstate(state)
    got = load_task("vqa", vqa, "binary", preset="published")
    assert [[_first(p).rsplit("/", 1)[1] for p in i.images[1:]] for i in got] == want


def test_vqa_metrics_by_subset_and_answer(vqa, tmp_path):
    rep = _eval("vqa", vqa, tmp_path)
    acc, r5 = _hand(rep["items"])
    assert rep["metrics"]["R@1"] == pytest.approx(acc) and rep["metrics"]["R@5"] == pytest.approx(r5)
    by = rep["metrics"]["by_tag"]
    for key, sel in (("subset=other", lambda r: r["tags"]["subset"] == "other"),
                     ("subset=binary", lambda r: r["tags"]["subset"] == "binary"),
                     ("answer=yes/no", lambda r: r["tags"].get("answer") == "yes/no")):
        mine = [r for r in rep["items"] if sel(r)]
        assert by[key]["items"] == len(mine)
        assert (by[key]["R@1"], by[key]["R@5"]) == pytest.approx(_hand(mine))
    assert by["answer=yes/no"]["items"] == 2


# ---- RefCOCOg -----------------------------------------------------------------------------------------

CATS = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]


def _refs(split_names):
    """REFER-format refs over 15 images: two refs per image, 1-2 expressions each."""
    refs, sent_id = [], 100
    for n in range(30):
        image_id = 1000 + n // 2
        sents = []
        for k in range(1 + n % 2):
            sents.append({"raw": f"the {['left', 'right'][k]} {['man', 'dog'][n % 2]} number {n}",
                          "sent_id": sent_id, "tokens": [], "sent": ""})
            sent_id += 1
        refs.append({"ref_id": 500 + n, "ann_id": 9000 + n, "image_id": image_id, "category_id": [1, 18][n % 2],
                     "split": split_names[n % len(split_names)], "sentences": sents,
                     "sent_ids": [s["sent_id"] for s in sents], "file_name": f"COCO_train2014_{image_id:012d}_{9000 + n}.jpg"})
    return refs


@pytest.fixture
def refcocog(tmp_path):
    root = tmp_path / "refcocog"
    root.mkdir()
    with open(root / "refs(google).p", "wb") as f:
        pickle.dump(_refs(["train", "train", "val"]), f)
    with open(root / "refs(umd).p", "wb") as f:
        pickle.dump(_refs(["train", "val", "test"]), f)
    images = [{"id": 1000 + k, "file_name": f"COCO_train2014_{1000 + k:012d}.jpg", "height": 8, "width": 8}
              for k in range(15)]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": [], "categories": CATS}))
    released.write_images(root, [f"images/train2014/{im['file_name']}" for im in images])
    return root


def _published_pairs(refs):
    """RefcocogRetrieval.prepare_data (mode 'text') after random.seed(0), as the published code runs it."""
    state = random.getstate()
    random.seed(0)
    pairs, all_refs = [], list(refs)
    for ref in refs:
        for sent in ref["sentences"]:
            pos_text = sent["raw"]
            pairs.append((sent["sent_id"], pos_text, ref["image_id"], 1))
            n = 0
            while n < 9:
                neg_ref = random.choice(all_refs)
                neg_text = random.choice(neg_ref["sentences"])["raw"]
                if neg_text != pos_text:
                    pairs.append((sent["sent_id"], neg_text, ref["image_id"], 0))
                    n += 1
    random.setstate(state)
    return pairs


def test_refcocog_published_item_list(refcocog):
    with open(refcocog / "refs(google).p", "rb") as f:
        pairs = _published_pairs(pickle.load(f))
    train_size = int(0.05 * len(pairs))
    train_size -= train_size % 10
    rest = pairs[train_size:]
    want = [[t for _, t, _, _ in rest[k:k + 10]] for k in range(0, len(rest), 10)]
    got = load_task("refcocog", refcocog.parent, preset="published")  # the published data root holds refcocog/
    assert [i.texts for i in got if not i.dropped] == [w for w in want if w[0] not in w[1:]]
    assert len(got) == len(want) == len(pairs) // 10 - train_size // 10 == 45 - 2
    # the few-shot split of the same list: its first int(fraction x pairs) pairs (whole items) train
    part = fewshot("refcocog", refcocog, 0.1, preset="published")  # 45 of 450 pairs: the first 4 items
    every = [[t for _, t, _, _ in pairs[k:k + 10]] for k in range(0, len(pairs), 10)]
    assert [i.texts for i in part.train] == every[:4] and len(part.test) == len(every) - 4
    assert [i.texts for i in part.test if not i.dropped] == [w for w in every[4:] if w[0] not in w[1:]]
    with pytest.raises(DataError, match="pools every split"):
        load_task("refcocog", refcocog, "val", preset="published")


def test_refcocog_clean_split_negatives_from_other_images(refcocog, tmp_path):
    refs = {r["ref_id"]: r for r in _refs(["train", "train", "val"])}
    val = [r for r in refs.values() if r["split"] == "val"]
    items = load_task("refcocog", refcocog)  # google val by default
    assert [i.texts[0] for i in items] == [s["raw"] for r in val for s in r["sentences"]]
    image_of = {s["raw"]: r["image_id"] for r in val for s in r["sentences"]}
    for item, (ref, sent) in zip(items, [(r, s) for r in val for s in r["sentences"]], strict=True):
        negs = item.texts[1:]
        assert len(negs) == 9 == len(set(negs)) and sent["raw"] not in negs
        assert all(image_of[t] != ref["image_id"] for t in negs)  # never an expression of the same image
        assert item.tags == {"category": {1: "person", 18: "dog"}[ref["category_id"]]}
    assert [i.texts for i in load_task("refcocog", refcocog)] == [i.texts for i in items]  # seeded
    assert len(load_task("refcocog", refcocog, "umd_test")) == 15
    rep = _eval("refcocog", refcocog, tmp_path)
    assert (rep["metrics"]["R@1"], rep["metrics"]["R@5"]) == pytest.approx(_hand(rep["items"]))


# ---- VL-CheckList -------------------------------------------------------------------------------------

@pytest.fixture
def vlc(tmp_path):
    root = tmp_path / "vlc"
    shutil.copytree(FIX / "vlchecklist", root)
    return root


def test_vlchecklist_items_missing_images_and_axes(vlc, tmp_path, capsys):
    with pytest.warns(UserWarning, match=r"VL-CheckList: 15 of 15 entries name images that are missing"):
        items = load_task("vlchecklist", vlc)
    assert len(items) == 15 and {i.tags["aspect"] for i in items} == {"Attribute", "Object", "Relation"}
    color = json.loads((vlc / "data/Attribute/vg/color.json").read_text())
    first = [i for i in items if i.tags["file"] == "Attribute/color/vg"]
    assert [i.texts for i in first] == [[e[1]["POS"][0], e[1]["NEG"][0]] for e in color]
    assert first[0].images == [str(vlc / "vg" / color[0][0])] and first[0].tags["axis"] == "Attribute/color"
    # the vg and swig images exist, hake's do not: counted and named, then listed by --skip-bad
    have = [i for i in items if not i.tags["file"].endswith("hake")]
    released.write_images(vlc, [i.images[0][len(str(vlc)) + 1:] for i in have])
    with pytest.warns(UserWarning, match=r"3 of 15 entries .*Object/Location/margin/hake: 3"):
        load_task("vlchecklist", vlc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = _eval("vlchecklist", vlc, tmp_path, "--skip-bad")
    assert len(rep["skipped"]) == 3 and all("hake" in s["id"] for s in rep["skipped"])
    by = rep["metrics"]["by_tag"]
    files = {}
    for r in rep["items"]:
        files.setdefault(r["tags"]["file"], []).append(r)
    for f, recs in files.items():
        assert by[f"file={f}"]["accuracy"] == pytest.approx(_hand(recs)[0])
    loc = [r for r in rep["items"] if r["tags"]["subtype"] == "Object/Location"]
    assert by["subtype=Object/Location"]["accuracy"] == pytest.approx(_hand(loc)[0]) and len(loc) == 3
    # an axis is the mean of its files, an aspect the mean of its axes
    axes = rep["metrics"]["axes"]
    assert axes["Attribute/color"] == pytest.approx(_hand(files["Attribute/color/vg"])[0])
    assert axes["Object/Location/margin"] == pytest.approx(_hand(files["Object/Location/margin/swig_agent"])[0])
    assert rep["metrics"]["Attribute_mean"] == pytest.approx((axes["Attribute/color"] + axes["Attribute/state"]) / 2)
    assert rep["metrics"]["Relation_mean"] == pytest.approx(axes["Relation/spatial"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert {i.tags["aspect"] for i in load_task("vlchecklist", vlc, "Attribute,Relation/spatial")} == \
            {"Attribute", "Relation"}
    with pytest.raises(DataError, match="no corpus file matches"):
        load_task("vlchecklist", vlc, "Object/Size")


# ---- few-shot: train on 5%, test on the rest ------------------------------------------------------------

def test_fewshot_comvg_trains_on_its_training_file_and_tests_on_the_test_file(comvg):
    with open(comvg / "comvg_train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "pos_image_id", "neg_image_id"])
        for n in range(60):
            w.writerow([f"a man holds object {n}", 10 + n, 500 + n])
    part = fewshot("comvg", comvg, 0.05)
    assert len(part.train) == 3 and [i.texts for i in part.train] == [[f"a man holds object {n}"] for n in range(3)]
    assert _first(part.train[0].images[0]).endswith("VG_100K/10.jpg")
    assert [i.id for i in part.test] == [i.id for i in load_task("comvg", comvg)]
    assert part.record == {"fewshot": 0.05, "task": "comvg", "split": None, "train_from": "comvg_train.csv",
                           "train_items": 3, "test_items": 9}


def test_fewshot_in_two_commands_never_scores_a_trained_item(refcocog, tmp_path):
    part = fewshot("refcocog", refcocog, 0.25)
    every = load_task("refcocog", refcocog)  # google val: 15 expressions, the first 3 train
    assert [i.id for i in part.train] == [i.id for i in every[:3]] and [i.id for i in part.test] == \
        [i.id for i in every[3:]]
    tiny = tmp_path / "tiny"
    from fastitm.testing import tiny_model

    tiny_model(0).save(tiny)
    adapter = tmp_path / "adapter"
    assert main(["finetune", "--recipe", "discffusion", "--task", "refcocog", "--data", str(refcocog), "--fewshot",
                 "0.25", "--out", str(adapter), "--model", str(tiny), "--steps", "2", "--batch-size", "1",
                 "--no-progress"]) == 0
    card = json.loads((adapter / "training.json").read_text())
    assert card["args"]["fewshot"] == part.record and card["args"]["examples"] == len(part.train) == 3
    assert main(["eval", "refcocog", "--data", str(refcocog), "--model", str(tiny), "--lora", str(adapter),
                 "--fewshot", "0.25", "--timesteps", "2", "--no-progress", "--out", str(tmp_path / "ev")]) == 0
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert [r["id"] for r in rep["items"]] == [i.id for i in part.test]
    assert not {r["id"] for r in rep["items"]} & {i.id for i in part.train}
    assert rep["stats"]["fewshot"] == part.record and rep["evaluation"]["lora"] == str(adapter)
    # the adapter changes the scores: the same items without it
    assert main(["eval", "refcocog", "--data", str(refcocog), "--model", str(tiny), "--fewshot", "0.25",
                 "--timesteps", "2", "--no-progress", "--out", str(tmp_path / "ev0")]) == 0
    plain = json.loads((tmp_path / "ev0" / "report.json").read_text())
    assert [r["scores"] for r in plain["items"]] != [r["scores"] for r in rep["items"]]
    torch.testing.assert_close(torch.tensor(len(plain["items"])), torch.tensor(len(rep["items"])))


def test_published_discffusion_runs_each_task_as_dsd_infer(comvg, tmp_path, capsys):
    """dsd_infer.py per task: the README's --sampling_time_steps (ComVG 40, RefCOCOg 10, VQA 200; 30, its
    default, elsewhere), float16 on CUDA, and the method's published preset (layers, mixed empty-prompt
    batch, logits pooling, the use_bias term, latents, resizing, the scheme)."""
    from fastitm.core.presets import PUBLISHED
    from fastitm.evaluate.tasks_discffusion import published_choices

    assert [published_choices(t, "discffusion")["timesteps"] for t in ("comvg", "refcocog", "vqa", "vlchecklist")] \
        == [40, 10, 200, 30]
    assert published_choices("comvg", "discffusion")["dtype"] == "fp16" and published_choices("comvg", "diffusion_itm") == {}
    assert PUBLISHED["discffusion"]["options"] == {"layers": "published", "mix_uncond": True, "pool": "logits",
                                                   "denoise": True, "err": "l2"}
    rep = _eval("comvg", comvg, tmp_path, "--preset", "published", "--method", "discffusion", "--limit", "1",
                out="pub")
    assert len(rep["plan"]["timesteps"]) == 2  # _eval passes --timesteps 2: an explicit choice wins
    assert main(["eval", "comvg", "--data", str(comvg), "--model", "tiny", "--no-progress", "--preset", "published",
                 "--method", "discffusion", "--limit", "1", "--out", str(tmp_path / "pub40")]) == 0
    assert "40 timesteps for comvg, as dsd_infer.py runs it" in capsys.readouterr().err
    rep = json.loads((tmp_path / "pub40" / "report.json").read_text())
    assert len(rep["plan"]["timesteps"]) == 40 and rep["evaluation"]["timesteps"] == 40
    assert rep["choices"]["scheme"] == "discffusion" and rep["choices"]["latent"] == "sample_per_timestep"


@pytest.mark.parametrize("task", ["comvg", "vqa", "refcocog", "vlchecklist"])
def test_embedded_model_runs_each_task_on_a_generated_dataset(task, tmp_path):
    """The embedded model, end to end through the command line, on held-out scenes written in the task's
    released layout (fastitm.evaluate.generate)."""
    from fastitm.evaluate.generate import write_dataset

    root = write_dataset(task, tmp_path / task, n=10)
    assert main(["eval", task, "--data", str(root), "--timesteps", "2", "--limit", "4", "--no-progress",
                 "--out", str(tmp_path / "out")]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["stats"]["items"] == 4 and rep["model"]["source"].endswith("default_model")
    key = "R@1" if "R@1" in rep["metrics"] else "accuracy"
    assert rep["metrics"][key] == pytest.approx(_hand(rep["items"])[0])


def test_score_takes_lora(tmp_path, tiny_dir):
    """--lora on fastitm score: the adapter's model scores as load_model(lora=...) does."""
    import fastitm
    from fastitm.finetune import finetune

    adapter = finetune("discffusion", "synthetic", out=tmp_path / "adapter", model=fastitm.load_model(tiny_dir), steps=1,
                       batch_size=2, examples=2, progress=False)
    image = tmp_path / "img.png"
    released.image("score-lora").save(image)
    argv = ["score", "--model", str(tiny_dir), "--images", str(image), "--texts", "a dog", "a cat", "--timesteps", "2",
            "--no-progress", "--json"]
    assert main([*argv, str(tmp_path / "a.json"), "--lora", str(adapter)]) == 0
    got = json.loads((tmp_path / "a.json").read_text())["matrix"]
    want = fastitm.score([image], ["a dog", "a cat"], model=fastitm.load_model(tiny_dir, lora=adapter), timesteps=2,
                         seed=0).matrix
    torch.testing.assert_close(torch.tensor(got), want, rtol=1e-5, atol=2e-5)
