"""Benchmark task loaders: each reads a dataset in the exact on-disk layout the published GDBench code
(McGill-NLP/diffusion-itm, ``datasets_loading.py``) reads, and yields :class:`~fastitm.evaluate.items.Item` s
(see :mod:`fastitm.evaluate.items` for what an item is and the identical-candidate rule). The Discffusion
paper's tasks are in :mod:`fastitm.evaluate.tasks_discffusion`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..core.inputs import is_url

# the item types, re-exported: fastitm.evaluate.tasks is where the loaders' users have found them
from .items import ITEM_KINDS, DataError, Item, _read_json, _resolve, _utf8, drop_identical  # noqa: F401
from .metrics import BIAS_PAIRS
from .order import MissingModel, caption_options
from .tasks_classify import load_classify
from .tasks_discffusion import LOADERS as DISCFFUSION_LOADERS

# ---- jsonl: our generic format --------------------------------------------------------------------

JSONL_FORMAT = ('one JSON object per line, paths relative to the file: {"image": "img/0.png", "texts": '
                '["...", "..."], "label": 1} (pick the text) or {"images": ["a.png", "b.png"], "text": "...", '
                '"label": 0} (pick the image)')


def load_jsonl(path: str | Path, split: str | None = None) -> list[Item]:
    """``fastitm eval jsonl --data FILE``: any dataset, one item per line (see ``JSONL_FORMAT``)."""

    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; the jsonl task takes the .jsonl file itself")
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected {JSONL_FORMAT})")
    root = path.parent
    items = []
    for n, line in enumerate(_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e}); expected {JSONL_FORMAT}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}; {JSONL_FORMAT}")
        if {"image", "texts"} <= obj.keys() and {"images", "text"} <= obj.keys():
            raise DataError(f"{where}: has both layouts, image + texts (pick the text) and images + text (pick the "
                            f"image); keep the one meant; {JSONL_FORMAT}")
        if "image" in obj and "texts" in obj:
            kind, images, texts = "text", [obj["image"]], obj["texts"]
            n_cand = len(texts) if isinstance(texts, list) else 0
        elif "images" in obj and "text" in obj:
            kind, images, texts = "image", obj["images"], [obj["text"]]
            n_cand = len(images) if isinstance(images, list) else 0
        else:
            raise DataError(f"{where}: needs the fields image + texts or images + text (found {sorted(obj)}); "
                            f"{JSONL_FORMAT}")
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise DataError(f"{where}: field 'image(s)' must be a path or a list of paths")
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise DataError(f"{where}: field 'text(s)' must be a string or a list of strings")
        if n_cand < 2:
            raise DataError(f"{where}: an item needs at least 2 candidates to choose from, got {n_cand}")
        label = obj.get("label")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < n_cand:
            raise DataError(f"{where}: field 'label' must be an int in [0, {n_cand}), got {label!r}")
        tags = {k: str(v) for k, v in obj.get("tags", {}).items()} if isinstance(obj.get("tags"), dict) else {}
        urls = [p for p in images if is_url(p)]
        if urls:
            raise DataError(f"{where}: {urls[0]} is a URL; fastitm does not fetch images: download them and give "
                            "paths relative to the file")
        items.append(Item(str(obj.get("id", n)), kind, [str(root / p) for p in images], texts, label, tags))
    if not items:
        raise DataError(f"{path} holds no items; expected {JSONL_FORMAT}")
    return items


# ---- winoground ------------------------------------------------------------------------------------

WINOGROUND_FIELDS = ("caption_0", "caption_1", "image_0", "image_1")


def load_winoground(data_dir: str | Path, split: str | None = None) -> list[Item]:
    """The Hugging Face ``facebook/winoground`` dataset saved with ``save_to_disk`` (a DatasetDict with
    its ``test`` split, or that split alone): ``caption_0``, ``caption_1``, ``image_0``, ``image_1``,
    ``id`` and the tags (``tag``, ``secondary_tag``, ``collapsed_tag``). ``tag`` and ``secondary_tag``
    hold comma-joined lists ("Symbolic, Series"): each example counts under each of its tags, as in
    the Winoground paper's per-tag table (an empty secondary tag: none)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: folder not found (expected facebook/winoground saved with save_to_disk)")
    try:
        import datasets
    except ImportError:
        raise DataError("the winoground task reads a Hugging Face dataset: pip install datasets") from None
    try:
        ds = datasets.load_from_disk(str(data_dir))
    except Exception as e:  # FileNotFoundError or a format error from the arrow reader
        raise DataError(f"{data_dir}: not a dataset saved with save_to_disk ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        name = split or "test"
        if name not in ds:
            raise DataError(f"{data_dir}: no split {name!r} (it has {sorted(ds)})")
        ds = ds[name]
    missing = [f for f in WINOGROUND_FIELDS if f not in ds.column_names]
    if missing:
        raise DataError(f"{data_dir}: missing the field(s) {missing} (it has {ds.column_names}); expected "
                        f"Winoground's {list(WINOGROUND_FIELDS)}")
    items = []
    for n, ex in enumerate(ds):
        tags: dict[str, str | list[str]] = {}
        for key in ("tag", "secondary_tag"):  # comma-joined: "Symbolic, Series" counts under both
            values = [v.strip() for v in str(ex.get(key) or "").split(",") if v.strip()]
            if values:
                tags[key] = values
        if ex.get("collapsed_tag"):
            tags["collapsed_tag"] = str(ex["collapsed_tag"])
        items.append(Item(str(ex.get("id", n)), "group", [ex["image_0"], ex["image_1"]],
                          [ex["caption_0"], ex["caption_1"]], None, tags))
    return items


# ---- flickr30k: CLIP top-10 re-ranking --------------------------------------------------------------

def _read_candidates(path: Path, key: str, values: str) -> list[tuple[str, list[str]]]:
    """A JSON object {key: [candidates, the true one first]}, checked; its entries in file order."""
    data = _read_json(path, f"a JSON object {{{key}: [{values}, the true one first]}}")
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a non-empty JSON object {{{key}: [{values}]}}")
    for k, v in data.items():
        if not isinstance(v, list) or len(v) < 2 or not all(isinstance(c, str) for c in v):
            raise DataError(f"{path}: entry {k!r:.60} must be a list of at least 2 {values}, got {v!r:.80}")
    return list(data.items())


def load_flickr30k_text(data_dir: str | Path, split: str | None = None) -> list[Item]:
    """``{data}/flickr30k/{split}_top10_RN50x64_text.json``: {image path: [10 captions]}, the true
    caption first. Text retrieval: pick the caption."""
    data_dir = Path(data_dir)
    path = data_dir / "flickr30k" / f"{split or 'val'}_top10_RN50x64_text.json"
    return [Item(img, "text", [str(_resolve(data_dir, img))], caps, 0)
            for img, caps in _read_candidates(path, "image path", "captions")]


def load_flickr30k_image(data_dir: str | Path, split: str | None = None) -> list[Item]:
    """``{data}/flickr30k/{split}_top10_RN50x64.json``: {caption: [10 image paths]}, the true image
    first; like the published loader, every 5th caption (the first of each image's five)."""
    data_dir = Path(data_dir)
    path = data_dir / "flickr30k" / f"{split or 'val'}_top10_RN50x64.json"
    entries = _read_candidates(path, "caption", "image paths")[::5]
    return [Item(str(n), "image", [str(_resolve(data_dir, p)) for p in imgs], [cap], 0)
            for n, (cap, imgs) in enumerate(entries)]


# ---- the other GDBench tasks ------------------------------------------------------------------------

def _image_dir_files(folder: Path, pattern: str = "*.jpg") -> list[Path]:
    files = sorted(folder.glob(pattern))
    if not files:
        raise DataError(f"{folder}: no {pattern} images found")
    return files


def load_svo(data_dir: str | Path, split: str | None = None) -> list[Item]:
    """``{data}/svo/svo.json``: a list of {sentence, pos_id, neg_id, neg_type}, images in
    ``{data}/svo/images/{id}``. Pick the image the sentence describes; accuracy per ``neg_type``
    (subj, verb, obj: the published svo_subj / svo_verb / svo_obj tasks in one run)."""
    root = Path(data_dir) / "svo"
    path = root / "svo.json"
    rows = _read_json(path, "a JSON list of {sentence, pos_id, neg_id, neg_type}")
    if not isinstance(rows, list) or not rows:
        raise DataError(f"{path}: expected a non-empty JSON list of {{sentence, pos_id, neg_id, neg_type}}")
    items = []
    for n, row in enumerate(rows):
        missing = [k for k in ("sentence", "pos_id", "neg_id", "neg_type") if not isinstance(row, dict) or k not in row]
        if missing:
            raise DataError(f"{path}: row {n} lacks the field(s) {missing}")
        if not isinstance(row["sentence"], str) or not row["sentence"].strip():
            raise DataError(f"{path}: row {n}: sentence must be a non-empty string, got {row['sentence']!r:.80}")
        items.append(Item(str(n), "image", [str(root / "images" / str(row["pos_id"])),
                                            str(root / "images" / str(row["neg_id"]))],
                          [row["sentence"]], 0, {"neg_type": str(row["neg_type"])}))
    return items


def load_imagecode(data_dir: str | Path, split: str | None = None) -> list[Item]:
    """``{data}/imagecode/{split}_data.json`` ({image set: {index: description}}; split "valid" for
    "val") with the sets in ``{data}/imagecode/image-sets/{set}/img{k}.jpg``; the static sets (from
    Open Images) only, as the published ``imagecode`` task. Pick the described image of 10."""
    root = Path(data_dir) / "imagecode"
    split = "valid" if split in (None, "val") else split
    path = root / f"{split}_data.json"
    data = _read_json(path, "a JSON object {image set: {image index: description}}")
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object {{image set: {{image index: description}}}}")
    items = []
    for img_dir, descs in data.items():
        if "open-images" not in img_dir:
            continue  # video frames: the published imagecode_video task
        if not isinstance(descs, dict):
            raise DataError(f"{path}: entry {img_dir!r} must map image indices to descriptions")
        files = _image_dir_files(root / "image-sets" / img_dir)
        try:
            files = sorted(files, key=lambda f: int(f.stem[3:]))  # img0.jpg ... img9.jpg
        except ValueError:
            raise DataError(f"{root / 'image-sets' / img_dir}: images must be named img<k>.jpg") from None
        for idx, text in descs.items():
            k = int(idx)
            if not 0 <= k < len(files):
                raise DataError(f"{path}: {img_dir!r} names image {k}, but the set has {len(files)} images")
            items.append(Item(f"{img_dir}/{k}", "image", [str(f) for f in files], [text], k))
    if not items:
        raise DataError(f"{path}: no static (open-images) image sets")
    return items


CLEVR_SUBTASKS = ("pair_binding_size", "pair_binding_color", "recognition_color", "recognition_shape", "spatial",
                  "binding_color_shape", "binding_shape_color")


def load_clevr(data_dir: str | Path, split: str | None = None) -> list[Item]:
    """``{data}/captions/{subtask}.json`` ({image file: [[true caption, false caption], ...]}) for
    the seven subtasks, images in ``{data}/images/``. Pick the caption; accuracy per subtask.

    Every entry of the released caption files is two strings, the true caption first, ``spatial``
    included, and the published numbers use strings 0 and 1 of every entry (its loader's branch for
    ``spatial``, which would take strings 1 and 2, compares the literal ``'subtask'`` and never runs)."""
    root = Path(data_dir)
    items = []
    for sub in CLEVR_SUBTASKS:
        path = root / "captions" / f"{sub}.json"
        data = _read_json(path, "a JSON object {image file: [[true caption, false caption], ...]}")
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected a JSON object {{image file: [[true caption, false caption], ...]}}")
        for img, entries in data.items():
            if not isinstance(entries, list):
                raise DataError(f"{path}: entry {img!r} must be a list of [true caption, false caption] pairs")
            for n, caps in enumerate(entries):
                if not isinstance(caps, list) or len(caps) < 2 or not all(isinstance(c, str) for c in caps[:2]):
                    raise DataError(f"{path}: entry {img!r}[{n}] must be a list [true caption, false caption], "
                                    f"got {caps!r:.80}")
                items.append(Item(f"{sub}/{img}/{n}", "text", [str(root / "images" / img)],
                                  [caps[0], caps[1]], 0, {"subtask": sub}))
    return items


def _load_vg(data_dir: str | Path, name: str, tag: Callable[[dict], str]) -> list[Item]:
    root = Path(data_dir)
    path = root / f"visual_genome_{name}.json"
    rows = _read_json(path, "a JSON list of {image_path, bbox_x, bbox_y, bbox_w, bbox_h, true_caption, false_caption}")
    if not isinstance(rows, list) or not rows:
        raise DataError(f"{path}: expected a non-empty JSON list")
    need = ("image_path", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "true_caption", "false_caption")
    items = []
    for n, r in enumerate(rows):
        missing = [k for k in need if not isinstance(r, dict) or k not in r]
        if missing:
            raise DataError(f"{path}: row {n} lacks the field(s) {missing}")
        for k in need[1:5]:
            if isinstance(r[k], bool) or not isinstance(r[k], (int, float)):
                raise DataError(f"{path}: row {n}: {k} must be a number, got {r[k]!r:.40}")
        if r["bbox_w"] <= 0 or r["bbox_h"] <= 0:
            raise DataError(f"{path}: row {n}: the box is empty (bbox_w {r['bbox_w']}, bbox_h {r['bbox_h']})")
        for k in need[5:]:
            if not isinstance(r[k], str):
                raise DataError(f"{path}: row {n}: {k} must be a string, got {r[k]!r:.80}")
        box = (r["bbox_x"], r["bbox_y"], r["bbox_x"] + r["bbox_w"], r["bbox_y"] + r["bbox_h"])
        items.append(Item(str(n), "text", [str(root / "images" / r["image_path"])],
                          [r["true_caption"], r["false_caption"]], 0, {name: tag(r)}, crops=[box]))
    return items


def load_vg_relation(data_dir: str | Path, split: str | None = None) -> list[Item]:
    """ARO's VG-Relation: ``{data}/visual_genome_relation.json`` (image_path, the relation's bounding
    box, true_caption, false_caption, relation_name), images in ``{data}/images/``, each cropped to
    its box. Accuracy, and per relation."""
    return _load_vg(data_dir, "relation", lambda r: str(r.get("relation_name", "")))


def load_vg_attribution(data_dir: str | Path, split: str | None = None) -> list[Item]:
    """ARO's VG-Attribution: ``{data}/visual_genome_attribution.json`` (as VG-Relation, with the pair
    of ``attributes``). Accuracy, and per attribute pair."""
    return _load_vg(data_dir, "attribution", lambda r: "_".join(map(str, r.get("attributes", []))))


def load_pets(data_dir: str | Path, split: str | None = None) -> list[Item]:
    """Oxford-IIIT Pets: ``{data}/classes.txt`` (one lower-case class a line) and
    ``{data}/images/<Class_Name>_<n>.jpg``; texts "a photo of a <class>", pick the class."""
    root = Path(data_dir)
    path = root / "classes.txt"
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected one class name a line)")
    classes = [c for c in path.read_text().splitlines() if c.strip()]
    if len(classes) < 2:
        raise DataError(f"{path}: needs at least 2 classes, got {len(classes)}")
    texts = [f"a photo of a {c}" for c in classes]
    items = []
    for f in _image_dir_files(root / "images"):
        name = " ".join(f.stem.split("_")[:-1]).lower()
        if name not in classes:
            raise DataError(f"{f}: class {name!r} (from the file name) is not in {path}")
        items.append(Item(f.name, "text", [str(f)], texts, classes.index(name)))
    return items


MMBIAS_GROUPS = {  # class -> folder under data/Images, as the published loader globs them
    "Christian": "Religion/Christian", "Muslim": "Religion/Muslim", "Jewish": "Religion/Jewish",
    "Hindu": "Religion/Hindu", "Buddhist": "Religion/Buddhist", "American": "Nationality/American",
    "Arab": "Nationality/Arab", "Heterosexual": "Sexual Orientation/Heterosexual", "LGBT": "Sexual Orientation/LGBT",
}


def load_bias(data_dir: str | Path, split: str | None = None) -> list[Item]:
    """MMBias: ``{data}/mmbias/textual_phrases.txt`` (JSON with ``pleasant_phrases`` and
    ``unpleasant_phrases``) and ``{data}/mmbias/data/Images/<category>/<group>/*.jpg``. Every image is
    scored against every phrase; see :func:`fastitm.evaluate.metrics.bias_metrics`."""
    root = Path(data_dir) / "mmbias"
    path = root / "textual_phrases.txt"
    phrases = _read_json(path, 'a JSON object {"pleasant_phrases": [...], "unpleasant_phrases": [...]}')
    good, bad = (phrases.get("pleasant_phrases"), phrases.get("unpleasant_phrases")) if isinstance(phrases, dict) \
        else (None, None)
    for field_name, v in (("pleasant_phrases", good), ("unpleasant_phrases", bad)):
        if not isinstance(v, list) or not v or not all(isinstance(t, str) for t in v):
            raise DataError(f"{path}: field {field_name!r} must be a non-empty list of phrases")
    if (len(good) + len(bad)) // 2 != len(good):
        # The published code splits the phrase columns at half of all phrases (floor), which files
        # the last pleasant phrases as unpleasant (or the reverse) when that is not where the
        # pleasant list ends; fastitm keeps each phrase in its own list. The released file has 60
        # and 60: the same split.
        warnings.warn(f"{path}: {len(good)} pleasant and {len(bad)} unpleasant phrases; the published code "
                      f"would split them at {(len(good) + len(bad)) // 2}, fastitm at {len(good)} (where "
                      "the file puts them), so its effect sizes are not the published code's", stacklevel=1)
    texts = list(good) + list(bad)
    items = []
    empty = []
    for group, folder in MMBIAS_GROUPS.items():
        found = sorted((root / "data" / "Images" / folder).glob("*.jpg"))
        empty += [] if found else [group]
        for f in found:
            items.append(Item(f"{group}/{f.name}", "text", [str(f)], texts, None,
                              {"group": group, "pleasant": str(len(good))}))
    if not items:
        raise DataError(f"{root / 'data' / 'Images'}: no group images found (expected <category>/<group>/*.jpg)")
    if empty:  # never silently: the pairs of a group without images cannot be computed
        lost = [f"{x}-{y}" for x, y in BIAS_PAIRS if x in empty or y in empty]
        warnings.warn(f"MMBias: no images for {', '.join(empty)} (folders "
                      f"{', '.join(MMBIAS_GROUPS[g] for g in empty)} under {root / 'data' / 'Images'}); the pairs "
                      f"{', '.join(lost)} are left out of the report", stacklevel=1)
    return items


GENDER_TARGETS = {"clothes": ("suit", "apron"), "bags": ("briefcase", "purse"), "drinks": ("beer", "wine")}


def load_bias_gender(data_dir: str | Path, split: str | None = None) -> list[Item]:
    """The gender set: ``{data}/<attribute>-images/<n>.jpg`` for suit/apron, briefcase/purse,
    beer/wine; images numbered up to 6 show men, the others women (as the published loader reads
    them). Each image is scored against its target's (male, female) attribute words."""
    root = Path(data_dir)
    items = []
    for target, words in GENDER_TARGETS.items():
        missing = [str(root / f"{w}-images") for w in words if not any((root / f"{w}-images").glob("*.jpg"))]
        if missing and len(missing) < len(words):  # a target from one of its two words would mislead
            warnings.warn(f"bias_gender: no images in {', '.join(missing)}: {target} is computed from "
                          f"{' and '.join(w for w in words if str(root / f'{w}-images') not in missing)} alone",
                          stacklevel=1)
        for word in words:
            for f in sorted((root / f"{word}-images").glob("*.jpg")):
                try:
                    gender = "male" if int(f.stem) <= 6 else "female"
                except ValueError:
                    raise DataError(f"{f}: gender-set images must be named <number>.jpg") from None
                items.append(Item(f"{word}/{f.name}", "text", [str(f)], list(words), None,
                                  {"target": target, "gender": gender}))
    if not items:
        raise DataError(f"{root}: no <attribute>-images/*.jpg folders (suit, apron, briefcase, purse, beer, wine)")
    return items


def _load_order(data_dir: Path, file: str, image_path: Callable[[str], Any] | None = None) -> list[Item]:

    image_path = image_path or (lambda p: str(data_dir / p))
    path = data_dir / file
    anns = _read_json(path, 'a JSON list of {"image": path, "caption": [captions]} (the Karpathy split file)')
    if not isinstance(anns, list) or not anns:
        raise DataError(f"{path}: expected a non-empty JSON list of {{image, caption}}")
    items = []
    for a, ann in enumerate(anns):
        if not isinstance(ann, dict) or "image" not in ann or "caption" not in ann:
            raise DataError(f"{path}: entry {a} needs the fields 'image' and 'caption'")
        caps = ann["caption"] if isinstance(ann["caption"], list) else [ann["caption"]]
        for c, cap in enumerate(caps):
            try:
                texts = caption_options(cap, len(items))
            except MissingModel as e:
                raise DataError(str(e)) from None
            items.append(Item(f"{a}/{c}", "text", [image_path(ann["image"])], texts, 0))
    return items


def load_coco_order(data_dir: str | Path, split: str | None = None) -> list[Item]:
    """ARO's COCO-Order: ``{data}/coco_order/coco_karpathy_{split}.json`` (split "test" by default, as
    published), images under ``{data}/coco_order/``; each caption against four shufflings of itself
    (:mod:`fastitm.evaluate.order`). Accuracy = the published Precision@1."""
    root = Path(data_dir) / "coco_order"
    return _load_order(root, f"coco_karpathy_{split or 'test'}.json")


def load_flickr30k_order(data_dir: str | Path, split: str | None = None) -> list[Item]:
    """ARO's Flickr30k-Order: ``{data}/flickr30k/flickr30k_{split}.json`` (split "val" by default);
    as COCO-Order. The file names images ``flickr30k-images/<id>.jpg``; GDBench reads them from
    ``{data}/flickr30k/images/<id>.jpg`` (its vendored ARO code rewrites the folder name; the folder
    its README fills and the re-ranking tasks read), ARO from ``flickr30k-images/``: either layout
    works, the first that holds the image is read."""
    root = Path(data_dir) / "flickr30k"

    def both(p: str) -> tuple[str, str]:
        return str(root / p.replace("flickr30k-images", "images")), str(root / p)

    return _load_order(root, f"flickr30k_{split or 'val'}.json", both)


SUGARCREPE_SUBSETS = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")


def load_sugarcrepe(data_dir: str | Path, split: str | None = None) -> list[Item]:
    """SugarCrepe (Hsieh et al. 2023) as released: the seven files ``{subset}.json`` (add_att, add_obj,
    replace_att, replace_obj, replace_rel, swap_att, swap_obj; in ``{data}`` or ``{data}/data`` as in
    the repository), each ``{id: {"filename", "caption", "negative_caption"}}`` with ids that may skip
    numbers, and the COCO val2017 images in ``{data}/val2017/`` (or ``{data}/images/``). Each entry is a
    choice between its caption and its negative; accuracy per subset, and per category (add, replace,
    swap) the mean of its subsets' accuracies, as the paper's tables average them. ``split``: one subset
    or a comma-separated list (default: all seven)."""
    root = Path(data_dir)
    # each subset once, in the order given (a subset named twice is not scored twice)
    subsets = SUGARCREPE_SUBSETS if split is None else tuple(dict.fromkeys(s.strip() for s in split.split(",")))
    unknown = [s for s in subsets if s not in SUGARCREPE_SUBSETS]
    if unknown:
        raise DataError(f"unknown SugarCrepe subset(s) {unknown}; choose from {list(SUGARCREPE_SUBSETS)}")
    folder = root / "data" if not (root / f"{subsets[0]}.json").is_file() and (root / "data").is_dir() else root
    missing = [s for s in subsets if not (folder / f"{s}.json").is_file()]
    if len(missing) == len(subsets):
        raise DataError(f"{folder}: none of the SugarCrepe files {[f'{s}.json' for s in subsets]} (the repository's "
                        "data/ folder; the COCO val2017 images in val2017/ beside them)")
    if missing:
        warnings.warn(f"SugarCrepe: {', '.join(f'{s}.json' for s in missing)} not in {folder}: those subsets (and "
                      "their share of the category means) are left out", stacklevel=1)
    items = []
    for subset in subsets:
        if subset in missing:
            continue
        path = folder / f"{subset}.json"
        rows = _read_json(path, '{id: {"filename": ..., "caption": ..., "negative_caption": ...}}')
        if not isinstance(rows, dict) or not rows:
            raise DataError(f"{path}: expected a non-empty JSON object of {{id: {{filename, caption, negative_caption}}}}")
        for key, row in rows.items():
            need = ("filename", "caption", "negative_caption")
            if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in need):
                raise DataError(f"{path}: entry {key!r} needs the string fields {list(need)}, got {row!r:.120}")
            images = (str(root / "val2017" / row["filename"]), str(root / "images" / row["filename"]))
            items.append(Item(f"{subset}/{key}", "text", [images], [row["caption"], row["negative_caption"]], 0,
                              {"subset": subset, "category": subset.split("_")[0]}))
    return items


TASKS: dict[str, Callable[..., list[Item]]] = {
    "jsonl": load_jsonl,
    "winoground": load_winoground,
    "flickr30k_text": load_flickr30k_text,
    "flickr30k_image": load_flickr30k_image,
    "imagecode": load_imagecode,
    "svo": load_svo,
    "clevr": load_clevr,
    "vg_relation": load_vg_relation,
    "vg_attribution": load_vg_attribution,
    "coco_order": load_coco_order,
    "flickr30k_order": load_flickr30k_order,
    "pets": load_pets,
    "bias": load_bias,
    "bias_gender": load_bias_gender,
    "sugarcrepe": load_sugarcrepe,
    "classify": load_classify,
    **DISCFFUSION_LOADERS,
}


def load_task(task: str, data: str | Path, split: str | None = None, preset: str | None = None,
              prompts: str | Path | None = None) -> list[Item]:
    """The task's items, each without the candidates identical to its true one (:func:`drop_identical`).
    ``preset="published"``: the item list the published code builds, where it differs (the
    Discffusion tasks: :mod:`fastitm.evaluate.tasks_discffusion`); other tasks read the same either way.
    ``prompts``: the classify task's prompt CSV (:mod:`fastitm.evaluate.tasks_classify`)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    if prompts is not None and task != "classify":
        raise ValueError(f"prompts= (--prompts) is the classify task's class prompts; {task} has its own texts")
    if task == "classify":
        loaded = load_classify(data, split, prompts)
    elif task in DISCFFUSION_LOADERS:
        loaded = TASKS[task](data, split, preset=preset)
    else:
        loaded = TASKS[task](data, split)
    return [drop_identical(item) for item in loaded]


def iter_items(items: list[Item], limit: int | None) -> Iterator[Item]:
    yield from items[:limit] if limit else items
