"""The Discffusion paper's benchmarks (He et al., Tables 1, 2 and 10), each read from the files its
published code (eric-ai-lab/Discffusion: ``custom_datasets.py``, ``dsd_infer.py``, ``data/``) and the
datasets' own releases read, and the few-shot protocol's split (:func:`fewshot`: train on a fraction,
evaluate on the rest).

- ``comvg``: Compositional Visual Genome, ``compositional_visual_genome.csv`` (id, sentence,
  pos_triplet, neg_triplet, pos_image_id, neg_image_id, neg_value) with ``vg_concept/<id>.jpg``: one
  sentence against its two images (pick the image); ``--split subject|object|verb`` as the published
  ComVG_sub / _obj / _verb. Its training file, ``comvg_train.csv``, is a separate download whose
  negatives are random images (``VG_100K/<id>.jpg``).
- ``refcocog``: the REFER release (``refs(google).p``, ``refs(umd).p``, ``instances.json``,
  ``images/train2014/``): each referring expression against 9 others (pick the text; R@1, R@5).
- ``vqa``: ``vqa_text_test.csv`` (sentence = question + answer, pos_image_id, neg_sentence_1..9; COCO
  val2014 images): one image against 10 question+answer texts (``--split other``); and the
  ``test.txt`` line format (``<image>*The question is asking about yes or no: <text>``): one text
  against its image and 9 others (``--split binary``). Both by default, each a subset of the report.
- ``vlchecklist``: VL-CheckList's ``corpus/v1/**.yaml`` (ANNO_PATH, IMG_ROOT) and the ``data/**.json``
  they name (``[image, {"POS": [...], "NEG": [...]}]``), image roots ``vg/``, ``hake/``, ``swig/``: the
  image against its first positive and first negative text (as VL-CheckList's ITC evaluation);
  accuracy per file, per axis (its 13: Object location and size, Attribute, Relation) and aspect.

What the published code does that fastitm does only with ``preset="published"`` (``--preset
published``), or not at all (each said where it is built):

- RefCOCOg pools every split of ``refs(google).p`` and draws each expression's 9 negatives with
  Python's ``random`` seeded 0 (``dsd_infer.py``'s ``random.seed(args.seed)``), any other string,
  even one of the same object or a repeat of another negative; it always leaves out the first 5% of
  its pairs (its training part). The default here: one split (``--split val``, google's; ``umd_val``,
  ``umd_test``, ...), 9 distinct negatives from other images of that split, seeded per expression.
- VQA binary draws each text's 9 negative images with the same seeded ``random``, from the images of
  every binary line, repeats included (an image on several lines is likelier), and caches the draw
  across runs in ``test3_neg_samples.json``. It reads ``test3.txt``, which is not published; the
  committed ``test.txt`` has the same lines' format (fastitm reads ``test3.txt`` where it exists,
  else ``test.txt``). The default here: distinct images, drawn by a generator seeded 0, in line order.
- VQA other: 386 of the 1,000 positives answer yes or no and no negative does, so those items can be
  answered by the answer's kind alone: the report breaks the subset down by ``answer=yes/no|other``.
- The published ComVG training path builds items whose images exist only in ``VG_100K`` and whose
  negatives are random images; its Winoground path calls names it never defines (fastitm's
  ``winoground`` task follows the DiffusionITM repository's working loader).
"""

from __future__ import annotations

import csv
import pickle
import random
import warnings
from pathlib import Path

from .items import DataError, Item, _read_json

# ---- shared readers ---------------------------------------------------------------------------------


def _find(root: Path, name: str, what: str) -> Path:
    """``root/name`` or ``root/data/name`` (the Discffusion repository keeps its CSVs in ``data/``)."""
    for p in (root / name, root / "data" / name):
        if p.is_file():
            return p
    raise DataError(f"{root}: no {name} (nor data/{name}); expected {what}")


def _csv_rows(path: Path, need: tuple[str, ...], limit: int | None = None) -> list[dict]:
    """The rows of a CSV with a header naming at least ``need`` (the first ``limit`` rows)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in need if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: no column(s) {missing} in its header {reader.fieldnames}")
            rows = []
            for n, row in enumerate(reader):
                if limit is not None and n >= limit:
                    break
                empty = [c for c in need if not (row.get(c) or "").strip()]
                if empty:
                    raise DataError(f"{path}:{reader.line_num}: empty field(s) {empty}")
                rows.append(row)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if not rows and limit != 0:
        raise DataError(f"{path}: no rows")
    return rows


def _data_lines(path: Path) -> int:
    """The rows the published code counts in a CSV: its lines less the header
    (``sum(1 for line in open(f)) - 1``)."""
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f) - 1


def _choose(split: str | None, names: tuple[str, ...], task: str, aliases: dict[str, str] | None = None) -> list[str]:
    """A comma-separated ``split`` as a list of known names, each once (all when None)."""
    if split is None:
        return list(names)
    aliases = aliases or {}
    chosen = list(dict.fromkeys(aliases.get(s.strip(), s.strip()) for s in split.split(",")))
    unknown = [s for s in chosen if s not in names]
    if unknown:
        raise DataError(f"{task}: unknown split {unknown}; choose from {list(names)} (comma-separated for several)")
    return chosen


# ---- ComVG ------------------------------------------------------------------------------------------

COMVG_SUBSETS = ("subject", "object", "verb")
COMVG_FORMAT = "the Discffusion repository's compositional_visual_genome.csv (id, sentence, ..., neg_value)"


def _vg(root: Path, folder: str, image_id: str) -> tuple[str, str]:
    """A Visual Genome image in ``root/<folder>`` or ``root/Visual_Genome/<folder>`` (the published layout)."""
    return (str(root / folder / f"{image_id}.jpg"), str(root / "Visual_Genome" / folder / f"{image_id}.jpg"))


def load_comvg(data_dir: str | Path, split: str | None = None, preset: str | None = None) -> list[Item]:
    """ComVG: each row's sentence against its positive and negative image (``vg_concept/``), the
    positive first; tagged with ``neg_value`` (subject, object, verb: which part of the triplet the
    negative image changes). ``split``: those subsets (default all)."""
    root = Path(data_dir)
    path = _find(root, "compositional_visual_genome.csv", COMVG_FORMAT)
    keep = set(_choose(split, COMVG_SUBSETS, "comvg", {"sub": "subject", "obj": "object"}))
    items = []
    for row in _csv_rows(path, ("id", "sentence", "pos_image_id", "neg_image_id", "neg_value")):
        if row["neg_value"] not in COMVG_SUBSETS:
            raise DataError(f"{path}: row id {row['id']}: neg_value {row['neg_value']!r} is not one of {COMVG_SUBSETS}")
        if row["neg_value"] not in keep:
            continue
        items.append(Item(row["id"], "image", [_vg(root, "vg_concept", row["pos_image_id"]),
                                               _vg(root, "vg_concept", row["neg_image_id"])],
                          [row["sentence"]], 0, {"neg_value": row["neg_value"]}))
    return items


def comvg_train(root: Path, fraction: float) -> list[Item]:
    """The published training part: the first ``int(rows * fraction)`` rows of ``comvg_train.csv``
    (rows counted as its lines less the header), images in ``VG_100K/``."""
    path = _find(root, "comvg_train.csv", "ComVG's training file (sentence, pos_image_id, neg_image_id), a separate "
                 "download from the Discffusion README's link")
    n = int(_data_lines(path) * fraction)
    return [Item(f"train/{k}", "image", [_vg(root, "VG_100K", r["pos_image_id"]), _vg(root, "VG_100K", r["neg_image_id"])],
                 [r["sentence"]], 0) for k, r in enumerate(_csv_rows(path, ("sentence", "pos_image_id", "neg_image_id"),
                                                                      limit=n))]


# ---- VQA --------------------------------------------------------------------------------------------

VQA_SUBSETS = ("other", "binary")
VQA_NEGATIVES = tuple(f"neg_sentence_{i}" for i in range(1, 10))
BINARY_PREFIX = "The question is asking about yes or no"


def _answer_kind(sentence: str) -> str:
    """``yes/no`` when the answer after the question's ``? `` is yes or no, else ``other``."""
    answer = sentence.split("? ", 1)[1].strip().lower() if "? " in sentence else ""
    return "yes/no" if answer in ("yes", "no") else "other"


def _coco(root: Path, folder: str, file: str) -> tuple[str, str]:
    return (str(root / folder / file), str(root / "images" / folder / file))


def _vqa_rows(root: Path, path: Path, folder: str, id_prefix: str, limit: int | None = None) -> list[Item]:
    """The rows of a ``vqa_text_*.csv``: the image (``COCO_<folder>_<12-digit id>.jpg``) against the
    true sentence and its 9 negatives; tagged ``subset=other`` and ``answer=yes/no|other``."""
    items = []
    for n, row in enumerate(_csv_rows(path, ("sentence", "pos_image_id", *VQA_NEGATIVES), limit=limit)):
        image = f"COCO_{folder}_{row['pos_image_id'].strip().zfill(12)}.jpg"
        items.append(Item(f"{id_prefix}{n}", "text", [_coco(root, folder, image)],
                          [row["sentence"], *(row[c] for c in VQA_NEGATIVES)], 0,
                          {"subset": "other", "answer": _answer_kind(row["sentence"])}))
    return items


def _binary_lines(root: Path) -> tuple[Path, list[tuple[int, str, str]]]:
    """(the file read, its yes/no lines as (line number, image, text))."""
    path = next((p for name in ("test3.txt", "test.txt") for p in (root / name, root / "data" / name) if p.is_file()),
                None)
    if path is None:
        raise DataError(f"{root}: no test.txt (nor test3.txt, nor data/test.txt); expected the Discffusion "
                        f"repository's data/test.txt (lines '<image>*{BINARY_PREFIX}: <text>')")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        image, star, text = line.strip().partition("*")
        if not star or "*" in text:
            raise DataError(f"{path}:{n}: expected '<image>*<text>' (one '*'), got {line[:80]!r}")
        if BINARY_PREFIX in text:
            out.append((n, image, text.split(": ", 1)[-1]))
    if not out:
        raise DataError(f"{path}: no yes/no lines ('{BINARY_PREFIX}: ...')")
    return path, out


def _binary_items(root: Path, preset: str | None) -> list[Item]:
    path, lines = _binary_lines(root)
    images = [image for _, image, _ in lines]
    items = []
    if preset == "published":  # dsd_infer.py: random.seed(0), then one random.sample per line, in order
        rng = random.Random(0)
        draws = [rng.sample([m for m in images if m != image], 9) for image in images]
    else:  # distinct images, one generator seeded 0, in line order
        rng, pool = random.Random(0), list(dict.fromkeys(images))
        draws = [rng.sample([m for m in pool if m != image], 9) for image in images]
    for (n, image, text), negs in zip(lines, draws, strict=True):
        items.append(Item(f"binary/{n}", "image", [_coco(root, "val2014", m) for m in (image, *negs)], [text], 0,
                          {"subset": "binary"}))
    return items


def load_vqa(data_dir: str | Path, split: str | None = None, preset: str | None = None) -> list[Item]:
    """VQAv2 as Discffusion poses it: ``other`` (``vqa_text_test.csv``: the image against its 10
    question+answer texts, the true one first; tagged ``answer=yes/no|other``) and ``binary`` (the
    ``test.txt`` lines: the text against its image and 9 others). COCO val2014 images in
    ``val2014/`` (or ``images/val2014/``)."""
    root = Path(data_dir)
    items: list[Item] = []
    for subset in _choose(split, VQA_SUBSETS, "vqa", {"others": "other"}):
        if subset == "other":
            path = _find(root, "vqa_text_test.csv", "the Discffusion repository's vqa_text_test.csv "
                         "(sentence, pos_image_id, neg_sentence_1..9)")
            items += _vqa_rows(root, path, "val2014", "other/")
        else:
            items += _binary_items(root, preset)
    return items


def vqa_train(root: Path, fraction: float) -> list[Item]:
    """The published training part: the first ``int(rows * fraction)`` rows of ``vqa_text_train.csv``
    (COCO train2014 images)."""
    path = _find(root, "vqa_text_train.csv", "VQA's training file (vqa_text_test.csv's columns), a separate download "
                 "from the Discffusion README's link")
    rows = _csv_rows(path, ("sentence", "pos_image_id", *VQA_NEGATIVES))
    return _vqa_rows(root, path, "train2014", "train/", limit=int(len(rows) * fraction))


# ---- RefCOCOg ---------------------------------------------------------------------------------------

REFCOCOG_SPLITS = ("val", "train", "umd_val", "umd_test", "umd_train")
PUBLISHED_FRACTION = 0.05  # the published training part, which its evaluation always leaves out


class _DataOnly(pickle.Unpickler):
    """REFER's ``refs(...).p`` hold lists, dicts, strings and numbers only: nothing else is loaded."""

    def find_class(self, module, name):
        raise DataError(f"a REFER refs file holds only lists, dicts and strings; this one names {module}.{name}")


def _refer(root: Path, split_by: str) -> tuple[list[dict], dict[int, str], dict[int, str]]:
    """(the refs of ``refs(<split_by>).p`` in file order, image id -> file name, category id -> name)."""
    path = root / f"refs({split_by}).p"
    if not path.is_file():
        raise DataError(f"{root}: no refs({split_by}).p; expected the REFER release of refcocog (refs(google).p, "
                        "refs(umd).p, instances.json, images/train2014/)")
    try:
        with open(path, "rb") as f:
            refs = _DataOnly(f).load()
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a REFER refs pickle ({e})") from None
    if not isinstance(refs, list) or not refs:
        raise DataError(f"{path}: expected a non-empty list of refs")
    for n, ref in enumerate(refs):
        need = ("ref_id", "image_id", "split", "sentences", "category_id")
        if not isinstance(ref, dict) or any(k not in ref for k in need) or not ref["sentences"] \
                or any(not isinstance(s, dict) or not isinstance(s.get("raw"), str) for s in ref["sentences"]):
            raise DataError(f"{path}: ref {n} lacks {list(need)} or sentences with 'raw' text")
    inst = _read_json(root / "instances.json", "REFER's instances.json (images, annotations, categories)")
    try:
        files = {int(im["id"]): im["file_name"] for im in inst["images"]}
        cats = {int(c["id"]): c["name"] for c in inst.get("categories", [])}
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{root / 'instances.json'}: expected images with id and file_name") from None
    missing = sorted({r["image_id"] for r in refs} - set(files))
    if missing:
        raise DataError(f"{root / 'instances.json'}: no image entry for image id(s) {missing[:5]} named in {path.name}")
    return refs, files, cats


def _refcocog_items(root: Path, refs: list[dict], files: dict, cats: dict, negatives: list[list[str]]) -> list[Item]:
    items, k = [], 0
    for ref in refs:
        for sent in ref["sentences"]:
            image = (str(root / "images" / "train2014" / files[ref["image_id"]]),
                     str(root / "train2014" / files[ref["image_id"]]))
            items.append(Item(str(sent.get("sent_id", k)), "text", [image], [sent["raw"], *negatives[k]], 0,
                              {"category": cats.get(ref["category_id"], str(ref["category_id"]))}))
            k += 1
    return items


def refcocog_root(data_dir: str | Path) -> Path:
    """The folder holding ``refs(...).p``: ``data_dir``, or its ``refcocog/`` (the published data root)."""
    root = Path(data_dir)
    return root / "refcocog" if (root / "refcocog").is_dir() and not list(root.glob("refs(*).p")) else root


def published_refcocog(root: Path) -> list[Item]:
    """Every item of ``RefcocogRetrieval('..', 'refcocog', 'google', mode='text')``, in its order,
    with the negatives Python's ``random`` seeded 0 draws there (its training part included)."""
    refs, files, cats = _refer(root, "google")
    rng = random.Random(0)
    negatives = []
    for ref in refs:  # REFER's Refs dict keeps the file's order
        for sent in ref["sentences"]:
            negs: list[str] = []
            while len(negs) < 9:
                neg_ref = rng.choice(refs)
                neg_text = rng.choice(neg_ref["sentences"])["raw"]
                if neg_text != sent["raw"]:
                    negs.append(neg_text)
            negatives.append(negs)
    return _refcocog_items(root, refs, files, cats, negatives)


def published_train_items(n_items: int, fraction: float) -> int:
    """How many items (of 10 pairs) the published RefCOCOg training part holds: ``int(fraction * pairs)``
    rounded down to a multiple of 10, pairs."""
    size = int(fraction * n_items * 10)
    return (size - size % 10) // 10


def load_refcocog(data_dir: str | Path, split: str | None = None, preset: str | None = None) -> list[Item]:
    """RefCOCOg text retrieval: each referring expression's image against it and 9 other expressions
    (the true one first; R@1, R@5). ``split``: ``val`` (google's, the default), ``train``, or
    ``umd_val`` / ``umd_test`` / ``umd_train`` (``refs(umd).p``); negatives are 9 distinct expressions
    of other images of that split, drawn by a generator seeded by the expression's id.
    ``preset="published"``: the published item list exactly (every google ref pooled, its seeded draw,
    the first 5% of its pairs left out as the published evaluation does)."""
    root = refcocog_root(data_dir)
    if preset == "published":
        if split is not None:
            raise DataError("refcocog with preset='published' pools every split, as the published code does: "
                            "give no --split")
        items = published_refcocog(root)
        return items[published_train_items(len(items), PUBLISHED_FRACTION):]
    (name,) = _choose(split or "val", REFCOCOG_SPLITS, "refcocog")
    split_by, part = ("umd", name[4:]) if name.startswith("umd_") else ("google", name)
    refs, files, cats = _refer(root, split_by)
    refs = [r for r in refs if r["split"] == part]
    if not refs:
        raise DataError(f"{root}: refs({split_by}).p has no {part!r} refs")
    pool = [(r["image_id"], s["raw"]) for r in refs for s in r["sentences"]]
    negatives = []
    for ref in refs:
        for sent in ref["sentences"]:
            rng = random.Random(f"refcocog:{split_by}:{part}:{sent.get('sent_id')}:{sent['raw']}")
            negs: list[str] = []
            for _ in range(100 * len(pool)):  # bounded: a pool without 9 candidates is named below
                image_id, text = pool[rng.randrange(len(pool))]
                if image_id != ref["image_id"] and text != sent["raw"] and text not in negs:
                    negs.append(text)
                    if len(negs) == 9:
                        break
            if len(negs) < 9:
                raise DataError(f"refcocog {name}: fewer than 9 distinct expressions of other images for "
                                f"{sent['raw']!r}")
            negatives.append(negs)
    return _refcocog_items(root, refs, files, cats, negatives)


# ---- VL-CheckList -----------------------------------------------------------------------------------

VLC_ASPECTS = ("Object", "Attribute", "Relation")


def _flat_yaml(path: Path) -> dict[str, str]:
    """VL-CheckList's corpus files: ``KEY: "value"`` lines only (no nesting, no lists)."""
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, colon, value = line.partition(":")
        if not colon or not key.strip() or line[0].isspace():
            raise DataError(f"{path}:{n}: expected KEY: value, got {line[:80]!r}")
        out[key.strip()] = value.strip().strip("'\"")
    return out


def load_vlchecklist(data_dir: str | Path, split: str | None = None, preset: str | None = None) -> list[Item]:
    """VL-CheckList: every ``corpus/v1/<Aspect>/.../<name>.yaml`` (sorted), each naming its annotation
    file (``ANNO_PATH``) and image root (``IMG_ROOT``: ``vg``, ``hake``, ``swig`` under the data
    folder); each entry's image against its first positive and first negative text. Tags: ``file``
    (the corpus file, e.g. ``Attribute/color/vg``), ``axis`` (its folder: ``Attribute/color``,
    ``Object/Location/center``, ...: 13 in v1) and ``aspect``. ``split``: corpus files by prefix
    (``Attribute``, ``Object/Size``, ``Relation/action/vg``; comma-separated). Entries whose image is
    missing are kept (scored with ``--skip-bad``, which lists them) and counted in a warning here: the
    published loader drops them silently."""
    root = Path(data_dir)
    corpus = root / "corpus" / "v1"
    files = sorted(corpus.rglob("*.yaml"))
    if not files:
        raise DataError(f"{corpus}: no *.yaml corpus files; expected VL-CheckList's corpus/v1/ and data/ folders "
                        "in the data folder, with the image roots vg/, hake/, swig/ beside them")
    prefixes = None if split is None else [s.strip().strip("/") for s in split.split(",") if s.strip()]
    items: list[Item] = []
    missing: dict[str, list[str]] = {}
    for yml in files:
        key = yml.relative_to(corpus).with_suffix("").as_posix()
        if prefixes is not None and not any(key == p or key.startswith(p + "/") for p in prefixes):
            continue
        aspect = key.split("/")[0]
        if aspect not in VLC_ASPECTS:
            raise DataError(f"{yml}: not under one of VL-CheckList's aspects {VLC_ASPECTS}")
        conf = _flat_yaml(yml)
        if "ANNO_PATH" not in conf or "IMG_ROOT" not in conf:
            raise DataError(f"{yml}: needs ANNO_PATH and IMG_ROOT")
        anno = root / conf["ANNO_PATH"]
        rows = _read_json(anno, '[[image path, {"POS": [texts], "NEG": [texts]}], ...]')
        if not isinstance(rows, list):
            raise DataError(f"{anno}: expected a JSON list of [image path, {{POS, NEG}}] entries")
        img_root = root / conf["IMG_ROOT"]
        axis = key.rsplit("/", 1)[0]
        for n, entry in enumerate(rows):
            ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], dict)
            texts = entry[1] if ok else {}
            if not ok or not texts.get("POS") or not texts.get("NEG") \
                    or not all(isinstance(t, str) for t in (texts["POS"][0], texts["NEG"][0])):
                raise DataError(f"{anno}: entry {n}: expected [image path, {{\"POS\": [text, ...], \"NEG\": [text, "
                                f"...]}}], got {entry!r:.120}")
            image = img_root / entry[0]
            if not image.is_file():
                missing.setdefault(key, []).append(str(image))
            items.append(Item(f"{key}/{n}", "text", [str(image)], [texts["POS"][0], texts["NEG"][0]], 0,
                              {"file": key, "axis": axis, "subtype": "/".join(key.split("/")[:2]), "aspect": aspect}))
    if prefixes is not None and not items:
        raise DataError(f"vlchecklist: no corpus file matches --split {split!r} (e.g. Attribute, Object/Size, "
                        "Relation/action/vg)")
    if missing:
        total = sum(len(v) for v in missing.values())
        where = "; ".join(f"{k}: {len(v)} (e.g. {v[0]})" for k, v in missing.items())
        warnings.warn(f"VL-CheckList: {total} of {len(items)} entries name images that are missing ({where}); "
                      "pass --skip-bad to score the others (report.json lists the ones left out)", stacklevel=2)
    return items


LOADERS = {"comvg": load_comvg, "refcocog": load_refcocog, "vqa": load_vqa, "vlchecklist": load_vlchecklist}


# What dsd_infer.py runs per task under preset="published" with the discffusion method: its timesteps
# (``--sampling_time_steps`` in the Discffusion README's commands; its default 30 elsewhere) and its
# precision (``DSD_Model`` loads SD 2.1-base in float16: on CUDA; a CPU keeps float32, where float16
# convolutions have no fast path). Shared noise per timestep, the layers, the use_bias term and the
# latents are the method's published preset (fastitm.core.presets).
PUBLISHED_TIMESTEPS = {"comvg": 40, "refcocog": 10, "vqa": 200}
PUBLISHED_DEFAULT_TIMESTEPS = 30
PUBLISHED_DTYPE = "fp16"


def published_choices(task: str, method: str | None) -> dict:
    """The run choices dsd_infer.py makes for ``task`` ({} unless ``method`` is discffusion)."""
    if method != "discffusion":
        return {}
    return {"timesteps": PUBLISHED_TIMESTEPS.get(task, PUBLISHED_DEFAULT_TIMESTEPS), "dtype": PUBLISHED_DTYPE}
