"""Benchmark task loaders: each reads a dataset in the exact on-disk layout the published GDBench code
(McGill-NLP/diffusion-itm, ``datasets_loading.py``) reads, and yields :class:`Item` s.

An item is one small scoring problem: some images, some texts, and which one is right.

- ``kind="text"``: one image, K candidate texts, ``label`` = the true text's index;
- ``kind="image"``: K candidate images, one text, ``label`` = the true image's index;
- ``kind="group"``: a Winoground group, images (i0, i1) x texts (t0, t1), image k matches text k.

Images are given as paths or PIL images and decoded only when the item is scored. A missing or
malformed file raises :class:`DataError` naming the file, the field and the expected format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

ITEM_KINDS = ("text", "image", "group")


class DataError(ValueError):
    """A dataset file is missing or not in the expected format; the message names the file and field."""


@dataclass
class Item:
    """One scoring problem. ``images``: paths or PIL images; ``texts``: strings; ``label``: the right
    candidate (None for groups); ``tags``: what the metrics break down by (e.g. Winoground's tag)."""

    id: str
    kind: str
    images: list[Any]
    texts: list[str]
    label: int | None = None
    tags: dict[str, str] = field(default_factory=dict)


def _read_json(path: Path, expected: str) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected {expected})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); expected {expected}") from None


def _resolve(root: Path, p: str) -> Path:
    """GDBench's JSON files name images as ``datasets/...``, with ``datasets`` standing for the data
    folder (``img_path.replace("datasets", root_dir)``); relative paths are taken under the folder."""
    if p.startswith("datasets/"):
        return root / p[len("datasets/") :]
    q = Path(p)
    return q if q.is_absolute() else root / q


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
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e}); expected {JSONL_FORMAT}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}; {JSONL_FORMAT}")
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
        items.append(Item(str(obj.get("id", n)), kind, [str(root / p) for p in images], texts, label, tags))
    if not items:
        raise DataError(f"{path} holds no items; expected {JSONL_FORMAT}")
    return items


# ---- winoground ------------------------------------------------------------------------------------

WINOGROUND_FIELDS = ("caption_0", "caption_1", "image_0", "image_1")


def load_winoground(data_dir: str | Path, split: str | None = None) -> list[Item]:
    """The Hugging Face ``facebook/winoground`` dataset saved with ``save_to_disk`` (a DatasetDict with
    its ``test`` split, or that split alone): ``caption_0``, ``caption_1``, ``image_0``, ``image_1``,
    ``id`` and the tags (``tag``, ``secondary_tag``, ``collapsed_tag``)."""
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
        tags = {k: str(ex[k]) for k in ("tag", "secondary_tag", "collapsed_tag") if k in ex and ex[k] is not None}
        items.append(Item(str(ex.get("id", n)), "group", [ex["image_0"], ex["image_1"]],
                          [ex["caption_0"], ex["caption_1"]], None, tags))
    return items


# ---- flickr30k: CLIP top-10 re-ranking --------------------------------------------------------------

def load_flickr30k_text(data_dir: str | Path, split: str | None = None) -> list[Item]:
    """``{data}/flickr30k/{split}_top10_RN50x64_text.json``: {image path: [10 captions]}, the true
    caption first. Text retrieval: pick the caption."""
    data_dir = Path(data_dir)
    path = data_dir / "flickr30k" / f"{split or 'val'}_top10_RN50x64_text.json"
    data = _read_json(path, "a JSON object {image path: [10 captions, the true one first]}")
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a non-empty JSON object {{image path: [captions]}}")
    items = []
    for img, caps in data.items():
        if not isinstance(caps, list) or len(caps) < 2 or not all(isinstance(c, str) for c in caps):
            raise DataError(f"{path}: entry {img!r} must be a list of at least 2 captions, got {caps!r:.80}")
        items.append(Item(img, "text", [str(_resolve(data_dir, img))], caps, 0))
    return items


def load_flickr30k_image(data_dir: str | Path, split: str | None = None) -> list[Item]:
    """``{data}/flickr30k/{split}_top10_RN50x64.json``: {caption: [10 image paths]}, the true image
    first; like the published loader, every 5th caption (the first of each image's five)."""
    data_dir = Path(data_dir)
    path = data_dir / "flickr30k" / f"{split or 'val'}_top10_RN50x64.json"
    data = _read_json(path, "a JSON object {caption: [10 image paths, the true one first]}")
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a non-empty JSON object {{caption: [image paths]}}")
    items = []
    for n, (cap, imgs) in enumerate(list(data.items())[::5]):
        if not isinstance(imgs, list) or len(imgs) < 2 or not all(isinstance(p, str) for p in imgs):
            raise DataError(f"{path}: entry {cap!r:.60} must be a list of at least 2 image paths")
        items.append(Item(str(n), "image", [str(_resolve(data_dir, p)) for p in imgs], [cap], 0))
    return items


TASKS: dict[str, Callable[..., list[Item]]] = {
    "jsonl": load_jsonl,
    "winoground": load_winoground,
    "flickr30k_text": load_flickr30k_text,
    "flickr30k_image": load_flickr30k_image,
}


def load_task(task: str, data: str | Path, split: str | None = None) -> list[Item]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    return TASKS[task](data, split)


def iter_items(items: list[Item], limit: int | None) -> Iterator[Item]:
    yield from items[:limit] if limit else items
