"""Every code block of the README and docs/ that this machine can run does run, so no snippet rots.

A page's blocks run in order in the test's own process (no interpreter start per page: the suite
stays fast): its ``python`` blocks in one namespace after ``import fastitm`` and
``model = fastitm.load_model()`` (the embedded model), then its ``bash`` blocks line by line, each
``fastitm ...`` line as ``fastitm.cli.main([...])``, which must return 0. Each page runs in a fresh folder holding what the
snippets name: ``dog.png`` and ``cat.png``, ``data/items.jsonl`` (a small jsonl set) and ``classify/``
(a folder of class folders). A block whose info string says ``no-ci: <why>`` is not run: the reason
is part of the page (placeholders, a GPU, minutes of training); a ``no-ci`` block without a reason
fails.
"""

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```\s*$", re.S | re.M)
PRELUDE = "import fastitm\nmodel = fastitm.load_model()\n"


def blocks(page: Path) -> list[tuple[str, str, str]]:
    """(language, info after it, code) of the page's fenced blocks."""
    return [(m.group(1), m.group(2).strip(), m.group(3)) for m in FENCE.finditer(page.read_text())]


def runnable(page: Path) -> tuple[list[str], list[str]]:
    py, sh = [], []
    for lang, info, code in blocks(page):
        if info.startswith("no-ci"):
            assert info[len("no-ci") :].strip(": ").strip(), f"{page.name}: a no-ci block must say why: {code[:60]!r}"
            continue
        if lang == "python":
            py.append(code)
        elif lang == "bash":
            sh.append(code)
    return py, sh


def commands(code: str) -> list[list[str]]:
    """A bash block's commands, each an argv: continuation lines joined, comments dropped."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            out.append(shlex.split(line))
    return out


@pytest.fixture
def folder(tmp_path):
    """What the snippets name, made here: two images, a jsonl set, a classification folder."""
    import random

    from fastitm import data
    from fastitm.evaluate.generate_classify import draw, object_classes, write_classification
    from fastitm.testing import write_jsonl_set

    rng = random.Random(0)
    for name, scene in (("dog.png", data.Scene((data.Obj("red", "circle"),))),
                        ("cat.png", data.Scene((data.Obj("blue", "square"),)))):
        data.render(scene, rng).save(tmp_path / name)
    write_jsonl_set(tmp_path / "data", 6, seed=0, size=32).rename(tmp_path / "data" / "items.jsonl")
    classes = object_classes()[:4]
    images, labels = draw(classes, 1, seed=0)
    write_classification("folder", tmp_path / "classify", images, labels, [s.caption[2:] for s in classes])
    return tmp_path


def test_pages_and_their_fences_are_read():
    assert {p.name for p in PAGES} >= {"README.md", "benchmarks.md", "fidelity.md", "performance.md", "finetuning.md",
                                       "models.md", "ARCHITECTURE.md"}
    py, sh = runnable(REPO / "README.md")
    assert len(py) >= 3 and len(sh) >= 3  # scoring, evaluation, fine-tuning, each in Python and on the command line
    assert commands('fastitm eval x \\\n    --data d  # why\n# a comment\n') == [["fastitm", "eval", "x", "--data", "d"]]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_snippet_runs(page, folder, monkeypatch, capsys):
    """In this process (no interpreter start per page), in the page's own folder and namespace."""
    from fastitm.cli import main

    py, sh = runnable(page)
    monkeypatch.chdir(folder)
    if py:
        namespace: dict = {"__name__": f"snippets of {page.name}"}
        exec(PRELUDE, namespace)
        for code in py:
            exec(compile(code, f"<{page.name} python block>", "exec"), namespace)
    for code in sh:
        for argv in commands(code):
            assert argv[0] == "fastitm", f"{page.name}: only fastitm commands run here, not {argv[0]}: mark it no-ci"
            assert main(argv[1:]) == 0, f"{page.name}: {shlex.join(argv)} failed:\n{capsys.readouterr().err[-3000:]}"
