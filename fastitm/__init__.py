"""fastitm: diffusion models as fast, exact image-text matchers.

``import fastitm`` needs neither Triton, nor a GPU, nor the compiled extension; diffusers and
transformers are imported on first use.
"""

from __future__ import annotations

from ._version import __version__  # noqa: F401


def _map_source_kernels() -> None:
    # The top-level kernels/ folder installs as fastitm.kernels (setup.py's package_dir). It has no
    # __init__.py on purpose: `kernels` is also a PyPI package (transformers needs it), and a process
    # started in the repository root has that root first on sys.path, where a regular package named
    # kernels would shadow the installed one; a folder without __init__.py is only a namespace portion,
    # which Python passes over for a regular package found later on sys.path. A wheel holds the folder
    # inside this one (fastitm/kernels/), found as usual. A source checkout (the editable install, or
    # any run from the repository root) holds it beside this folder, and setuptools' editable finder
    # cannot map a namespace folder under a regular package, so that mapping is made here: a namespace
    # package over ../kernels, importing nothing (Triton stays unimported until a kernel is used).
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).absolute().parent  # not resolved: a linked install's own folder counts
    beside = here.parent / "kernels"
    # Only our own folder: a regular package there (the PyPI kernels, in site-packages) is not ours.
    if (here / "kernels").is_dir() or not beside.is_dir() or (beside / "__init__.py").exists():
        return
    spec = importlib.machinery.ModuleSpec(__name__ + ".kernels", None, is_package=True)
    spec.submodule_search_locations = [str(beside)]
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    globals()["kernels"] = module


_map_source_kernels()

from . import _moved  # noqa: E402

_moved.install()  # the module paths from before the layers (fastitm.racing, fastitm.model, ...) still import

from . import data, evaluate, reference, testing  # noqa: E402
from .api import score  # noqa: E402
from .core.methods import METHODS  # noqa: E402
from .core.plan import Plan, make_plan  # noqa: E402
from .core.result import ScoreResult, winoground  # noqa: E402
from .engine.engine import Interrupted  # noqa: E402
from .engine.image_cache import ImageCache  # noqa: E402
from .models.model import Model, ModelError, load_model  # noqa: E402

# Subpackages with heavier dependencies, imported on first use: ``fastitm.finetune.finetune(...)``
# works after a plain ``import fastitm``.
_LAZY = {"finetune": ".finetune", "racing": ".engine.racing", "speed": ".models.speed",
         "distributed": ".engine.distributed", "scorer": ".scorer", "hub": ".models.hub"}


def __getattr__(name: str):
    if name == "Scorer":  # an nn.Module over a model: fastitm.Scorer(model, method=..., ...)
        from .scorer import Scorer

        return Scorer
    if name in _LAZY:
        import importlib

        return importlib.import_module(_LAZY[name], __name__)
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
