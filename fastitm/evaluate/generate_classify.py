"""Classification sets in each released layout the classify task reads
(:mod:`fastitm.evaluate.tasks_classify`), drawn from :mod:`fastitm.data`'s vocabulary: the embedded
model runs ``fastitm eval classify`` end to end on them with no download, and the tests check every
reader against the images written.

- :func:`object_classes` / :func:`composition_classes`: the embedded model's many-class tasks, its 48
  single objects ("a big red circle") or two-object compositions ("a red circle left of a blue
  square"), each with images drawn from a seed;
- :func:`write_classification`: images, labels and class names as one layout's files.
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

from .. import data

LAYOUTS = ("folder", "cifar10", "cifar100", "stl10", "mnist", "flowers102", "food101", "pets", "aircraft",
           "caltech101", "objectnet")


def object_classes() -> list:
    """The 48 one-object scenes (6 colours x 4 shapes x 2 sizes), in a fixed order."""

    return [data.Scene((data.Obj(c, sh, sz),)) for sz in data.SIZES for c in data.COLORS for sh in data.SHAPES]


def composition_classes(n: int, seed: int = 0) -> list:
    """``n`` two-object scenes (of the 2,208 with two different objects), drawn with ``seed``."""

    objs = [data.Obj(c, sh) for c in data.COLORS for sh in data.SHAPES]
    every = [data.Scene((a, b), r) for a in objs for b in objs if a != b for r in data.RELATIONS]
    if not 2 <= n <= len(every):
        raise ValueError(f"n must be 2..{len(every)}, got {n}")
    return random.Random(seed).sample(every, n)


def draw(classes: list, per_class: int, seed: int, size: int = 32) -> tuple[list, list[int]]:
    """(images, labels): ``per_class`` renderings of each scene (random positions), class-major."""

    rng = random.Random(seed)
    images, labels = [], []
    for c, scene in enumerate(classes):
        for _ in range(per_class):
            images.append(data.render(scene, rng, size=size))
            labels.append(c)
    return images, labels


def _save(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")  # lossless whatever the extension: the pixels read are the pixels drawn


def _rgb(images, side: int):
    import numpy as np

    return np.stack([np.asarray(im.convert("RGB").resize((side, side))) for im in images])


def _idx(path: Path, array) -> None:
    """An unsigned-byte idx file: 0x0000 08 ndim, big-endian dimensions, the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    head = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(head + array.astype("uint8").tobytes())


def write_classification(layout: str, out: str | Path, images: list, labels: list[int], names: list[str],
                         split: str = "test") -> Path:
    """Write the images (PIL), their labels and the class names as ``layout``'s released files under
    ``out`` (the torchvision ``root``); returns ``out``. Binary layouts resize to their fixed size
    (CIFAR 32, STL-10 96, MNIST 28, grey)."""
    import numpy as np

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; one of {LAYOUTS}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    slug = [n.replace(" ", "_") for n in names]
    if layout == "folder":
        for k, (im, c) in enumerate(zip(images, labels, strict=True)):
            _save(im, out / slug[c] / f"{k:05d}.png")
    elif layout in ("cifar10", "cifar100"):
        data = _rgb(images, 32).transpose(0, 3, 1, 2).reshape(len(images), -1)  # channel planes, row-major
        if layout == "cifar10":
            folder, file = out / "cifar-10-batches-py", "test_batch" if split == "test" else "data_batch_1"
            batch, meta = {"batch_label": split, "labels": list(labels), "data": data}, {"label_names": names}
            meta_file = "batches.meta"
        else:
            folder, file = out / "cifar-100-python", split
            batch = {"fine_labels": list(labels), "coarse_labels": [0] * len(labels), "data": data}
            meta, meta_file = {"fine_label_names": names, "coarse_label_names": ["all"]}, "meta"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / file).write_bytes(pickle.dumps(batch))
        (folder / meta_file).write_bytes(pickle.dumps(meta))
    elif layout == "stl10":
        folder = out / "stl10_binary"
        folder.mkdir(parents=True, exist_ok=True)
        # column-major planes: torchvision transposes (0, 1, 3, 2) on reading
        _rgb(images, 96).transpose(0, 3, 2, 1).astype("uint8").tofile(folder / f"{split}_X.bin")
        (np.asarray(labels, dtype=np.uint8) + 1).tofile(folder / f"{split}_y.bin")
        (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    elif layout == "mnist":
        stem = "t10k" if split == "test" else "train"
        grey = np.stack([np.asarray(im.convert("L").resize((28, 28))) for im in images])
        _idx(out / "MNIST" / "raw" / f"{stem}-images-idx3-ubyte", grey)
        _idx(out / "MNIST" / "raw" / f"{stem}-labels-idx1-ubyte", np.asarray(labels))
    elif layout == "flowers102":
        from scipy.io import savemat

        folder = out / "flowers-102"
        for k, im in enumerate(images, start=1):
            _save(im, folder / "jpg" / f"image_{k:05d}.jpg")
        savemat(folder / "imagelabels.mat", {"labels": np.asarray(labels)[None] + 1})
        ids = np.arange(1, len(images) + 1)[None]
        savemat(folder / "setid.mat", {"tstid": ids, "trnid": ids[:, :1], "valid": ids[:, :1]})
    elif layout == "food101":
        folder = out / "food-101"
        listing: dict[str, list[str]] = {s: [] for s in slug}
        for k, (im, c) in enumerate(zip(images, labels, strict=True)):
            _save(im, folder / "images" / slug[c] / f"{k}.jpg")
            listing[slug[c]].append(f"{slug[c]}/{k}")
        (folder / "meta").mkdir(parents=True, exist_ok=True)
        (folder / "meta" / f"{split}.json").write_text(json.dumps(listing))
        (folder / "meta" / "classes.txt").write_text("\n".join(sorted(slug)) + "\n")
    elif layout == "pets":
        folder = out / "oxford-iiit-pet"
        lines = []
        for k, (im, c) in enumerate(zip(images, labels, strict=True)):
            image_id = f"{slug[c]}_{k + 1}"
            _save(im, folder / "images" / f"{image_id}.jpg")
            lines.append(f"{image_id} {c + 1} {1 + c % 2} {c + 1}")
        (folder / "annotations").mkdir(parents=True, exist_ok=True)
        (folder / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    elif layout == "aircraft":
        folder = out / "fgvc-aircraft-2013b" / "data"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "variants.txt").write_text("\n".join(names) + "\n")
        lines = []
        for k, (im, c) in enumerate(zip(images, labels, strict=True)):
            _save(im, folder / "images" / f"{1000000 + k}.jpg")
            lines.append(f"{1000000 + k} {names[c]}")
        (folder / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    elif layout == "caltech101":
        folder = out / "caltech101" / "101_ObjectCategories"
        counts: dict[int, int] = {}
        for im, c in zip(images, labels, strict=True):
            counts[c] = counts.get(c, 0) + 1
            _save(im, folder / slug[c] / f"image_{counts[c]:04d}.jpg")
        _save(images[0], folder / "BACKGROUND_Google" / "image_0001.jpg")  # not a class: the reader leaves it out
    else:  # objectnet: a 2-pixel border (the published loader crops it), and one folder ImageNet lacks
        from PIL import ImageOps

        folder = out / "objectnet-1.0"
        for k, (im, c) in enumerate(zip(images, labels, strict=True)):
            _save(ImageOps.expand(im.convert("RGB"), border=2, fill=(255, 0, 0)), folder / "images" / slug[c] / f"{k}.png")
        _save(images[0], folder / "images" / "not_in_imagenet" / "0.png")
        (folder / "mappings").mkdir(parents=True, exist_ok=True)
        labels_of = {s: n for s, n in zip(slug, names, strict=True)} | {"not_in_imagenet": "Not In ImageNet"}
        (folder / "mappings" / "folder_to_objectnet_label.json").write_text(json.dumps(labels_of))
        (folder / "mappings" / "objectnet_to_imagenet_1k.json").write_text(json.dumps({n: "x" for n in names}))
    return out


def write_prompts(path: str | Path, names: list[str], extra: dict[int, list[str]] | None = None) -> Path:
    """A prompt CSV in the published header: "a photo of a <name>." per class, then ``extra`` prompts."""
    import csv

    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "classname", "classidx"])
        for c, n in enumerate(names):
            w.writerow([f"a photo of a {n}.", n, c])
        for c, texts in (extra or {}).items():
            for t in texts:
                w.writerow([t, names[c], c])
    return path
