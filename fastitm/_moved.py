"""Module paths from before the package was grouped by layer: ``import fastitm.racing`` (or
``from fastitm.model import load_model``) still works, and warns once naming where it lives now
(``fastitm.engine.racing``). The old name is the new module itself, not a copy, so patching either
patches both."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    **{f"fastitm.{m}": f"fastitm.core.{m}"
       for m in ("plan", "methods", "presets", "weights", "inputs", "result", "interrupts", "locks")},
    **{f"fastitm.{m}": f"fastitm.engine.{m}"
       for m in ("common", "sharing", "image_cache", "text_cache", "cuda_graphs", "attention", "racing",
                 "distributed")},
    **{f"fastitm.{m}": f"fastitm.models.{m}" for m in ("model", "hub", "speed")},
    "fastitm.families": "fastitm.models.families",
    "fastitm.finetune.lora": "fastitm.models.lora",
    **{f"fastitm.families.{m}": f"fastitm.models.families.{m}" for m in ("architectures", "base", "sd", "sdxl", "sd3")},
}


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} is now {MOVED[spec.name]}; import it from there (the old path will go)",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module) -> None:  # the new module ran when it was imported
        pass


def install() -> None:
    if not any(isinstance(f, _OldPaths) for f in sys.meta_path):
        sys.meta_path.insert(0, _OldPaths())  # before the path finder, which would load a second copy
