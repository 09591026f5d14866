"""Checking and converting user inputs: images to a [N, 3, R, R] tensor in [-1, 1], texts to strings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

RESIZE_MODES = ("squash", "center_crop")


def _pil_to_tensor(img) -> torch.Tensor:
    import numpy as np

    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _load_path(p: str | os.PathLike) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    path = Path(p)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            return _pil_to_tensor(img)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def _check_tensor(t: torch.Tensor, what: str) -> torch.Tensor:
    if not t.is_floating_point():
        raise TypeError(
            f"{what} has dtype {t.dtype}; pass a float tensor with values in [0, 1] "
            "(for uint8 images, divide by 255)"
        )
    if t.ndim != 3:
        raise ValueError(f"{what} must be [3, H, W], got shape {tuple(t.shape)}")
    if t.shape[0] != 3:
        raise ValueError(f"{what} must have 3 (RGB) channels first, got shape {tuple(t.shape)}")
    if t.numel() and (not torch.isfinite(t).all()):
        raise ValueError(f"{what} holds NaN or Inf values")
    lo, hi = float(t.min()), float(t.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{what} has values in [{lo:.4g}, {hi:.4g}]; expected [0, 1]")
    return t.float()


def _resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """x [3, H, W] -> [3, size, size]; "squash" resizes both sides (the published scripts' way),
    "center_crop" scales the short side to ``size`` and crops the middle."""
    _, h, w = x.shape
    if (h, w) == (size, size):
        return x
    if mode == "center_crop":
        s = size / min(h, w)
        nh, nw = max(size, round(h * s)), max(size, round(w * s))
        x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[:, top : top + size, left : left + size]
    else:
        x = F.interpolate(x[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
    return x.clamp(0.0, 1.0)


def prepare_images(images: Any, resolution: int, resize: str = "squash") -> torch.Tensor:
    """PIL images, file paths, [3, H, W] tensors, or one float tensor [N, 3, H, W] in [0, 1]
    -> float32 tensor [N, 3, resolution, resolution] in [-1, 1] on the CPU."""
    from PIL import Image

    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}; choose one of {RESIZE_MODES}")
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(
                f"an image tensor must be [N, 3, H, W], got rank {images.ndim} with shape {tuple(images.shape)}"
            )
        items: Sequence[Any] = list(images.unbind(0))
    elif isinstance(images, (str, os.PathLike, Image.Image)):
        items = [images]
    else:
        try:
            items = list(images)
        except TypeError:
            raise TypeError(f"images must be a list of PIL images, paths or tensors, got {type(images).__name__}") from None
    if not items:
        raise ValueError("the image list is empty")
    out = []
    for i, item in enumerate(items):
        what = f"image {i}"
        if isinstance(item, Image.Image):
            t = _pil_to_tensor(item)
        elif isinstance(item, (str, os.PathLike)):
            t = _load_path(item)
        elif isinstance(item, torch.Tensor):
            t = _check_tensor(item.detach().cpu(), what)
        else:
            raise TypeError(f"{what} is a {type(item).__name__}; expected a PIL image, a path or a tensor")
        if t.shape[1] == 0 or t.shape[2] == 0:
            raise ValueError(f"{what} is empty (shape {tuple(t.shape)})")
        out.append(_resize(t, resolution, resize))
    return torch.stack(out) * 2.0 - 1.0


def prepare_texts(texts: Any) -> list[str]:
    """A list of captions (strings). A single string is taken as one caption."""
    if isinstance(texts, str):
        return [texts]
    try:
        texts = list(texts)
    except TypeError:
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}") from None
    if not texts:
        raise ValueError("the text list is empty")
    for j, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text {j} is a {type(t).__name__} ({t!r}); every text must be a str")
    return texts
