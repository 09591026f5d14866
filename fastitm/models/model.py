"""Loading a diffusion model in diffusers layout, strictly offline, whatever its family.

A :class:`Model` bundles the components the scorers need; its ``family`` (:mod:`fastitm.models.families`)
says how texts are encoded, how latents are noised and what the denoiser predicts: Stable Diffusion
1.x/2.x (epsilon or v-prediction), SDXL, and SD 3 / 3.5 (flow matching). The family is recognised
from ``model_index.json``.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .families import FAMILIES, Family, ModelError, detect, supported
from .families import get as get_family
from .hub import is_repo_id, resolve
from .lora import load_adapter
from .speed import apply, check_cpu_dtype, default_channels_last, default_dtype

__all__ = ["Model", "ModelError", "check_device", "embedded_model_path", "load_model"]

# The components every family has, as Model fields; the others live in Model.parts.
_FIELDS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class Model:
    """A diffusion model: its components, its family and where it was loaded from.

    ``unet`` is the denoiser: a UNet2DConditionModel (SD 1.x/2.x, SDXL) or, for SD 3, the
    SD3Transformer2DModel; one name so every scorer drives every family. ``text_encoder`` and
    ``tokenizer`` are the first text encoder's; further ones (``text_encoder_2``, ``tokenizer_3``,
    ...) are in ``parts`` and read with :meth:`part`. ``pipeline_config``: pipeline-level settings
    from model_index.json (SDXL's ``force_zeros_for_empty_prompt``).
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    source: str = "memory"
    family: str = "sd"
    parts: dict = field(default_factory=dict)
    pipeline_config: dict = field(default_factory=dict)
    levers: dict = field(default_factory=dict)  # the speed levers applied (fastitm.models.speed.apply)
    # A Latent Consistency Model's UNet (``time_cond_proj_dim`` set) takes a guidance-scale embedding
    # as ``timestep_cond``: the w it embeds (``get_guidance_scale_embedding(w - 1)``), diffusers' 8.5 by
    # default. A scoring choice, recorded with the model (describe(), reports).
    guidance_scale: float | None = None

    def __post_init__(self) -> None:
        get_family(self.family)  # an unknown family name fails here
        check_architecture(self)
        for m in self.networks:
            m.eval()
            m.requires_grad_(False)

    @classmethod
    def from_pipeline(cls, pipe: Any) -> Model:
        """A model sharing the modules of a loaded diffusers pipeline (no copy of the weights):
        ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline`` (and
        their img2img variants); the family from the pipeline's class. The networks are put in eval
        mode without gradients, as :func:`load_model` leaves them (the pipeline's own modules, so the
        pipeline sees that too)."""

        name = type(pipe).__name__
        fam = next((f for f in FAMILIES.values() if name in f.pipelines), None)
        if fam is None:
            raise ModelError(f"a {name} is not a pipeline fastitm scores; supported: {supported()}")
        comps: dict[str, Any] = {"unet": getattr(pipe, fam.denoiser), "vae": pipe.vae, "scheduler": pipe.scheduler}
        for enc, tok in fam.text_parts:
            comps[enc], comps[tok] = getattr(pipe, enc, None), getattr(pipe, tok, None)
        main = {k: comps.pop(k) for k in _FIELDS}
        source = getattr(pipe, "name_or_path", None) or getattr(pipe.config, "_name_or_path", None) or ""
        model = cls(**main, source=f"{name}({source})" if source else f"{name} object", family=fam.name,
                    parts=comps, pipeline_config=fam.pipeline_config(dict(pipe.config)))
        keep_vae_fp32(model)
        return model

    @property
    def spec(self) -> Family:
        """The :class:`~fastitm.models.families.base.Family` that scores this model."""
        return get_family(self.family)

    def part(self, name: str) -> Any:
        """A component by its folder name ("transformer", "text_encoder_2", "tokenizer_3", ...), or None."""
        if name == self.spec.denoiser:  # SD 3's "transformer" is the unet field
            return self.unet
        if name in _FIELDS:
            return getattr(self, name)
        return self.parts.get(name)

    @property
    def networks(self) -> list[Any]:
        """The torch modules: denoiser, VAE and text encoders."""
        return self.spec.networks(self)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        return self.spec.resolution(self)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.spec.latent_shape(self)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def num_train_timesteps(self) -> int:
        return self.spec.num_train_timesteps(self)

    @property
    def prediction(self) -> str:
        """What the denoiser predicts: "epsilon", "v_prediction" or "flow"."""
        return self.spec.prediction(self)

    def describe(self) -> dict:
        """Family, component classes, parameter counts, prediction, resolution, supported methods."""
        return self.spec.describe(self)

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> Model:
        for m in self.networks:
            m.to(device=device, dtype=dtype)
        if dtype is not None:
            keep_vae_fp32(self)
        return self

    def save(self, path: str | os.PathLike) -> Path:
        """Save every component in diffusers layout (safetensors) under ``path``, with the
        model_index.json of the family's pipeline."""
        import json

        spec = self.spec
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        names = [spec.denoiser, "vae", "scheduler"] + [n for pair in spec.text_parts for n in pair]
        with _quiet_loading():  # no per-shard progress bars
            for name in names:
                obj = self.part(name)
                if obj is not None:
                    obj.save_pretrained(path / name)
        (path / "model_index.json").write_text(json.dumps(spec.model_index(self), indent=2))
        return path


def keep_vae_fp32(model: Model) -> None:
    """A VAE whose config asks for ``force_upcast`` (SDXL's overflows in fp16) stays in float32,
    as the pipelines keep it; images are encoded in float32 and the latents cast to the model's dtype."""
    if model.dtype == torch.float16 and getattr(model.vae.config, "force_upcast", False):
        model.vae.to(dtype=torch.float32)


def check_architecture(model: Model) -> None:
    """Raise :class:`ModelError` naming the mismatch when the components do not form a model of its family."""
    from diffusers import AutoencoderKL

    spec = model.spec
    expected = {"unet": spec.denoiser_class(), "vae": AutoencoderKL}
    expected.update(spec.text_encoder_classes())
    for name, cls in expected.items():
        obj = model.part(name)
        if obj is None and name in spec.optional_encoders:
            continue  # e.g. SD 3 without T5
        if not isinstance(obj, cls):
            what = spec.denoiser if name == "unet" else name
            raise ModelError(f"{what} is a {type(obj).__name__}, expected {cls.__name__}: a {spec.label} model has "
                             f"{', '.join(c.__name__ for c in expected.values())}")
    spec.check(model)


def check_device(device: Any) -> torch.device:
    """``device`` as a torch.device that exists here; raises ValueError naming what is wrong."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"device {device!r}: {why} (torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    return dev


def embedded_model_path() -> Path | None:
    """The folder of the model shipped inside the package, or None in a build without it."""
    p = Path(__file__).parent.parent / "assets" / "default_model"  # fastitm/assets
    return p if (p / "model_index.json").is_file() else None


def load_model(
    path: str | os.PathLike | Any | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    lora: str | os.PathLike | None = None,
    channels_last: bool | None = None,
    fuse_qkv: bool = False,
    compile: bool | str = False,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Model:
    """Load a diffusion model in diffusers layout: a folder, or a Hugging Face hub id ("org/name").

    A hub id is resolved through huggingface_hub's cache as diffusers' ``from_pretrained`` does
    (:func:`fastitm.models.hub.resolve`: ``revision``, ``variant`` such as "fp16", ``cache_dir``; fetched
    where the hub is reachable, from the cache alone with ``HF_HUB_OFFLINE=1`` or
    ``local_files_only``); a path that exists is the folder itself. A loaded diffusers pipeline object
    is taken as it is (:meth:`Model.from_pipeline`: its modules shared, on their device and in their
    dtype; another ``dtype`` or ``device`` is refused, and ``lora`` or a lever works on a copy of its
    denoiser, so the caller's pipeline is left as it was).

    The family is recognised from ``model_index.json`` (see :mod:`fastitm.models.families`): SD 1.x/2.x
    (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), SDXL (plus
    ``text_encoder_2/``, ``tokenizer_2/``), SD 3 / 3.5 (``transformer/`` and up to three text
    encoders). With no path, the model embedded in the package is loaded. ``lora``: a folder
    written by ``fastitm finetune``, or a LoRA in diffusers' file format (a ``.safetensors`` file or a
    folder with ``pytorch_lora_weights.safetensors``: an LCM-LoRA, say); it is put on the UNet, merged.
    A Latent Consistency Model's UNet (``time_cond_proj_dim``) gets the guidance embedding its
    pipeline passes, for ``model.guidance_scale`` (8.5 by default; recorded in ``describe()``).

    ``dtype``: None or "auto" picks bfloat16 on CUDA and float32 on the CPU; "fp32", "fp16", "bf16"
    or a torch dtype. ``channels_last``, ``fuse_qkv``, ``compile``: the speed levers of
    :func:`fastitm.models.speed.apply`; ``channels_last=None`` decides by device and dtype
    (:func:`fastitm.models.speed.default_channels_last`: on for float32 on the CPU), the others are off.
    """

    if path is not None and not isinstance(path, (str, os.PathLike)) and hasattr(path, "components"):
        return _from_pipeline(path, dtype, device, lora, channels_last, fuse_qkv, compile)
    if path is not None and not isinstance(path, (str, os.PathLike)):
        _refuse_model_argument(path)
    device = check_device(device)
    dtype = resolve_dtype(dtype, device)
    check_cpu_dtype(dtype, device)
    if path is None:
        path = embedded_model_path()
        if path is None:
            raise FileNotFoundError(
                "this fastitm build has no embedded model (fastitm/assets/default_model is missing); pass a diffusers model folder, or "
                "use fastitm.testing.tiny_model() for a random-weight model of the same architecture"
            )
    folder = resolve(path, revision=revision, variant=variant, cache_dir=cache_dir, local_files_only=local_files_only)
    model = _build(folder, dtype, meta=False)
    if folder != Path(path).expanduser() and is_repo_id(str(path)):
        model.source = str(path) + (f"@{revision}" if revision else "")  # the id, as the user names it
    keep_vae_fp32(model)
    if device != model.device:
        model.to(device=device)
    return finish_loading(model, lora, channels_last, fuse_qkv, compile)


def _refuse_model_argument(obj: Any) -> None:
    """What load_model cannot load, named with what it takes (and where the model of a fastitm object is)."""
    takes = ("load_model takes a model folder (a str or path), a hub id ('org/name'), a loaded diffusers "
             "pipeline, or None (the embedded model)")
    if isinstance(obj, Model):
        raise TypeError(f"{takes}; this is a fastitm Model, already loaded: pass it as model= as it is")
    if isinstance(getattr(obj, "model", None), Model):  # a Scorer, a DiffusionScore's scorer
        raise TypeError(f"{takes}; got a {type(obj).__name__}: its model is {type(obj).__name__.lower()}.model")
    raise TypeError(f"{takes}; got {type(obj).__name__} {obj!r:.60}")


def _from_pipeline(pipe: Any, dtype, device, lora, channels_last: bool | None, fuse_qkv: bool,
                   compile: bool | str) -> Model:
    """A loaded diffusers pipeline: its modules are shared (no copy of the weights), and nothing here
    changes the caller's objects. A dtype or device other than the pipeline's is refused (the cast
    would move the caller's modules too); a LoRA adapter and the UNet levers (asked for explicitly:
    none is on by default here) go on a copy of the denoiser, leaving the pipeline's as it was."""
    import copy

    model = Model.from_pipeline(pipe)
    target = model.device if str(device) == "cpu" else check_device(device)  # "cpu", the default: where it is
    want = resolve_dtype(dtype, target) if dtype is not None else model.dtype
    same_device = target.type == model.device.type and target.index in (None, model.device.index)
    if not same_device or want != model.dtype:
        raise ModelError(
            f"load_model(pipeline, dtype={dtype!r}, device={str(device)!r}) would cast or move the pipeline's own "
            f"modules ({model.dtype}, {model.device}): fastitm shares them, it does not copy them. Move the "
            f"pipeline first (pipe.to({str(target)!r}, {want})) and pass it, or pass its folder or hub id")
    if lora is not None or fuse_qkv or compile or channels_last:
        model.unet = copy.deepcopy(model.unet)
    return finish_loading(model, lora, bool(channels_last), fuse_qkv, compile)


def finish_loading(model: Model, lora=None, channels_last: bool | None = None, fuse_qkv: bool = False,
                   compile: bool | str = False) -> Model:
    """What load_model does after the weights are in place: the LoRA adapter, the speed levers
    (``channels_last=None``: the device's default). The CLI's tiny model takes the same path."""

    if channels_last is None:
        channels_last = default_channels_last(model.device, model.dtype)

    if lora is not None:
        if model.spec.name != "sd":
            raise ValueError(f"LoRA adapters from fastitm finetune are for SD 1.x/2.x models; {model.source} is "
                             f"{model.spec.label}")

        load_adapter(model, lora)
    if channels_last or fuse_qkv or compile:
        apply(model, channels_last=channels_last, fuse_qkv=fuse_qkv, compile=compile)
    return model


def describe_folder(path: str | os.PathLike) -> dict:
    """What :func:`load_model` would load from ``path`` (a folder or a hub id), read from the configs
    alone (the networks are built on the meta device: no weights are read, so this takes a second even
    for SD 3)."""

    return _build(resolve(path), torch.float32, meta=True).describe()


def _build(path: Path, dtype: torch.dtype, meta: bool) -> Model:
    if not path.exists():
        raise FileNotFoundError(f"model folder not found: {path}")
    if not path.is_dir():
        raise ModelError(f"model path is not a folder: {path}")
    spec, index = detect(path)
    spec.check_folder(path)
    with warnings.catch_warnings(), _quiet_loading():
        # diffusers/transformers warn about unused config keys of newer/older versions and about
        # optional speed-ups (accelerate); harmless here, and noise in a command's output.
        warnings.simplefilter("ignore")
        comps = spec.load(path, dtype, index, meta=meta)
    main = {k: comps.pop(k) for k in _FIELDS}
    return Model(**main, source=str(path), family=spec.name, parts=comps, pipeline_config=spec.pipeline_config(index))


@contextmanager
def _quiet_loading():
    """Silence diffusers' and transformers' loggers and loading progress bars for the block."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        if bars:
            tlog.enable_progress_bar()


_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """None or "auto": the device's default (:func:`fastitm.models.speed.default_dtype`); a name or a dtype as given."""

    if dtype is None or dtype == "auto":
        return default_dtype(device)
    return _parse_dtype(dtype) if isinstance(dtype, str) else dtype


def _parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}") from None
