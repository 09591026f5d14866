"""LoRA adapters on the UNet's attention projections, through peft (diffusers' adapter support).

Saved as ``adapter_model.safetensors`` + ``adapter_config.json`` (peft's LoraConfig) + a card
(``README.md`` and ``training.json``) in one folder; ``fastitm.load_model(path, lora=FOLDER)`` loads
them onto the model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# attn1 is self-attention, attn2 cross-attention; each has to_q, to_k, to_v and to_out.0.
TARGETS = {
    "all": r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
    "cross": r".*attn2\.(to_q|to_k|to_v|to_out\.0)$",
}
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def add_lora(unet, rank: int = 4, targets: str = "all", seed: int = 0) -> list[torch.nn.Parameter]:
    """Add a rank-``rank`` LoRA adapter (alpha = rank: scale 1) to the UNet's attention projections
    (``targets`` "all" or "cross"); returns its trainable parameters. B starts at zero, so the
    adapted model starts equal to the base model."""
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
    if targets not in TARGETS:
        raise ValueError(f"unknown LoRA targets {targets!r}; choose one of {sorted(TARGETS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # A's initialisation
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=TARGETS[targets]))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def adapter_state(unet) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def nonfinite(state: dict[str, torch.Tensor]) -> list[str]:
    """The names of the adapter tensors holding NaN or inf (an adapter that would score NaN)."""
    return [k for k, v in state.items() if not torch.isfinite(v).all()]


def save_adapter(unet, out: str | Path, rank: int, targets: str) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(unet), str(out / WEIGHTS))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out / WEIGHTS, 0o666 & ~umask)  # as the card and config beside it (not a private temp file's mode)
    (out / CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": rank, "targets": targets,
                                          "target_modules": TARGETS[targets], "format": "fastitm-lora-1"}, indent=2))
    return out


DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights (LCM-LoRA's file)


def diffusers_lora_file(path: str | Path) -> Path | None:
    """The diffusers-format LoRA file ``path`` names (a ``.safetensors`` file, or a folder holding
    ``pytorch_lora_weights.safetensors`` and no fastitm adapter config), or None."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return path
    if path.is_dir() and (path / DIFFUSERS_WEIGHTS).is_file() and not (path / CONFIG).is_file():
        return path / DIFFUSERS_WEIGHTS
    return None


def load_diffusers_lora(model, file: Path) -> None:
    """Put a LoRA in diffusers' file format (``save_lora_weights``, e.g. an LCM-LoRA) onto
    ``model.unet`` through diffusers' own loader, merged for scoring. Its UNet layers only: text-encoder
    layers are refused (fastitm's text encoders stay as they are)."""
    from diffusers import StableDiffusionPipeline

    try:
        state, alphas = StableDiffusionPipeline.lora_state_dict(str(file))[:2]
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: named with diffusers' reason
        raise ValueError(f"{file} is not a LoRA file diffusers can read ({type(e).__name__}: {e})") from None
    encoder = [k for k in state if k.startswith(("text_encoder", "lora_te"))]
    if encoder:
        raise ValueError(f"{file} holds text-encoder LoRA layers ({len(encoder)}, e.g. {encoder[0]}); fastitm "
                         "loads the UNet's only: save the LoRA without them")
    bad = nonfinite(state)
    if bad:
        raise ValueError(f"{file}: {len(bad)} LoRA tensors hold NaN or inf (e.g. {bad[0]})")
    try:
        model.unet.load_lora_adapter(state, prefix="unet", network_alphas=alphas)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"LoRA {file} does not fit {model.source} ({str(e).splitlines()[0][:300]})") from None
    model.unet.requires_grad_(False)
    model.unet.eval()
    merge_adapter(model.unet)
    model.source = f"{model.source} + lora:{file}"


def load_adapter(model, folder: str | Path) -> None:
    """Put the adapter saved in ``folder`` onto ``model.unet`` (frozen, for scoring): fastitm's own
    (``fastitm finetune``), or a LoRA in diffusers' file format (:func:`load_diffusers_lora`)."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    file = diffusers_lora_file(folder)
    if file is not None:
        return load_diffusers_lora(model, file)
    folder = Path(folder)
    for name in (WEIGHTS, CONFIG):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"LoRA adapter folder {folder} has no {name} (made by fastitm finetune), nor "
                                    f"{DIFFUSERS_WEIGHTS} (diffusers' LoRA format)")
    cfg = json.loads((folder / CONFIG).read_text())
    if cfg.get("format") != "fastitm-lora-1":
        raise ValueError(f"{folder / CONFIG} is not a fastitm LoRA adapter config")
    try:
        state = load_file(str(folder / WEIGHTS))
    except Exception as e:  # safetensors' own error names neither the file nor the cause
        raise ValueError(f"{folder / WEIGHTS} cannot be read ({e}): the file is damaged or truncated; copy it again "
                         "or retrain the adapter") from None
    bad = nonfinite(state)
    if bad:  # a diverged training's adapter would score NaN everywhere
        raise ValueError(f"{folder / WEIGHTS}: {len(bad)} of {len(state)} adapter tensors hold NaN or inf (e.g. "
                         f"{bad[0]}): the training that wrote it diverged; retrain with a lower --lr")
    try:
        model.unet.add_adapter(LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"],
                                          target_modules=cfg["target_modules"]))
        result = set_peft_model_state_dict(model.unet, {k: v.to(model.device, model.dtype) for k, v in state.items()})
    except (RuntimeError, ValueError) as e:  # torch's size-mismatch dump, or peft finding no target module
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise ValueError(f"LoRA adapter {folder} does not fit {model.source}: it was trained for another "
                         f"architecture ({first[:300]})") from None
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"{folder}: adapter weights {missing[:3]} do not fit this model's UNet")
    model.unet.requires_grad_(False)
    model.unet.eval()
    merge_adapter(model.unet)
    model.source = f"{model.source} + lora:{folder}"


def merge_adapter(unet) -> None:
    """Fold every LoRA layer's B A into its base weight: scoring then runs the plain projections
    (a LoRA layer left unmerged costs two extra matmuls per projection on every row)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in unet.modules():
        if isinstance(module, BaseTunerLayer) and not module.merged:
            module.merge()
