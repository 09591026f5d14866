"""Synthetic datasets in the released on-disk layouts of the Discffusion paper's tasks, drawn from
:mod:`fastitm.data`'s held-out scenes (what ``fastitm demo`` scores): the embedded model runs every such
task end to end on them, with no download, and a user sees each layout filled in.

``write_dataset(task, out)`` writes ``out`` so that ``fastitm eval TASK --data out`` reads it:

- ``comvg``: ``compositional_visual_genome.csv`` and ``vg_concept/<id>.jpg``: each scene's caption against
  its image and another scene's;
- ``vqa``: ``vqa_text_test.csv`` ("What is in the picture? <caption>" against 9 other answers: the
  scene's hard negatives first), ``test.txt`` (its yes/no lines) and ``val2014/``;
- ``refcocog``: ``refs(google).p`` (one ref per scene, all in ``val``), ``instances.json`` and
  ``images/train2014/``;
- ``vlchecklist``: three corpus files (``Attribute/color``, ``Object/Location/center`` with shape
  negatives, ``Relation/spatial`` with swapped relations) and their annotation files, images in ``vg/``.
"""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

from .. import data

WRITERS = ("comvg", "vqa", "refcocog", "vlchecklist")


def write_dataset(task: str, out: str | Path, n: int = 12, seed: int = 0) -> Path:
    """Write ``n`` held-out scenes (at least 10) as ``task``'s released layout under ``out``; returns ``out``."""

    if task not in WRITERS:
        raise ValueError(f"no synthetic layout for {task!r}; one of {WRITERS}")
    if n < 10:
        raise ValueError(f"n must be at least 10 (a VQA or RefCOCOg item has 10 candidates), got {n}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # scenes with distinct captions: a repeated caption would be a candidate identical to the true one
    examples = list({e.caption: e for e in data.make_dataset(8 * n, "heldout", seed=seed)}.values())[: 2 * n]
    if len(examples) < 2 * n:
        raise ValueError(f"the held-out scenes have {len(examples)} distinct captions; n must be at most {len(examples) // 2}")
    {"comvg": _comvg, "vqa": _vqa, "refcocog": _refcocog, "vlchecklist": _vlchecklist}[task](out, examples, n)
    return out


def _save(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")  # lossless whatever the extension: the pixels scored are the pixels drawn


def _comvg(out: Path, ex, n: int) -> None:
    with open(out / "compositional_visual_genome.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "sentence", "pos_triplet", "neg_triplet", "pos_image_id", "neg_image_id", "neg_value"])
        for k in range(n):
            pos, neg = 100 + k, 100 + n + k
            w.writerow([k + 1, ex[k].caption, "", "", pos, neg, ("subject", "object", "verb")[k % 3]])
            _save(ex[k].image, out / "vg_concept" / f"{pos}.jpg")
            _save(ex[n + k].image, out / "vg_concept" / f"{neg}.jpg")


def _others(ex, k: int, n: int) -> list[str]:
    """Nine captions false for scene k: its hard negatives, then other scenes' captions."""
    own = ex[k].caption
    out = [c for c in ex[k].negatives.values() if c != own]
    out += [e.caption for e in ex[:n] if e.caption != own and e.caption not in out]
    return out[:9]


def _vqa(out: Path, ex, n: int) -> None:
    q = "What is in the picture?"
    with open(out / "vqa_text_test.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "pos_image_id", *(f"neg_sentence_{i}" for i in range(1, 10))])
        for k in range(n):
            w.writerow([f"{q} {ex[k].caption}", 300 + k, *(f"{q} {c}" for c in _others(ex, k, n))])
            _save(ex[k].image, out / "val2014" / f"COCO_val2014_{300 + k:012d}.jpg")
    lines = [f"COCO_val2014_{300 + k:012d}.jpg*The question is asking about yes or no: is this {ex[k].caption}? yes"
             for k in range(n)]
    (out / "test.txt").write_text("\n".join(lines) + "\n")


def _refcocog(out: Path, ex, n: int) -> None:
    refs, images = [], []
    for k in range(n):
        image_id, name = 500 + k, f"COCO_train2014_{500 + k:012d}.jpg"
        images.append({"id": image_id, "file_name": name, "height": ex[k].image.height, "width": ex[k].image.width})
        refs.append({"ref_id": k, "ann_id": 900 + k, "image_id": image_id, "category_id": 1, "split": "val",
                     "sentences": [{"raw": ex[k].caption, "sent": ex[k].caption, "sent_id": 700 + k,
                                    "tokens": ex[k].caption.split()}],
                     "sent_ids": [700 + k], "file_name": f"COCO_train2014_{image_id:012d}_{900 + k}.jpg"})
        _save(ex[k].image, out / "images" / "train2014" / name)
    with open(out / "refs(google).p", "wb") as f:
        pickle.dump(refs, f)
    (out / "instances.json").write_text(json.dumps({"images": images, "annotations": [],
                                                    "categories": [{"id": 1, "name": "shape"}]}))


def _vlchecklist(out: Path, ex, n: int) -> None:
    corpora = {"Attribute/color": "colour", "Object/Location/center": "shape", "Relation/spatial": "swap_relation"}
    for axis, kind in corpora.items():
        entries = []
        for k in range(n):
            if kind in ex[k].negatives:
                path = f"VG_100K/{k}.jpg"
                _save(ex[k].image, out / "vg" / path)
                entries.append([path, {"POS": [ex[k].caption], "NEG": [ex[k].negatives[kind]]}])
        anno = f"data/{axis}/synthetic.json"
        (out / anno).parent.mkdir(parents=True, exist_ok=True)
        (out / anno).write_text(json.dumps(entries))
        yml = out / "corpus" / "v1" / axis / "synthetic.yaml"
        yml.parent.mkdir(parents=True, exist_ok=True)
        yml.write_text(f'ANNO_PATH: "{anno}"\nIMG_ROOT: "vg/"\nTYPE: "TUPLE_JSON"\n')
