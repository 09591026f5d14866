"""Zero-shot classification, ``fastitm eval classify --data DIR [--prompts prompts.csv]``: every image
against every class prompt, the Diffusion Classifier's task (Li et al. 2023, ``eval_prob_adaptive.py``).

The data is read in the layout it is released in, the files ``torchvision.datasets`` reads (which the
Diffusion Classifier's ``diffusion/datasets.py`` loads); ``DIR`` is the folder holding the dataset's
own folder (torchvision's ``root``) or that folder itself:

=============  ==========================================================================  ============
format         files                                                                       splits
=============  ==========================================================================  ============
``folder``     ``DIR/<class>/*.jpg`` (any image type; ImageNet's ``val/<wnid>/``)          (none)
``cifar10``    ``cifar-10-batches-py/{test_batch,data_batch_1..5,batches.meta}``            test, train
``cifar100``   ``cifar-100-python/{test,train,meta}`` (the fine labels)                    test, train
``stl10``      ``stl10_binary/{test,train}_{X,y}.bin``, ``class_names.txt``                 test, train
``mnist``      ``MNIST/raw/{t10k,train}-{images-idx3,labels-idx1}-ubyte[.gz]``              test, train
``flowers102`` ``flowers-102/{jpg/image_NNNNN.jpg,imagelabels.mat,setid.mat}``              test, train, val
``food101``    ``food-101/{meta/{test,train}.json,images/<class>/<id>.jpg}``                test, train
``pets``       ``oxford-iiit-pet/{annotations/{test,trainval}.txt,images/<id>.jpg}``        test, trainval
``aircraft``   ``fgvc-aircraft-2013b/data/{variants.txt,images_variant_<split>.txt,images/}``  test, train, val, trainval
``caltech101`` ``caltech101/101_ObjectCategories/<category>/image_NNNN.jpg``                (none)
``objectnet``  ``objectnet-1.0/{images/<folder>/*.png,mappings/*.json}``                   (none)
=============  ==========================================================================  ============

The split defaults to ``test``, as the published commands run. Class indices are the dataset's own
(torchvision's ``class_to_idx``; a plain folder's sorted folder names, as ``ImageFolder`` orders
them); Caltech-101 leaves out ``BACKGROUND_Google``; ObjectNet keeps the 113 classes it shares with
ImageNet (its ``mappings/objectnet_to_imagenet_1k.json``) in sorted folder order and crops each
image's 2-pixel border, as ``diffusion/dataset/objectnet.py`` does.

Prompts: the Diffusion Classifier's CSV (``prompts/*_prompts.csv``: ``prompt,classname,classidx``),
whose ``classidx`` follows the dataset's class indices. A class may have several prompts: it scores
as its best prompt, as the published code predicts the class of its best prompt
(``prompts_df.classidx[pred_idx]``). For a plain folder whose names are the CSV's class names (case,
``_`` and spaces aside), classes are matched by name instead. Without ``--prompts``, each class gets
"a photo of a <class name>." from the dataset's own names (refused where it has none: Flowers102,
ImageNet's wnid folders). Every image is one item whose candidates are all the prompts; the prompts
are encoded once per run (:class:`fastitm.engine.text_cache.TextCache`).
"""

from __future__ import annotations

import csv
import gzip
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .items import DataError, Item

PROMPTS_FORMAT = "a CSV file with the header prompt,classname,classidx (the Diffusion Classifier's prompts/*.csv)"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's


@dataclass(frozen=True)
class Prompts:
    """``texts``: the prompts in file order; ``classes``: each prompt's class index; ``names``: each
    class's name, by index."""

    texts: list[str]
    classes: list[int]
    names: list[str]


def read_prompts(path: str | Path) -> Prompts:
    """The prompt CSV, checked: class indices 0..C-1 each with a prompt, one name per class, no prompt
    repeated (it could only tie with itself)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected {PROMPTS_FORMAT})")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
        header = rows[0].keys() if rows else []
    missing = [k for k in ("prompt", "classname", "classidx") if k not in header]
    if missing:
        raise DataError(f"{path}: no column(s) {missing}; expected {PROMPTS_FORMAT}")
    texts, classes, names, first = [], [], {}, {}
    for n, row in enumerate(rows, start=2):
        try:
            c = int(row["classidx"])
        except (TypeError, ValueError):
            raise DataError(f"{path}:{n}: classidx {row['classidx']!r} is not a whole number") from None
        if c < 0:
            raise DataError(f"{path}:{n}: classidx {c} is negative")
        if names.setdefault(c, row["classname"]) != row["classname"]:
            raise DataError(f"{path}:{n}: class {c} is named {row['classname']!r} here and {names[c]!r} above")
        t = row["prompt"]
        if t in first:
            raise DataError(f"{path}:{n}: the prompt {t!r} repeats line {first[t]}; each prompt once")
        first[t] = n
        texts.append(t)
        classes.append(c)
    if len(names) < 2:
        raise DataError(f"{path}: needs prompts for at least 2 classes, got {len(names)}")
    absent = sorted(set(range(max(names) + 1)) - set(names))
    if absent:
        raise DataError(f"{path}: class indices run 0..{max(names)} but {absent[:5]} have no prompt")
    return Prompts(texts, classes, [names[c] for c in range(len(names))])


def default_prompts(names: list[str]) -> Prompts:
    """One prompt a class: "a photo of a <name>." (underscores read as spaces)."""
    return Prompts([f"a photo of a {n.replace('_', ' ')}." for n in names], list(range(len(names))), list(names))


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


# ---- the readers: each returns (references, labels, class names or None) ---------------------------

def _split(split: str | None, allowed: tuple[str, ...], what: str) -> str:
    split = split or "test"
    if split not in allowed:
        raise DataError(f"{what} has the splits {list(allowed)}; got --split {split!r}")
    return split


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{path}: not found (expected {what})")
    return path


def _unpickle(path: Path) -> dict:
    """A CIFAR batch: Python pickles of numpy arrays and lists, read as torchvision does (latin1)."""
    with _need(path, "a CIFAR python batch").open("rb") as f:
        try:
            return pickle.load(f, encoding="latin1")
        except Exception as e:  # a truncated or foreign file
            raise DataError(f"{path}: not a CIFAR python batch ({type(e).__name__}: {e})") from None


def _pil_rows(array: Any) -> list:
    from PIL import Image

    return [Image.fromarray(a) for a in array]


def _cifar(root: Path, split: str | None, hundred: bool) -> tuple[list, list[int], list[str]]:
    import numpy as np

    name = "cifar-100-python" if hundred else "cifar-10-batches-py"
    split = _split(split, ("test", "train"), name)
    if hundred:
        files, key, meta, names_key = [split], "fine_labels", "meta", "fine_label_names"
    else:
        files = ["test_batch"] if split == "test" else [f"data_batch_{k}" for k in range(1, 6)]
        key, meta, names_key = "labels", "batches.meta", "label_names"
    data, labels = [], []
    for f in files:
        batch = _unpickle(root / f)
        if "data" not in batch or key not in batch:
            raise DataError(f"{root / f}: a CIFAR batch needs the keys 'data' and {key!r}, found {sorted(batch)}")
        data.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += [int(v) for v in batch[key]]
    return _pil_rows(np.concatenate(data)), labels, list(_unpickle(root / meta)[names_key])


def _stl10(root: Path, split: str | None) -> tuple[list, list[int], list[str] | None]:
    import numpy as np

    split = _split(split, ("test", "train"), "STL-10")
    labels = np.fromfile(_need(root / f"{split}_y.bin", "STL-10's label file"), dtype=np.uint8).astype(int) - 1
    raw = np.fromfile(_need(root / f"{split}_X.bin", "STL-10's image file"), dtype=np.uint8)
    if raw.size != len(labels) * 3 * 96 * 96:
        raise DataError(f"{root / f'{split}_X.bin'}: {raw.size} bytes for {len(labels)} labels; expected 96x96x3 each")
    # column-major 96x96 planes, as torchvision transposes them
    images = raw.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)
    names = root / "class_names.txt"
    return _pil_rows(images), labels.tolist(), names.read_text().splitlines() if names.is_file() else None


def _idx(path: Path) -> Any:
    """An idx file (MNIST): magic 0x0000 08 <ndim>, big-endian dimensions, then unsigned bytes."""
    import numpy as np

    if not path.is_file() and Path(str(path) + ".gz").is_file():
        path = Path(str(path) + ".gz")
    raw = (gzip.open if path.suffix == ".gz" else open)(_need(path, "an MNIST idx file"), "rb").read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 8:
        raise DataError(f"{path}: not an unsigned-byte idx file (magic {raw[:4].hex()})")
    nd = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(nd)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * nd).reshape(dims)


def _mnist(root: Path, split: str | None) -> tuple[list, list[int], list[str]]:
    split = _split(split, ("test", "train"), "MNIST")
    stem = "t10k" if split == "test" else "train"
    images, labels = _idx(root / f"{stem}-images-idx3-ubyte"), _idx(root / f"{stem}-labels-idx1-ubyte")
    if len(images) != len(labels):
        raise DataError(f"{root}: {len(images)} images but {len(labels)} labels")
    # torchvision's MNIST.classes
    names = ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven",
             "8 - eight", "9 - nine"]
    return _pil_rows(images), [int(v) for v in labels], names


def _flowers(root: Path, split: str | None) -> tuple[list, list[int], None]:
    from scipy.io import loadmat

    split = _split(split, ("test", "train", "val"), "Flowers102")
    ids = loadmat(_need(root / "setid.mat", "Flowers102's setid.mat"), squeeze_me=True)
    labels = loadmat(_need(root / "imagelabels.mat", "Flowers102's imagelabels.mat"), squeeze_me=True)["labels"]
    picked = [int(k) for k in ids[{"train": "trnid", "val": "valid", "test": "tstid"}[split]].ravel()]
    return ([str(root / "jpg" / f"image_{k:05d}.jpg") for k in picked], [int(labels[k - 1]) - 1 for k in picked],
            None)


def _food(root: Path, split: str | None) -> tuple[list, list[int], list[str]]:
    split = _split(split, ("test", "train"), "Food-101")
    meta = _need(root / "meta" / f"{split}.json", "Food-101's meta/<split>.json")
    try:
        listing = json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{meta}: not valid JSON ({e})") from None
    classes = sorted(listing)
    refs, labels = [], []
    for c, name in enumerate(classes):
        for rel in listing[name]:
            refs.append(str(root / "images" / f"{rel}.jpg"))
            labels.append(c)
    return refs, labels, classes


def _pets(root: Path, split: str | None) -> tuple[list, list[int], list[str]]:
    split = _split(split, ("test", "trainval"), "Oxford-IIIT Pets")
    path = _need(root / "annotations" / f"{split}.txt", "Oxford-IIIT Pets' annotations/<split>.txt")
    refs, labels, names = [], [], {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 4:
            raise DataError(f"{path}:{n}: expected 'image_id class_id species breed_id', got {line!r}")
        refs.append(str(root / "images" / f"{parts[0]}.jpg"))
        labels.append(int(parts[1]) - 1)
        # torchvision's class names: the image id's stem, each part title-cased
        names.setdefault(labels[-1], " ".join(p.title() for p in parts[0].rsplit("_", 1)[0].split("_")))
    return refs, labels, [names.get(c, str(c)) for c in range(max(names) + 1)]


def _aircraft(root: Path, split: str | None) -> tuple[list, list[int], list[str]]:
    split = _split(split, ("test", "train", "val", "trainval"), "FGVC Aircraft")
    data = root / "data"
    classes = [line.strip() for line in _need(data / "variants.txt", "FGVC Aircraft's variants.txt").read_text()
               .splitlines() if line.strip()]
    index = {c: k for k, c in enumerate(classes)}
    path = _need(data / f"images_variant_{split}.txt", "FGVC Aircraft's images_variant_<split>.txt")
    refs, labels = [], []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        image, _, variant = line.strip().partition(" ")
        if variant not in index:
            raise DataError(f"{path}:{n}: variant {variant!r} is not in {data / 'variants.txt'}")
        refs.append(str(data / "images" / f"{image}.jpg"))
        labels.append(index[variant])
    return refs, labels, classes


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _folders(root: Path, leave_out: tuple[str, ...] = ()) -> tuple[list, list[int], list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in leave_out)
    refs, labels = [], []
    for c, name in enumerate(classes):
        for f in _images_in(root / name):
            refs.append(str(f))
            labels.append(c)
    return refs, labels, classes


def _objectnet(root: Path, split: str | None) -> tuple[list, list[int], list[str]]:
    from PIL import Image

    maps = root / "mappings"
    folder_label = json.loads(_need(maps / "folder_to_objectnet_label.json", "ObjectNet's mappings").read_text())
    to_imagenet = json.loads(_need(maps / "objectnet_to_imagenet_1k.json", "ObjectNet's mappings").read_text())
    shared = sorted(folder for folder, label in folder_label.items() if label in to_imagenet)
    refs, labels, crops = [], [], []
    for c, folder in enumerate(shared):
        where = root / "images" / folder
        for f in _images_in(where) if where.is_dir() else []:
            with Image.open(f) as im:  # the header only: the size for the published 2-pixel border crop
                w, h = im.size
            refs.append(str(f))
            labels.append(c)
            crops.append((2, 2, w - 2, h - 2))
    return (refs, crops), labels, shared


FORMATS = {  # name -> (the dataset's own folder under DIR, a file inside it that tells the format apart)
    "cifar10": ("cifar-10-batches-py", "batches.meta"),
    "cifar100": ("cifar-100-python", "meta"),
    "stl10": ("stl10_binary", "test_y.bin"),
    "mnist": ("MNIST/raw", "t10k-labels-idx1-ubyte"),
    "flowers102": ("flowers-102", "setid.mat"),
    "food101": ("food-101", "meta"),
    "pets": ("oxford-iiit-pet", "annotations"),
    "aircraft": ("fgvc-aircraft-2013b", "data/variants.txt"),
    "caltech101": ("caltech101/101_ObjectCategories", "."),
    "objectnet": ("objectnet-1.0", "mappings/folder_to_objectnet_label.json"),
}


def detect(data_dir: str | Path) -> tuple[str, Path]:
    """(the format, its folder): ``DIR`` holds the dataset's folder, or is it; else a folder of class
    folders."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (the classify task reads a dataset folder: see fastitm eval classify "
                        "--help)")
    for name, (folder, marker) in FORMATS.items():
        for where in (root / folder, root):
            # MNIST's files may still be gzipped; Caltech-101's marker is its folder's own name
            found = (where / marker).exists() or (name == "mnist" and Path(f"{where / marker}.gz").exists())
            if found and (name != "caltech101" or where.name == "101_ObjectCategories"):
                return name, where
    if any(p.is_dir() and _images_in(p) for p in root.iterdir()):
        return "folder", root
    raise DataError(f"{root}: no dataset found: expected a folder of class folders (DIR/<class>/*.jpg) or one of "
                    f"{', '.join(f'{n} ({f}/)' for n, (f, _) in FORMATS.items())}")


READERS = {"cifar10": lambda r, s: _cifar(r, s, False), "cifar100": lambda r, s: _cifar(r, s, True),
           "stl10": _stl10, "mnist": _mnist, "flowers102": _flowers, "food101": _food, "pets": _pets,
           "aircraft": _aircraft, "objectnet": _objectnet}
WNID = re.compile(r"n\d{8}")


def load_classify(data_dir: str | Path, split: str | None = None, prompts: str | Path | None = None) -> list[Item]:
    """The items of a classification dataset (see the module docstring): one per image, its
    candidates every prompt, ``label`` its class, tag ``class`` (its name); ids name the file (or the
    index in a binary batch)."""
    fmt, root = detect(data_dir)
    crops = None
    if fmt in ("folder", "caltech101"):
        if split is not None:
            raise DataError(f"{root} is a folder of class folders, which has no splits; drop --split {split}")
        refs, labels, names = _folders(root, ("BACKGROUND_Google",) if fmt == "caltech101" else ())
    else:
        refs, labels, names = READERS[fmt](root, split)
        if fmt == "objectnet":
            refs, crops = refs
    if not refs:
        raise DataError(f"{root}: the {fmt} layout was found but holds no images" + (f" in split {split!r}" if split else ""))
    C = max(labels) + 1 if names is None else len(names)
    if prompts is None:
        if names is None or (fmt == "folder" and all(WNID.fullmatch(n) for n in names)):
            raise DataError(f"{root}: the {fmt} layout names no classes (or only WordNet ids): give --prompts, "
                            f"{PROMPTS_FORMAT}")
        table = default_prompts(names)
    else:
        table = read_prompts(prompts)
        if fmt == "folder" and {_norm(n) for n in names} <= {_norm(n) for n in table.names}:
            by_name = {_norm(n): c for c, n in enumerate(table.names)}  # matched by name, in the CSV's order
            labels = [by_name[_norm(names[k])] for k in labels]
            names = table.names
        elif len(table.names) != C:
            raise DataError(f"{prompts} has {len(table.names)} classes but the {fmt} data at {root} has {C}; its "
                            "classidx must follow the dataset's class indices")
    texts, classes = table.texts, table.classes
    shown = table.names
    def ident(n: int, ref: Any) -> str:
        return str(Path(ref).relative_to(root)) if isinstance(ref, str) else f"{fmt}/{split or 'test'}/{n}"

    return [Item(ident(n, ref), "text", [ref], texts, lab, {"class": shown[lab]},
                 crops=[crops[n]] if crops else None, classes=classes)
            for n, (ref, lab) in enumerate(zip(refs, labels, strict=True))]
