"""What every model family provides to the scorers, and the loading they share.

A family says which components its folder holds (a denoiser, a VAE, one to three text encoders
with their tokenizers, a scheduler), how texts become conditioning, how a latent is noised at a
plan timestep, what the denoiser is trained to predict, and how the denoiser is called. The
reference scorer, the engine, the CUDA graph runner and the fused attention processor are written
against these operations only, so every fast path works for every family.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Files whose presence marks a component folder as complete (any one of each tuple).
_CONFIG_FILES = {
    "tokenizer": ("tokenizer_config.json", "vocab.json", "tokenizer.json", "spiece.model"),
    "scheduler": ("scheduler_config.json",),
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


class ModelError(ValueError):
    """A model folder is missing a component or holds a model of another architecture."""


class Family:
    """One model family. Subclasses set the class attributes and override what differs."""

    name = ""  # the short name recorded in plans, checkpoints and results
    label = ""  # for people: "SD 1.x / 2.x"
    pipelines: tuple[str, ...] = ()  # diffusers pipeline classes whose folders this family reads
    denoiser = "unet"  # the denoiser's folder
    # (text encoder folder, tokenizer folder) pairs, in the order the pipeline encodes with them
    text_parts: tuple[tuple[str, str], ...] = ()
    methods: tuple[str, ...] = ()
    flow = False  # flow matching (x_t = (1 - sigma) z + sigma eps) rather than DDPM noising
    # text encoders the pipeline can do without (a folder may lack them; the family encodes without)
    optional_encoders: tuple[str, ...] = ()

    # -- components -----------------------------------------------------------------------------
    def folder_text_parts(self, path: Path) -> tuple[tuple[str, str], ...]:
        """The text encoder/tokenizer pairs a folder must hold: every pair, less the optional
        encoders the folder does not have."""
        return tuple((enc, tok) for enc, tok in self.text_parts
                     if enc not in self.optional_encoders or (path / enc).is_dir())

    def components(self, path: Path) -> tuple[str, ...]:
        names = [self.denoiser, "vae"]
        for enc, tok in self.folder_text_parts(path):
            names += [enc, tok]
        return (*names, "scheduler")

    def networks(self, model) -> list[Any]:
        """The torch modules of a model of this family: denoiser, VAE, text encoders."""
        nets = [model.unet, model.vae] + [model.part(enc) for enc, _ in self.text_parts]
        return [m for m in nets if m is not None]

    def denoiser_class(self):
        raise NotImplementedError

    def text_encoder_classes(self) -> dict[str, Any]:
        raise NotImplementedError

    def tokenizer_class(self, name: str):
        raise NotImplementedError

    def scheduler_class(self):
        raise NotImplementedError

    def check_folder(self, path: Path) -> None:
        """Raise :class:`ModelError` listing every missing component file of this family."""
        missing = []
        for name in self.components(path):
            sub = path / name
            if not sub.is_dir():
                missing.append(f"{name}/ (folder missing)")
                continue
            kind = "tokenizer" if name.startswith("tokenizer") else "scheduler" if name == "scheduler" else "net"
            if kind == "net":
                if not (sub / "config.json").is_file():
                    missing.append(f"{name}/config.json")
                elif not any(f.name.endswith(_WEIGHT_SUFFIXES) for f in sub.iterdir()):
                    missing.append(f"{name}/ weights (*.safetensors or *.bin)")
            elif not any((sub / f).is_file() for f in _CONFIG_FILES[kind]):
                missing.append(f"{name}/{_CONFIG_FILES[kind][0]}")
        if missing:
            raise ModelError(f"{path} is not a complete diffusers {self.label} folder "
                             f"({self.pipelines[0]} layout); missing: " + ", ".join(missing))
        cls = read_json(path / self.denoiser / "config.json").get("_class_name")
        expected = self.denoiser_class().__name__
        if cls is not None and cls != expected:
            raise ModelError(f"{path}/{self.denoiser} holds a {cls}; a {self.label} model has a {expected}")

    def load(self, path: Path, dtype: torch.dtype, index: dict, meta: bool = False) -> dict[str, Any]:
        """The components of the folder, loaded strictly offline in ``dtype``; ``index`` is the
        folder's model_index.json (empty when there is none). ``meta``: build the networks from their
        configs on the meta device instead (no weights read: for describing a folder)."""
        from diffusers import AutoencoderKL

        def net(cls, name: str, diffusers_cls: bool):
            if not meta:
                kw = {"local_files_only": True, "variant": weights_variant(path / name)}
                if diffusers_cls:
                    return cls.from_pretrained(path, subfolder=name, torch_dtype=dtype, **kw)
                return cls.from_pretrained(path, subfolder=name, dtype=dtype, **kw)
            with torch.device("meta"):
                if diffusers_cls:
                    return cls.from_config(cls.load_config(path / name))
                return cls(cls.config_class.from_pretrained(path / name))

        out: dict[str, Any] = {
            "unet": net(self.denoiser_class(), self.denoiser, True),
            "vae": net(AutoencoderKL, "vae", True),
            "scheduler": self.scheduler_class().from_pretrained(path, subfolder="scheduler", local_files_only=True),
        }
        for enc, tok in self.text_parts:
            if (enc, tok) not in self.folder_text_parts(path):
                out[enc] = out[tok] = None
                continue
            out[enc] = net(self.text_encoder_classes()[enc], enc, False)
            out[tok] = self.tokenizer_class(tok).from_pretrained(path, subfolder=tok, local_files_only=True)
        return out

    def pipeline_config(self, index: dict) -> dict:
        """The pipeline-level settings this family reads from model_index.json."""
        return {}

    # -- checks ---------------------------------------------------------------------------------
    def check(self, model) -> None:
        """Raise :class:`ModelError` naming the mismatch when the components do not fit together."""
        raise NotImplementedError

    def check_latents(self, model) -> None:
        in_ch = int(model.unet.config.in_channels)
        if in_ch != model.vae.config.latent_channels:
            raise ModelError(f"{self.denoiser}.in_channels={in_ch} does not match vae.latent_channels="
                             f"{model.vae.config.latent_channels}")

    def check_method(self, method: str) -> None:
        if method not in self.methods:
            raise ValueError(f"method {method!r} is not supported on {self.label} models; supported: "
                             f"{', '.join(self.methods)}" + self.unsupported_reason(method))

    def unsupported_reason(self, method: str) -> str:
        return ""

    def prediction(self, model) -> str:
        """What the denoiser predicts: "epsilon", "v_prediction" or "flow" (the velocity eps - z)."""
        raise NotImplementedError

    # -- geometry -------------------------------------------------------------------------------
    def latent_shape(self, model) -> tuple[int, int, int]:
        """(C, h, w) of one latent, from the denoiser's config (UNet and SD 3 transformer alike)."""
        s = int(model.unet.config.sample_size)
        return (int(model.unet.config.in_channels), s, s)

    def resolution(self, model) -> int:
        return self.latent_shape(model)[1] * model.vae_scale_factor

    def num_train_timesteps(self, model) -> int:
        return int(model.scheduler.config.num_train_timesteps)

    # -- text, noising, denoising ---------------------------------------------------------------
    def encode(self, model, texts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode_empty(self, model) -> dict[str, torch.Tensor]:
        """The unconditional (empty-prompt) conditioning, one row, as the family's pipeline makes it:
        "" encoded like a caption unless the family says otherwise (SDXL's zeros)."""
        return self.encode(model, [""])

    def forward(self, denoiser, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def noisy(self, model, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, model, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target_is_noise(self, model) -> bool:
        """True when the target is the noise itself (the engine then reads the plan's noise rows)."""
        return False

    def describe(self, model) -> dict:
        """A JSON-able summary: family, classes, parameter counts, prediction, resolution, methods."""
        nets = {self.denoiser: model.unet, "vae": model.vae}
        nets.update({enc: model.part(enc) for enc, _ in self.text_parts if model.part(enc) is not None})
        return {
            "family": self.name,
            "label": self.label,
            "source": model.source,
            "components": {k: type(v).__name__ for k, v in nets.items()},
            "parameters": {k: sum(p.numel() for p in v.parameters()) for k, v in nets.items()},
            "prediction": self.prediction(model),
            "resolution": model.resolution,
            "latent_shape": list(model.latent_shape),
            "num_train_timesteps": model.num_train_timesteps,
            "dtype": str(model.dtype).replace("torch.", ""),
            "methods": list(self.methods),
            **lcm_record(model),
        }

    def model_index(self, model) -> dict:
        """model_index.json for :meth:`fastitm.Model.save`."""
        index: dict[str, Any] = {"_class_name": self.pipelines[0]}
        index[self.denoiser] = ["diffusers", type(model.unet).__name__]
        index["vae"] = ["diffusers", type(model.vae).__name__]
        for enc, tok in self.text_parts:
            for name in (enc, tok):
                part = model.part(name)
                index[name] = [None, None] if part is None else ["transformers", type(part).__name__]
        index["scheduler"] = ["diffusers", type(model.scheduler).__name__]
        index.update(model.pipeline_config)
        return index


def read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{path} cannot be read as JSON ({type(e).__name__}: {e})") from None


def weights_variant(folder: Path) -> str | None:
    """The weights variant a component folder holds: None for plain ``model.safetensors`` /
    ``diffusion_pytorch_model.safetensors`` (or .bin), else the variant of the files present, e.g.
    "fp16" for ``diffusion_pytorch_model.fp16.safetensors`` (hub downloads of SDXL and SD 3 often hold
    only those)."""
    names = [f.name for f in folder.iterdir() if f.name.endswith(_WEIGHT_SUFFIXES)]
    plain = ("model", "diffusion_pytorch_model", "pytorch_model")
    variants = set()
    for n in names:
        stem = n.rsplit(".", 1)[0]
        stem = stem.split("-0", 1)[0] if "-0" in stem else stem  # shards: name-00001-of-00002
        base, _, variant = stem.partition(".")
        if base in plain and not variant:
            return None
        if base in plain and variant:
            variants.add(variant.split(".")[0])
    return "fp16" if "fp16" in variants else (sorted(variants)[0] if variants else None)


def concat_cond(*conds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack conditionings row-wise (every one has the same keys)."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def take_cond(cond: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The conditioning of ``rows`` (indices into its first dimension)."""
    return {k: v[rows] for k, v in cond.items()}


LCM_GUIDANCE_SCALE = 8.5  # LatentConsistencyModelPipeline's default guidance_scale


def lcm_record(model) -> dict:
    """For a Latent Consistency Model (its UNet takes ``timestep_cond``): the guidance scale embedded."""
    if getattr(getattr(model.unet, "config", None), "time_cond_proj_dim", None) is None:
        return {}
    return {"lcm_guidance_scale": LCM_GUIDANCE_SCALE if model.guidance_scale is None else model.guidance_scale}
