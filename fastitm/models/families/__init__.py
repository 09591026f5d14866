"""Model families: Stable Diffusion 1.x/2.x, SDXL and SD 3 / 3.5 (flow matching).

:func:`detect` reads a diffusers folder's ``model_index.json`` (the pipeline class) and returns the
:class:`~fastitm.models.families.base.Family` that scores it; each family module says how its texts are
encoded, how latents are noised, what the denoiser predicts and how it is called.

=========  =====================================  =========================================
family     pipeline                               methods
=========  =====================================  =========================================
``sd``     StableDiffusionPipeline (1.x, 2.x)     diffusion_itm, discffusion, diffusion_classifier
``sdxl``   StableDiffusionXLPipeline              diffusion_itm, discffusion, diffusion_classifier
``sd3``    StableDiffusion3Pipeline (3, 3.5)      diffusion_itm, diffusion_classifier
=========  =====================================  =========================================
"""

from __future__ import annotations

from pathlib import Path

from .base import Family, ModelError, concat_cond, read_json, take_cond
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

FAMILIES: dict[str, Family] = {f.name: f for f in (StableDiffusion(), StableDiffusionXL(), StableDiffusion3())}

__all__ = ["FAMILIES", "Family", "ModelError", "concat_cond", "detect", "get", "supported", "take_cond"]


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def supported() -> str:
    """One line naming each family and its pipeline class, for error messages."""
    return "; ".join(f"{f.label} ({f.pipelines[0]})" for f in FAMILIES.values())


def detect(path: Path) -> tuple[Family, dict]:
    """The family of the diffusers folder ``path`` and its model_index.json (``{}`` without one).

    The pipeline class named in model_index.json decides; a folder without one (an older export)
    is recognised by its components: ``transformer/`` for SD 3, ``text_encoder_2/`` for SDXL,
    ``unet/`` for SD 1.x/2.x.
    """
    index_file = path / "model_index.json"
    if index_file.is_file():
        index = read_json(index_file)
        cls = index.get("_class_name")
        for fam in FAMILIES.values():
            if cls in fam.pipelines:
                return fam, index
        raise ModelError(f"{index_file} names the pipeline {cls!r}, which fastitm does not score; supported: "
                         f"{supported()}")
    if (path / "transformer").is_dir():
        return FAMILIES["sd3"], {}
    if (path / "text_encoder_2").is_dir():
        return FAMILIES["sdxl"], {}
    return FAMILIES["sd"], {}
