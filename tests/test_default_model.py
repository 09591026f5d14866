"""The embedded default model: shipped, loaded offline, small, and really matching images and texts.

The accuracy floor runs through the fast paths (the engine with the native and the reference ops),
so a regression anywhere on the way from pixels to scores that breaks matching fails here."""

import pytest

import fastitm
from fastitm import data, evaluate
from fastitm.models.model import embedded_model_path
from fastitm.ops import native_status


@pytest.fixture(scope="module")
def default():
    return fastitm.load_model()


def test_shipped_offline_and_within_budget(default):
    path = embedded_model_path()
    assert path is not None and default.source == str(path)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 25e6, f"embedded model is {size / 1e6:.1f} MB"
    card = (path / "README.md").read_text()
    assert "python -m fastitm.train" in card and "| UNet step |" in card
    assert default.resolution == 32 and default.latent_shape == (4, 8, 8)
    assert all(f.suffix != ".bin" for f in path.rglob("*"))  # safetensors only


BACKENDS = ["reference", pytest.param("native", marks=pytest.mark.skipif(native_status() is not None,
                                                                         reason=str(native_status())))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_accuracy_floor_on_heldout_colour_and_shape(default, backend):
    check_floor(default, backend, 30)


def test_accuracy_floor_through_triton(triton_interpret, default):
    check_floor(default, "triton", 12)


def check_floor(default, backend, n):
    examples = data.make_dataset(n, "heldout", seed=7)
    report = evaluate.hard_negatives(default, examples, kinds=("colour", "shape"), timesteps=10, seed=0,
                                     backend=backend, progress=False)
    assert report.total == {"colour": n, "shape": n}
    for kind in ("colour", "shape"):
        assert report.accuracy(kind) >= 0.8, f"{kind}: {report.accuracy(kind):.2f} on the held-out subset"


def test_matching_is_not_chance_on_image_retrieval(default):
    examples = data.make_dataset(24, "heldout", seed=8)
    acc, n = evaluate.image_retrieval(default, examples, group=6, timesteps=10, seed=0, progress=False)
    # Chance is 1/6; the shipped model gets about 0.96 here.
    assert n == 24 and acc >= 0.6, acc
