"""Loading a Stable-Diffusion-architecture model in diffusers layout, strictly offline.

A :class:`Model` bundles the five diffusers components the scorers need. Every scorer reads the noise
schedule from a :class:`~diffusers.DDPMScheduler` rebuilt from the saved scheduler config, whatever
scheduler class the checkpoint names: scoring only needs ``alphas_cumprod`` and ``add_noise``, which
all of Stable Diffusion's training-compatible schedulers share.
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

# Files whose presence marks a component folder as complete (any one of each tuple).
_REQUIRED_FILES = {
    "unet": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("tokenizer_config.json", "vocab.json", "tokenizer.json"),
    "scheduler": ("scheduler_config.json",),
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


class ModelError(ValueError):
    """A model folder is missing a component or holds a model of another architecture."""


@dataclass
class Model:
    """A Stable-Diffusion-architecture model: the five diffusers components and where they live.

    ``latent_shape`` is (C, h, w) of one image latent; ``resolution`` the image side in pixels.
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    source: str = "memory"

    def __post_init__(self) -> None:
        check_architecture(self)
        for m in (self.unet, self.vae, self.text_encoder):
            m.eval()
            m.requires_grad_(False)

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
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = int(self.unet.config.sample_size)
        return (int(self.unet.config.in_channels), s, s)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> "Model":
        for m in (self.unet, self.vae, self.text_encoder):
            m.to(device=device, dtype=dtype)
        return self

    def save(self, path: str | os.PathLike) -> Path:
        """Save all five components in diffusers layout (safetensors) under ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name in COMPONENTS:
            getattr(self, name).save_pretrained(path / name)
        index = {
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", type(self.unet).__name__],
            "vae": ["diffusers", type(self.vae).__name__],
            "text_encoder": ["transformers", type(self.text_encoder).__name__],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
        }
        (path / "model_index.json").write_text(json.dumps(index, indent=2))
        return path


def check_architecture(model: Model) -> None:
    """Raise :class:`ModelError` naming the mismatch when the components do not form an SD model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    expected = {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
    }
    for name, cls in expected.items():
        obj = getattr(model, name)
        if not isinstance(obj, cls):
            raise ModelError(
                f"{name} is a {type(obj).__name__}, expected {cls.__name__}: fastitm scores with "
                "Stable-Diffusion-architecture models"
            )
    unet_cfg, vae_cfg = model.unet.config, model.vae.config
    hidden = model.text_encoder.config.hidden_size
    if unet_cfg.cross_attention_dim != hidden:
        raise ModelError(
            f"unet.cross_attention_dim={unet_cfg.cross_attention_dim} does not match the text "
            f"encoder's hidden_size={hidden}"
        )
    if unet_cfg.in_channels != vae_cfg.latent_channels:
        raise ModelError(
            f"unet.in_channels={unet_cfg.in_channels} does not match vae.latent_channels="
            f"{vae_cfg.latent_channels}"
        )
    if getattr(unet_cfg, "addition_embed_type", None) is not None:
        raise ModelError(
            f"unet.addition_embed_type={unet_cfg.addition_embed_type!r} (an SDXL-style UNet needs "
            "extra conditioning); fastitm supports SD 1.x/2.x-architecture UNets"
        )
    if not hasattr(model.scheduler, "alphas_cumprod"):
        raise ModelError(f"scheduler {type(model.scheduler).__name__} has no alphas_cumprod")


def _check_folder(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"model folder not found: {path}")
    if not path.is_dir():
        raise ModelError(f"model path is not a folder: {path}")
    missing = []
    for name in COMPONENTS:
        sub = path / name
        if not sub.is_dir():
            missing.append(f"{name}/ (folder missing)")
            continue
        if not any((sub / f).is_file() for f in _REQUIRED_FILES[name]):
            missing.append(f"{name}/{_REQUIRED_FILES[name][0]}")
            continue
        if name in ("unet", "vae", "text_encoder") and not any(
            f.name.endswith(_WEIGHT_SUFFIXES) for f in sub.iterdir()
        ):
            missing.append(f"{name}/ weights (*.safetensors or *.bin)")
    if missing:
        raise ModelError(
            f"{path} is not a complete diffusers Stable Diffusion folder; missing: " + ", ".join(missing)
        )
    unet_cfg = json.loads((path / "unet" / "config.json").read_text())
    cls = unet_cfg.get("_class_name", "UNet2DConditionModel")
    if cls != "UNet2DConditionModel":
        raise ModelError(f"{path}/unet holds a {cls}; expected UNet2DConditionModel (SD architecture)")


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
    p = Path(__file__).parent / "assets" / "default_model"
    return p if (p / "model_index.json").is_file() else None


def load_model(
    path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    lora: str | os.PathLike | None = None,
) -> Model:
    """Load a Stable-Diffusion-architecture model saved in diffusers layout, with no network access.

    ``path`` holds ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and ``scheduler/``. With no
    path, the model embedded in the package is loaded. ``lora``: a folder written by ``fastitm
    finetune``; its adapter is put on the UNet.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if isinstance(dtype, str):
        dtype = _parse_dtype(dtype)
    device = check_device(device)
    if path is None:
        path = embedded_model_path()
        if path is None:
            raise FileNotFoundError(
                "this fastitm build has no embedded model (fastitm/assets/default_model is missing); pass a diffusers model folder, or "
                "use fastitm.testing.tiny_model() for a random-weight model of the same architecture"
            )
    path = Path(path).expanduser()
    _check_folder(path)
    kw = dict(local_files_only=True)
    with warnings.catch_warnings(), _quiet_loading():
        # diffusers/transformers warn about unused config keys of newer/older versions and about
        # optional speed-ups (accelerate); harmless here, and noise in a command's output.
        warnings.simplefilter("ignore")
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **kw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, **kw)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    model = Model(unet, vae, text_encoder, tokenizer, scheduler, source=str(path))
    if device != model.device:
        model.to(device=device)
    if lora is not None:
        from .finetune.lora import load_adapter

        load_adapter(model, lora)
    return model


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


def _parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}") from None
