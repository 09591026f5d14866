"""Zero-shot classification (``fastitm eval classify``): every released layout read back to the images
written, the prompt CSV's checks, the metrics against torchmetrics, and a run on the tiny model whose
scores equal scoring each image alone, with the prompts encoded once per run."""

import json

import numpy as np
import pytest
import torch

from fastitm.evaluate.generate_classify import LAYOUTS, draw, object_classes, write_classification, write_prompts
from fastitm.evaluate.items import DataError, Item
from fastitm.evaluate.metrics import classify_metrics
from fastitm.evaluate.runner import _decode
from fastitm.evaluate.tasks import load_task
from fastitm.evaluate.tasks_classify import detect, read_prompts

CLASSES = object_classes()[:3]
NAMES = [s.caption[2:] for s in CLASSES]  # "big red circle", ...


def _expected(layout, image):
    """The pixels a layout stores for an image: fixed sizes for the binary formats, grey for MNIST."""
    im = image.convert("RGB")
    side = {"cifar10": 32, "cifar100": 32, "stl10": 96, "mnist": 28}.get(layout)
    if layout == "mnist":
        im = image.convert("L").resize((28, 28)).convert("RGB")
    elif side:
        im = im.resize((side, side))
    return np.asarray(im)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_back_what_was_written(layout, tmp_path):
    images, labels = draw(CLASSES, 2, seed=3)
    write_classification(layout, tmp_path, images, labels, NAMES)
    prompts = write_prompts(tmp_path / "p.csv", NAMES) if layout == "flowers102" else None  # no names released
    items = load_task("classify", tmp_path, prompts=prompts)
    assert detect(tmp_path)[0] == layout
    assert len(items) == len(images)  # caltech's BACKGROUND_Google and objectnet's unmapped folder left out
    n_classes = 10 if layout == "mnist" else 3  # MNIST's class names are the ten digits'
    for item in items:
        assert item.kind == "text" and item.classes == list(range(n_classes)) and len(item.texts) == n_classes
    if layout == "mnist":  # classes by index: "0 - zero", ...
        got = sorted((item.label, np.asarray(_decode(item)[0]).tobytes()) for item in items)
        want = sorted((c, _expected(layout, im).tobytes()) for im, c in zip(images, labels, strict=True))
        assert got == want
        return
    # the class of each item is the one written, by name (a layout's own class order may differ)
    got = sorted((item.tags["class"].replace("_", " ").lower(), np.asarray(_decode(item)[0]).tobytes())
                 for item in items)
    want = sorted((NAMES[c], _expected(layout, im).tobytes()) for im, c in zip(images, labels, strict=True))
    assert got == want
    for item in items:  # the label indexes the prompt of the item's class
        name = item.tags["class"].replace("_", " ").lower()
        assert name in item.texts[item.label].lower()


def test_splits_and_missing_names(tmp_path):
    images, labels = draw(CLASSES, 1, seed=0)
    write_classification("cifar10", tmp_path / "c", images, labels, NAMES)
    with pytest.raises(DataError, match="splits .*'test', 'train'.*'val'"):
        load_task("classify", tmp_path / "c", split="val")
    write_classification("flowers102", tmp_path / "f", images, labels, NAMES)
    with pytest.raises(DataError, match="names no classes.*--prompts"):
        load_task("classify", tmp_path / "f")
    with pytest.raises(DataError, match="no dataset found"):
        load_task("classify", tmp_path / "f" / "flowers-102" / "jpg")


@pytest.mark.parametrize("text, error", [
    ("prompt,classname\na,x\n", r"no column\(s\) \['classidx'\]"),
    ("prompt,classname,classidx\na,x,0\nb,y,1\na,y,1\n", "p.csv:4: the prompt 'a' repeats line 2"),
    ("prompt,classname,classidx\na,x,0\nb,y,2\n", r"\[1\] have no prompt"),
    ("prompt,classname,classidx\na,x,0\nb,y,0\n", "class 0 is named 'y' here and 'x' above"),
    ("prompt,classname,classidx\na,x,zero\nb,y,1\n", "p.csv:2: classidx 'zero' is not a whole number"),
])
def test_prompt_file_checks(tmp_path, text, error):
    p = tmp_path / "p.csv"
    p.write_text(text)
    with pytest.raises(DataError, match=error):
        read_prompts(p)


def test_prompts_must_cover_the_data_and_belong_to_classify(tmp_path):
    p = tmp_path / "p.csv"
    images, labels = draw(CLASSES, 1, seed=0)
    write_classification("stl10", tmp_path / "s", images, labels, NAMES)
    write_prompts(p, NAMES[:2])
    with pytest.raises(DataError, match="has 2 classes but the stl10 data .* has 3"):
        load_task("classify", tmp_path / "s", prompts=p)
    with pytest.raises(ValueError, match="classify task's class prompts"):
        load_task("pets", tmp_path / "s", prompts=p)


def test_metrics_match_torchmetrics():
    from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

    g = torch.Generator().manual_seed(5)
    C, n = 7, 60
    classes = [0, 1, 2, 3, 4, 5, 6, 2, 5]  # classes 2 and 5 have two prompts: a class scores as its best
    items, mats, class_scores = [], [], []
    for k in range(n):
        s = torch.randn(len(classes), generator=g)
        label = int(torch.randint(C, (1,), generator=g))
        items.append(Item(str(k), "text", ["x"], ["t"] * len(classes), label, {"class": f"c{label}"}, classes=classes))
        mats.append(s[None])
        best = torch.full((C,), -torch.inf)
        for j, c in enumerate(classes):
            best[c] = max(best[c], s[j])
        class_scores.append(best)
    m = classify_metrics(items, mats)
    preds, target = torch.stack(class_scores), torch.tensor([i.label for i in items])
    assert m["accuracy"] == pytest.approx(MulticlassAccuracy(C, top_k=1, average="micro")(preds, target).item())
    assert m["top5"] == pytest.approx(MulticlassAccuracy(C, top_k=5, average="micro")(preds, target).item())
    per_class = MulticlassAccuracy(C, average=None)(preds, target)
    for c in range(C):
        assert m["by_tag"][f"class=c{c}"]["accuracy"] == pytest.approx(per_class[c].item())
    assert m["class_mean_accuracy"] == pytest.approx(per_class.mean().item())
    cm = MulticlassConfusionMatrix(C)(preds, target)
    assert {(t, p): k for t, p, k in m["confusion"]} == {(t, p): int(cm[t, p]) for t in range(C) for p in range(C)
                                                       if cm[t, p]}


def test_eval_classify_equals_each_image_alone_and_encodes_prompts_once(tmp_path, capsys):
    import fastitm
    from fastitm.cli import main
    from fastitm.testing import tiny_model

    images, labels = draw(CLASSES, 2, seed=11, size=16)
    write_classification("cifar10", tmp_path / "d", images, labels, NAMES)
    # two prompts for class 1: it scores as the better of them
    prompts = write_prompts(tmp_path / "p.csv", NAMES, extra={1: ["a drawing of a thing."]})
    out = tmp_path / "out"
    assert main(["eval", "classify", "--data", str(tmp_path / "d"), "--prompts", str(prompts), "--model", "tiny",
                 "--method", "diffusion_classifier", "--timesteps", "3", "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "confusion.png").is_file()
    assert report["stats"]["text_encodes"] == 4  # the 4 prompts once, not once per image (6 images)
    texts = read_prompts(prompts).texts
    model = tiny_model()
    items = load_task("classify", tmp_path / "d", prompts=prompts)
    plan = fastitm.make_plan(model, 3, seed=0)
    right = 0
    for item, record in zip(items, report["items"], strict=True):
        alone = fastitm.score(_decode(item), texts, model=model, method="diffusion_classifier", plan=plan,
                              progress=False).matrix[0]
        torch.testing.assert_close(torch.tensor(record["scores"]), alone.float(), rtol=1e-5, atol=1e-6)
        # the class rule on the run's own scores: class 1 is the better of prompts 1 and 3, a tie is never
        # right (scored alone, a near tie may fall either way: the floats agree only to rounding)
        s = torch.tensor(record["scores"])
        per_class = torch.stack([s[0], torch.maximum(s[1], s[3]), s[2]])
        right += int((per_class >= per_class[record["label"]]).sum()) == 1
    assert report["metrics"]["accuracy"] == pytest.approx(right / len(items))


def test_imagenet_val_folders_take_the_prompts_in_sorted_folder_order(tmp_path):
    """ImageNet's val/<wnid>/ folders name no classes: the prompt CSV's classidx follows the sorted
    folder names, as torchvision's ImageFolder orders them; without --prompts the task refuses."""
    images, labels = draw(CLASSES, 1, seed=2)
    wnids = ["n02000002", "n01000001", "n03000003"]  # written in this order; read sorted
    write_classification("folder", tmp_path / "val", images, labels, wnids)
    with pytest.raises(DataError, match="WordNet ids.*--prompts"):
        load_task("classify", tmp_path / "val")
    prompts = write_prompts(tmp_path / "p.csv", ["sorted first", "sorted second", "sorted third"])
    items = load_task("classify", tmp_path / "val", prompts=prompts)
    by_folder = {it.id.split("/")[0]: it.label for it in items}
    assert by_folder == {"n01000001": 0, "n02000002": 1, "n03000003": 2}


def test_calibrate_refuses_several_prompts_per_class(tmp_path):
    """Calibration fits weights on the true candidate's per-timestep differences with each other one:
    a class that scores as its best of several prompts has none, so it is refused before any model."""
    import fastitm

    images, labels = draw(CLASSES, 4, seed=5)
    write_classification("folder", tmp_path / "d", images, labels, NAMES)
    prompts = write_prompts(tmp_path / "p.csv", NAMES, extra={0: ["a drawing of a thing."]})
    with pytest.raises(ValueError, match="one prompt per class"):
        fastitm.evaluate.calibrate("classify", tmp_path / "d", method="diffusion_classifier", prompts=prompts,
                                   limit=10, folds=5, progress=False)
