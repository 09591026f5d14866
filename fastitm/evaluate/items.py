"""What every task loader builds on: :class:`Item` (one small scoring problem), :class:`DataError`,
the identical-candidate rule (:func:`drop_identical`) and the file readers that name the problem.

An item is one small scoring problem: some images, some texts, and which one is right.

- ``kind="text"``: one image, K candidate texts, ``label`` = the true text's index;
- ``kind="image"``: K candidate images, one text, ``label`` = the true image's index;
- ``kind="group"``: a Winoground group, images (i0, i1) x texts (t0, t1), image k matches text k.

Images are given as paths (or a tuple of alternative paths: the first that exists is read) or PIL
images, and decoded only when the item is scored. A missing or malformed file raises
:class:`DataError` naming the file, the field and the expected format.

A candidate identical to the true one is not a negative (:func:`drop_identical`): the same text after
the task's preprocessing, the same image file (and, when decoded, the same pixels). It gets
bit-identical scores, so it could only ever tie; it is dropped and counted, and an item left with no
negative is counted and left out of the metrics.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ITEM_KINDS = ("text", "image", "group")


class DataError(ValueError):
    """A dataset file is missing or not in the expected format; the message names the file and field."""


@dataclass
class Item:
    """One scoring problem. ``images``: paths, tuples of alternative paths, or PIL images; ``texts``:
    strings; ``label``: the right candidate (None for groups and the bias tasks); ``tags``: what the
    metrics break down by (e.g. Winoground's tag), a string or a list of strings (the item counts
    under each); ``dropped``: candidates removed as identical to the true one; ``kept``: the original
    indices of the candidates left (None when none was dropped); ``classes``: zero-shot classification
    (the classify task), each candidate text's class, several prompts per class allowed: ``label`` is
    then the true class, and a class scores as its best prompt (as the Diffusion Classifier's
    ``eval_prob_adaptive.py`` predicts the class of its best prompt)."""

    id: str
    kind: str
    images: list[Any]
    texts: list[str]
    label: int | None = None
    tags: dict[str, str | list[str]] = field(default_factory=dict)
    crops: list[tuple[float, float, float, float] | None] | None = None  # per image (left, top, right, bottom)
    dropped: int = 0
    kept: list[int] | None = None
    classes: list[int] | None = None

    @property
    def candidates(self) -> int:
        """How many candidates the item chooses among."""
        if self.kind == "group":  # 2 x 2; one text or one image left: nothing to tell apart
            return min(len(self.texts), len(self.images))
        return len(self.texts) if self.kind == "text" else len(self.images)

    @property
    def has_negative(self) -> bool:
        return self.candidates >= 2


def _same_path(a: Any, b: Any) -> bool:
    """Two image references that name the same file (PIL images are compared by pixels once decoded)."""
    if isinstance(a, (str, Path)) and isinstance(b, (str, Path)):
        return Path(a).resolve() == Path(b).resolve()
    if isinstance(a, tuple) and isinstance(b, tuple):  # alternative paths
        return a == b
    return a is b


def drop_identical(item: Item, same_image: Callable[[Any, Any], bool] = _same_path) -> Item:
    """``item`` without the candidates identical to the true one: for a text choice, texts equal to
    the true text; for an image choice, images that ``same_image`` says are the true image (by
    default: the same file). A group whose two texts or two images are identical keeps no negative:
    it is returned with one text (and ``has_negative`` False). Items without a ground truth (the
    bias tasks) are returned as they are."""
    if item.kind == "group":
        if item.texts[0] == item.texts[1] or same_image(item.images[0], item.images[1]):
            return replace(item, texts=item.texts[:1], images=item.images[:1], dropped=item.dropped + 1)
        return item
    if item.label is None or item.classes is not None:  # classify: its prompt file refuses repeated prompts
        return item
    cands = item.texts if item.kind == "text" else item.images
    truth = cands[item.label]
    keep = [n for n, c in enumerate(cands) if n == item.label or
            not (c == truth if item.kind == "text" else same_image(c, truth))]
    if len(keep) == len(cands):
        return item
    prev = item.kept if item.kept is not None else list(range(len(cands)))
    new = [cands[n] for n in keep]
    changes = {"texts": new} if item.kind == "text" else {
        "images": new, "crops": [item.crops[n] for n in keep] if item.crops else item.crops}
    return replace(item, label=keep.index(item.label), dropped=item.dropped + len(cands) - len(keep),
                   kept=[prev[n] for n in keep], **changes)


def _read_json(path: Path, expected: str) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected {expected})")
    try:
        return json.loads(_utf8(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}); expected {expected}") from None


def _utf8(path: Path) -> str:
    """The file's text; JSON is UTF-8 by definition, so another encoding is named as the problem."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                        "JSON files must be UTF-8: convert it, e.g. iconv -f latin1 -t utf-8") from None


def _resolve(root: Path, p: str) -> Path:
    """GDBench's JSON files name images as ``datasets/...``, with ``datasets`` standing for the data
    folder (``img_path.replace("datasets", root_dir)``); relative paths are taken under the folder."""
    if p.startswith("datasets/"):
        return root / p[len("datasets/") :]
    q = Path(p)
    return q if q.is_absolute() else root / q
