"""Retrieval and Winoground metrics against hand-worked matrices."""

import pytest
import torch

from fastitm.core.plan import Plan
from fastitm.core.result import ScoreResult, winoground


def result(matrix):
    plan = Plan(torch.tensor([10]), torch.zeros(1, 4, 2, 2))
    return ScoreResult(torch.tensor(matrix, dtype=torch.float32), plan, "diffusion_itm", {})


def test_text_and_image_retrieval():
    r = result([[0.1, 0.9, 0.5], [0.8, 0.2, 0.3]])
    assert r.text_retrieval(2).tolist() == [[1, 2], [0, 2]]
    assert r.image_retrieval(1).tolist() == [[1], [0], [0]]
    assert r.text_accuracy([1, 1]) == 0.5
    assert r.text_accuracy([2, 2], k=2) == 1.0
    assert r.image_accuracy([1, 0, 1]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="exceeds the number of texts"):
        r.text_retrieval(4)
    with pytest.raises(ValueError, match="3 entries, expected 2"):
        r.text_accuracy([0, 1, 2])


def test_winoground_scores():
    # group 0: all right; group 1: text right, image wrong; group 2: a tie fails the text score
    m = torch.tensor([
        [[2.0, 1.0], [0.0, 3.0]],
        [[2.0, 1.0], [2.5, 3.0]],
        [[1.0, 1.0], [0.0, 3.0]],
    ])
    w = winoground(m)
    assert w == {"text": pytest.approx(2 / 3), "image": pytest.approx(2 / 3), "group": pytest.approx(1 / 3), "groups": 3}
    r = result(torch.block_diag(m[0], m[1]).tolist())
    assert r.winoground()["group"] == 0.5
    assert r.winoground(groups=[((0, 1), (0, 1))])["group"] == 1.0
    with pytest.raises(ValueError, match="even side"):
        result([[1.0, 2.0, 3.0]]).winoground()


def test_unscored_pairs_are_not_candidates_and_ties_never_count_for_the_truth():
    """With pairs=, unscored cells (NaN) neither outrank nor count; a true pair that was not scored is
    an error; ties go against the truth, as in fastitm eval and winoground (by hand)."""
    nan = float("nan")
    # a diagonal mask, each image's only text the right one: every choice is right
    diag = result([[0.3, nan, nan], [nan, -2.0, nan], [nan, nan, 0.0]])
    assert diag.text_accuracy([0, 1, 2]) == 1.0 and diag.image_accuracy([0, 1, 2]) == 1.0
    assert diag.text_retrieval(1).tolist() == [[0], [1], [2]]
    # block pairs: image 0 scores texts 0 and 1 only; its true text 1 beats text 0, NaN text 2 is no rival
    blocks = result([[0.1, 0.4, nan], [nan, nan, 0.2]])
    assert blocks.text_accuracy([1, 2]) == 1.0 and blocks.text_retrieval(2).tolist()[0] == [1, 0]
    with pytest.raises(ValueError, match="true text 0 of image 1 was not scored"):
        blocks.text_accuracy([1, 0])
    # identical captions score alike: the tie is never right, whichever index is the truth
    tie = result([[0.5, 0.5]])
    assert tie.text_accuracy([0]) == 0.0 and tie.text_accuracy([1]) == 0.0
    assert tie.text_accuracy([0], k=2) == 1.0  # one rival at least as high: rank 1 < 2


def test_finetune_is_reachable_after_import_fastitm():
    import subprocess
    import sys

    # ...and `import fastitm` alone stays light: torch._dynamo (2-3 s of import) only when compiling or
    # when diffusers loads it
    code = ("import sys, fastitm; print('torch._dynamo' in sys.modules, fastitm.finetune.finetune.__name__, "
            "fastitm.engine.racing.RaceOptions.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "finetune", "RaceOptions"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import fastitm

        fastitm.nope  # noqa: B018
