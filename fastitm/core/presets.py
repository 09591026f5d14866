"""``preset="published"``: one switch that makes each method compute what its published code computes.

fastitm's defaults are its clean per-pair definitions (posterior-mean latents, the DiffusionITM grid,
antialiased float resizing). The published scripts each made other choices; a preset sets every one
of them at once, and anything passed explicitly overrides the preset's value (e.g.
``preset="published", latent="mean"`` for a deterministic comparison). Each choice below names the
file of the published code it follows.

DiffusionITM (McGill-NLP/diffusion-itm, ``diffusion_itm.py`` with its diffusers fork's img2img
pipeline; images loaded by ``datasets_loading.py``):
  - ``resize="squash_pil"``: ``img.resize((512, 512))`` on the uint8 PIL image (bicubic);
  - ``latent="sample_per_timestep"``: the pipeline encodes the image again and draws a new VAE
    posterior sample at every timestep (fastitm shares each draw among the image's texts);
  - ``scheme="grid"``: ``range(10, 990, 1000 // T)``; ``err="l2"``: the L2 norm of the error.
  - ``normalize`` stays the caller's choice: the published script subtracts the empty-prompt error
    only with ``--img_retrieval`` (``fastitm eval`` leaves it out on its own where every item chooses
    among one image's texts).

Diffusion Classifier (diffusion-classifier/diffusion-classifier, ``eval_prob_adaptive.py``):
  - ``scheme="midpoint"``: ``range(T_train // T // 2, T_train, T_train // T)[:T]``;
  - ``resize="center_crop"``: torchvision ``Resize(512, BICUBIC)`` (short side to 512, long side
    ``int(512 * long / short)``) then ``CenterCrop(512)``, on PIL images;
  - ``order="published"``: each elimination round evaluates its strided subset of the timesteps;
  - ``latent="mean"``, per-timestep noise (``run_winoground.py`` instead uses one noise tensor for
    every timestep: add ``noise="shared"``); the error is the MSE (the method's definition).

Discffusion (eric-ai-lab/Discffusion, ``DSDPipeline`` in ``diffusers/.../pipeline_dsd.py`` and the
UNet in ``diffusers/.../unet_2d_condition.py`` of its vendored diffusers; images by
``custom_datasets.py``):
  - ``scheme="discffusion"``: ``t = 999 - g`` for g in ``range(10, 990, 1000 // T)``;
  - ``layers="published"``: the last block with cross-attention of each of down, mid and up, every
    attention of that block; ``mix_uncond=True``: each layer's mean covers the [empty; text] batch;
  - ``pool="logits"``, ``denoise=True`` with ``err="l2"`` (the ``use_bias`` term);
  - ``latent="sample_per_timestep"`` (``prepare_latents`` samples the posterior at every timestep),
    ``resize="squash_pil"`` (``img.resize((512, 512))``).
"""

from __future__ import annotations

from typing import Any

PRESETS = (None, "published")

# The run-level choices and their fastitm defaults.
DEFAULTS = {"resize": "squash", "latent": "mean", "scheme": "grid", "noise": "per_timestep"}

PUBLISHED: dict[str, dict[str, Any]] = {
    "diffusion_itm": {
        "resize": "squash_pil", "latent": "sample_per_timestep", "scheme": "grid", "noise": "per_timestep",
        "options": {"err": "l2"},
    },
    "diffusion_classifier": {
        "resize": "center_crop", "latent": "mean", "scheme": "midpoint", "noise": "per_timestep",
        "options": {"order": "published"},
    },
    "discffusion": {
        "resize": "squash_pil", "latent": "sample_per_timestep", "scheme": "discffusion", "noise": "per_timestep",
        "options": {"layers": "published", "mix_uncond": True, "pool": "logits", "denoise": True, "err": "l2"},
    },
}


def check_preset(preset: Any) -> str | None:
    if preset in ("none", "default", ""):
        preset = None
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose None (fastitm's defaults) or 'published'")
    return preset


def resolve(method: str, preset: str | None, choices: dict[str, Any], options: dict[str, Any]) -> tuple[dict, dict]:
    """Fill ``choices`` (resize, latent, scheme, noise: None where not given) and method ``options``
    from the preset, then from fastitm's defaults; explicit values always win."""
    preset = check_preset(preset)
    table = PUBLISHED.get(method, {}) if preset == "published" else {}
    out = {}
    for name, default in DEFAULTS.items():
        value = choices.get(name)
        out[name] = value if value is not None else table.get(name, default)
    opts = dict(table.get("options", {}))
    opts.update(options)
    return out, opts
