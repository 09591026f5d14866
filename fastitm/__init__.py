"""fastitm: diffusion models as fast, exact image-text matchers.

``import fastitm`` needs neither Triton, nor a GPU, nor the compiled extension; diffusers and
transformers are imported on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import data, evaluate, reference, testing  # noqa: E402
from .api import score  # noqa: E402
from .engine import Interrupted  # noqa: E402
from .image_cache import ImageCache  # noqa: E402
from .methods import METHODS  # noqa: E402
from .model import Model, ModelError, load_model  # noqa: E402
from .plan import Plan, make_plan  # noqa: E402
from .result import ScoreResult, winoground  # noqa: E402

# Subpackages with heavier dependencies, imported on first use: ``fastitm.finetune.finetune(...)``
# works after a plain ``import fastitm``.
_LAZY = ("finetune", "racing", "speed", "distributed", "scorer", "hub")


def __getattr__(name: str):
    if name == "Scorer":  # an nn.Module over a model: fastitm.Scorer(model, method=..., ...)
        from .scorer import Scorer

        return Scorer
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fastitm' has no attribute {name!r}")


__all__ = [
    "METHODS",
    "ImageCache",
    "Interrupted",
    "Model",
    "ModelError",
    "Plan",
    "ScoreResult",
    "Scorer",
    "data",
    "evaluate",
    "load_model",
    "make_plan",
    "reference",
    "score",
    "testing",
    "winoground",
]
