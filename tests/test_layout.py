"""The repository root must not shadow installed packages: `kernels/` (installed as fastitm.kernels)
shares its name with the PyPI package `kernels` that transformers imports, and `python -m ...` from the
repository root puts that root first on sys.path. Each check runs in a subprocess started there, as
`python -m pytest`, `python -m fastitm` and `torchrun -m fastitm` start."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Where `import kernels` resolves, as one JSON line: its files (a regular package's __file__, or a
# namespace package's folders).
_WHERE = ("import json, kernels; "
          "print(json.dumps([kernels.__file__] if getattr(kernels, '__file__', None) else list(kernels.__path__)))")


def _run(code: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _installed_kernels(tmp_path) -> list[str] | None:
    """Where `import kernels` resolves from a folder outside the repository: the installed package's
    files, or None where no `kernels` is installed."""
    probe = ("import importlib.util, json; s = importlib.util.find_spec('kernels'); "
             "print(json.dumps(s.origin if s else None))")
    if json.loads(_run(probe, tmp_path)) is None:
        return None
    return json.loads(_run(_WHERE, tmp_path).splitlines()[-1])


def test_import_kernels_from_the_root_is_the_installed_package(tmp_path):
    installed = _installed_kernels(tmp_path)
    from_root = json.loads(_run(_WHERE, ROOT).splitlines()[-1])
    if installed is not None:
        assert from_root == installed, f"the repository's kernels/ shadows the installed package: {from_root}"
    # Where none is installed, the folder may be found as a namespace portion, never as a package.
    assert str(ROOT / "kernels" / "__init__.py") not in from_root


def test_tiny_model_scores_from_the_root_with_our_kernels_as_fastitm_kernels(tmp_path):
    # diffusers' UNet and LoRA modules import the PyPI kernels through transformers: both must load.
    code = """
import json, torch, fastitm, fastitm.kernels, fastitm.kernels.error_reduce as er
import fastitm.testing as t
from fastitm.models import lora  # peft + diffusers.loaders
model = t.tiny_model(0)
g = torch.Generator().manual_seed(3)
images = torch.rand(2, 3, 16, 16, generator=g)
texts = ["a dog", "a cat", "a red dog"]
fast = fastitm.score(images, texts, model=model, timesteps=[100, 500, 900], seed=0, progress=False)
ref = fastitm.reference.score(images, texts, model=model, timesteps=[100, 500, 900], seed=0)
print(json.dumps({"kernels": list(fastitm.kernels.__path__), "er": er.__file__,
                  "fast": fast.matrix.tolist(), "ref": ref.matrix.tolist()}))
"""
    out = json.loads(_run(code, ROOT).splitlines()[-1])
    assert [Path(p).resolve() for p in out["kernels"]] == [ROOT / "kernels"]
    assert Path(out["er"]).resolve() == ROOT / "kernels" / "error_reduce.py"
    fast, ref = out["fast"], out["ref"]
    assert len(fast) == 2 and len(fast[0]) == 3
    for row_f, row_r in zip(fast, ref, strict=True):
        assert row_f == pytest.approx(row_r, rel=1e-5, abs=1e-6)


def test_python_m_fastitm_score_from_the_root(tmp_path):
    from PIL import Image

    image = tmp_path / "img.png"
    Image.new("RGB", (16, 16), (200, 40, 40)).save(image)
    out = tmp_path / "out.json"
    done = subprocess.run([sys.executable, "-m", "fastitm", "score", "--model", "tiny", "--images", str(image),
                           "--texts", "a dog", "a cat", "--timesteps", "2", "--no-progress", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    import torch

    import fastitm
    from fastitm import testing

    # `--model tiny` is testing.tiny_model(0): the same numbers computed here by the reference
    ref = fastitm.reference.score([image], ["a dog", "a cat"], model=testing.tiny_model(0), timesteps=2, seed=0)
    assert result["plan"]["timesteps"] == ref.plan.timesteps.tolist()
    torch.testing.assert_close(torch.tensor(result["matrix"]), ref.matrix, rtol=1e-5, atol=2e-5)
