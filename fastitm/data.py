"""Synthetic compositional image-caption data, deterministic from a seed.

Small images (32x32 by default) of one or two flat-coloured objects on a dark background, with
captions such as "a big red circle" or "a red circle left of a blue square", and hard negatives of
the kinds GDBench and Winoground probe:

- ``colour``: one object's colour replaced ("a green circle left of a blue square");
- ``shape``: one object's shape replaced ("a red triangle left of a blue square");
- ``swap_attributes``: the two objects' colours exchanged ("a blue circle left of a red square");
- ``swap_relation``: the relation reversed ("a red circle right of a blue square");
- ``swap_objects``: the two objects exchanged ("a blue square left of a red circle").

Splits: each scene has a combination key, (colour, shape, size) for one object and (colour,
shape, relation, colour, shape) for two; a fixed fifth of all keys is ``heldout`` and never appears
in ``train``, so held-out scenes are new combinations of parts seen in training.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field, replace

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.26, "big": 0.42}  # object side as a share of the image side
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NEGATIVE_KINDS = ("colour", "shape", "swap_attributes", "swap_relation", "swap_objects")
SPLITS = ("train", "heldout")
BACKGROUND = (24, 24, 28)


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    size: str = "big"

    def phrase(self, with_size: bool) -> str:
        return f"{self.size} {self.color} {self.shape}" if with_size else f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One object, or two with ``relation`` saying where the first is relative to the second."""

    objects: tuple[Obj, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        if len(self.objects) not in (1, 2) or (len(self.objects) == 2) != (self.relation is not None):
            raise ValueError("a scene is one object, or two objects and a relation")
        for o in self.objects:
            if o.color not in COLORS or o.shape not in SHAPES or o.size not in SIZES:
                raise ValueError(f"unknown object {o}")
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}; choose one of {tuple(RELATIONS)}")

    @property
    def caption(self) -> str:
        if len(self.objects) == 1:
            return f"a {self.objects[0].phrase(True)}"
        a, b = self.objects
        return f"a {a.phrase(False)} {self.relation} a {b.phrase(False)}"

    @property
    def key(self) -> tuple:
        """The combination the train/held-out split is made on."""
        if len(self.objects) == 1:
            o = self.objects[0]
            return (o.color, o.shape, o.size)
        a, b = self.objects
        return (a.color, a.shape, self.relation, b.color, b.shape)

    @property
    def split(self) -> str:
        return "heldout" if zlib.crc32(repr(self.key).encode()) % 5 == 0 else "train"


@dataclass
class Example:
    """An image with its caption and its hard negatives (kind -> caption; kinds that do not apply
    to the scene, e.g. relation swaps for one object, are absent)."""

    image: object  # PIL.Image.Image
    scene: Scene
    negatives: dict[str, str] = field(default_factory=dict)

    @property
    def caption(self) -> str:
        return self.scene.caption


def vocabulary() -> list[str]:
    """Every word a caption can use (a tokenizer with these as whole words reads captions exactly)."""
    words = ["a"] + list(COLORS) + list(SHAPES) + list(SIZES)
    for rel in RELATIONS:
        words += rel.split()
    return list(dict.fromkeys(words))


def all_scenes(split: str | None = None) -> list[Scene]:
    """Every scene combination (objects big by default in two-object scenes), optionally one split's."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    scenes = [Scene((Obj(c, s, z),)) for c in COLORS for s in SHAPES for z in SIZES]
    for c1 in COLORS:
        for s1 in SHAPES:
            for rel in RELATIONS:
                for c2 in COLORS:
                    for s2 in SHAPES:
                        if c1 != c2 and s1 != s2:  # distinct in both, so every negative kind applies
                            scenes.append(Scene((Obj(c1, s1), Obj(c2, s2)), rel))
    return [s for s in scenes if split is None or s.split == split]


def negatives(scene: Scene, rng: random.Random) -> dict[str, str]:
    """Hard-negative captions of every kind that applies; each differs from the true caption and is
    false for the image."""
    out: dict[str, str] = {}
    objs = list(scene.objects)
    n = rng.randrange(len(objs))
    o = objs[n]
    other = [c for c in COLORS if c != o.color and (len(objs) == 1 or c != objs[1 - n].color)]
    recolored = objs.copy()
    recolored[n] = replace(o, color=rng.choice(other))
    out["colour"] = Scene(tuple(recolored), scene.relation).caption
    other = [s for s in SHAPES if s != o.shape and (len(objs) == 1 or s != objs[1 - n].shape)]
    reshaped = objs.copy()
    reshaped[n] = replace(o, shape=rng.choice(other))
    out["shape"] = Scene(tuple(reshaped), scene.relation).caption
    if len(objs) == 2:
        a, b = objs
        out["swap_attributes"] = Scene((replace(a, color=b.color), replace(b, color=a.color)), scene.relation).caption
        out["swap_relation"] = Scene((a, b), RELATIONS[scene.relation]).caption
        out["swap_objects"] = Scene((b, a), scene.relation).caption
    return out


def _draw(draw, shape: str, cx: float, cy: float, r: float, color) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        s = r * 0.86
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=color)
    elif shape == "cross":
        w = r * 0.36
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, rng: random.Random, size: int = 32):
    """Draw the scene (positions jittered by ``rng``) at 4x and downsample: a ``size`` px RGB image."""
    from PIL import Image, ImageDraw

    S = 4 * size
    img = Image.new("RGB", (S, S), BACKGROUND)
    draw = ImageDraw.Draw(img)
    if len(scene.objects) == 1:
        o = scene.objects[0]
        r = SIZES[o.size] * S / 2
        cx, cy = rng.uniform(r + 2, S - r - 2), rng.uniform(r + 2, S - r - 2)
        _draw(draw, o.shape, cx, cy, r, COLORS[o.color])
    else:
        a, b = scene.objects
        ra, rb = (SIZES["small" if rng.random() < 0.3 else "big"] * S / 2 * 0.85 for _ in range(2))
        # Along the relation's axis the first object sits in its half, the second in the other;
        # across it the two stay within a few pixels so the relation is unambiguous.
        main_a = rng.uniform(ra + 2, S / 2 - 2)
        main_b = rng.uniform(S / 2 + 2, S - rb - 2)
        if scene.relation in ("right of", "below"):
            main_a, main_b = S - main_a, S - main_b
        cross = rng.uniform(max(ra, rb) + 2, S - max(ra, rb) - 2)
        da, db = (rng.uniform(-S * 0.06, S * 0.06) for _ in range(2))
        ca, cb = min(max(cross + da, ra + 1), S - ra - 1), min(max(cross + db, rb + 1), S - rb - 1)
        if scene.relation in ("left of", "right of"):
            pa, pb = (main_a, ca), (main_b, cb)
        else:
            pa, pb = (ca, main_a), (cb, main_b)
        _draw(draw, a.shape, *pa, ra, COLORS[a.color])
        _draw(draw, b.shape, *pb, rb, COLORS[b.color])
    return img.resize((size, size), Image.BOX)


def make_dataset(n: int, split: str = "train", seed: int = 0, *, size: int = 32,
                 two_object_share: float = 0.6) -> list[Example]:
    """``n`` examples of one split, deterministic from ``seed``: a scene drawn from the split's
    combinations (two objects with probability ``two_object_share``), its image and negatives."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= two_object_share <= 1.0:
        raise ValueError(f"two_object_share must be in [0, 1], got {two_object_share}")
    scenes = all_scenes(split)
    singles = [s for s in scenes if len(s.objects) == 1]
    pairs = [s for s in scenes if len(s.objects) == 2]
    rng = random.Random(f"fastitm-data-{split}-{seed}")
    out = []
    for _ in range(n):
        scene = rng.choice(pairs if rng.random() < two_object_share else singles)
        out.append(Example(render(scene, rng, size), scene, negatives(scene, rng)))
    return out
