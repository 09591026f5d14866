"""The synthetic compositional data: determinism, splits, negatives, and images that show their captions."""

import random

import numpy as np
import pytest

from fastitm import data


def test_deterministic_from_seed():
    a = data.make_dataset(12, "train", seed=3)
    b = data.make_dataset(12, "train", seed=3)
    c = data.make_dataset(12, "train", seed=4)
    assert [e.caption for e in a] == [e.caption for e in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b, strict=True))
    assert [x.negatives for x in a] == [y.negatives for y in b]
    assert [e.caption for e in a] != [e.caption for e in c]


def test_splits_share_no_combination():
    train, held = data.all_scenes("train"), data.all_scenes("heldout")
    assert not {s.key for s in train} & {s.key for s in held}
    assert 0.1 < len(held) / (len(train) + len(held)) < 0.3
    assert {len(s.objects) for s in held} == {1, 2}
    for split, keys in (("train", {s.key for s in train}), ("heldout", {s.key for s in held})):
        assert {e.scene.key for e in data.make_dataset(200, split, seed=0)} <= keys


def test_negatives_are_hard_and_false():
    rng = random.Random(0)
    for scene in data.all_scenes()[::7]:
        negs = data.negatives(scene, rng)
        kinds = set(data.NEGATIVE_KINDS) if len(scene.objects) == 2 else {"colour", "shape"}
        assert set(negs) == kinds
        words = sorted(scene.caption.split())
        for kind, cap in negs.items():
            assert cap != scene.caption
            if kind in ("swap_attributes", "swap_objects"):
                assert sorted(cap.split()) == words  # same words, different binding or order
            else:  # exactly one word changed
                assert len(cap.split()) == len(words)
                changed = [(x, y) for x, y in zip(scene.caption.split(), cap.split(), strict=True) if x != y]
                assert len(changed) == 1
                x, y = changed[0]
                pool = {"colour": data.COLORS, "shape": data.SHAPES, "swap_relation": ("left", "right", "above", "below")}
                assert x in pool[kind] and y in pool[kind]


def _mask(img, color):
    arr = np.asarray(img).astype(int)
    return (np.abs(arr - np.array(data.COLORS[color])).sum(axis=2) < 60)


@pytest.mark.parametrize("split", data.SPLITS)
def test_images_show_their_captions(split):
    """Independent check from the pixels: each named colour is drawn, big objects cover more than
    small ones, and the first object's centroid lies on the stated side of the second's."""
    for e in data.make_dataset(60, split, seed=1):
        assert e.image.size == (32, 32)
        objs = e.scene.objects
        masks = [_mask(e.image, o.color) for o in objs]
        assert all(m.sum() >= 8 for m in masks), e.caption
        if len(objs) == 1:
            area = masks[0].sum()
            assert (area > 60) if objs[0].size == "big" else (area < 60), (e.caption, area)
            continue
        (ya, xa), (yb, xb) = (np.argwhere(m).mean(axis=0) for m in masks)
        expect = {"left of": xa < xb - 4, "right of": xa > xb + 4, "above": ya < yb - 4, "below": ya > yb + 4}
        assert expect[e.scene.relation], (e.caption, (xa, ya), (xb, yb))


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        data.make_dataset(2, "test")
    with pytest.raises(ValueError, match="n must be"):
        data.make_dataset(-1)
    with pytest.raises(ValueError, match="unknown object"):
        data.Scene((data.Obj("pink", "circle"),))
    with pytest.raises(ValueError, match="relation"):
        data.Scene((data.Obj("red", "circle"), data.Obj("blue", "square")), "near")


def test_vocabulary_tokenizes_captions_compactly_and_reversibly():
    from fastitm.testing import tiny_tokenizer

    tok = tiny_tokenizer(data.vocabulary())
    caps = {c for e in data.make_dataset(40, "heldout", seed=0) for c in [e.caption, *e.negatives.values()]}
    ids = {}
    for cap in caps:
        pieces = tok.tokenize(cap)
        # Whole words where BPE's merge ranks allow ("green" splits after "red"'s r+e merge).
        assert len(pieces) <= len(cap.split()) + 3
        enc = tok(cap).input_ids
        assert tok.decode(enc, skip_special_tokens=True).strip() == cap
        ids[tuple(enc)] = cap
    assert len(ids) == len(caps)  # no two captions read the same
