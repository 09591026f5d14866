"""Checking and converting user inputs: images to a [N, 3, R, R] tensor in [-1, 1], texts to strings.

Images are decoded to either an 8-bit RGB PIL image (files, PIL images, uint8 arrays) or a float
tensor [3, H, W] in [0, 1] (float tensors and arrays, 16-bit images), and resized by one of:

- ``"squash"`` (default): both sides to R with antialiased bicubic on floats (torch);
- ``"squash_pil"``: ``img.resize((R, R), BICUBIC)`` on the 8-bit image, as the published
  DiffusionITM and Discffusion loaders do (float inputs are rounded to 8 bits first);
- ``"center_crop"``: torchvision's ``Resize(R, BICUBIC)`` + ``CenterCrop(R)`` geometry (short side to
  R, long side ``int(R * long / short)``, crop offsets ``round((side - R) / 2)``), with PIL's bicubic
  on 8-bit images and antialiased bicubic on float tensors, as torchvision does for each.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

RESIZE_MODES = ("squash", "squash_pil", "center_crop")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def check_resize(resize: Any) -> str:
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}; choose one of {RESIZE_MODES}")
    return resize


def _is_array(x: Any) -> bool:
    return type(x).__module__ == "numpy" and hasattr(x, "shape") and hasattr(x, "dtype")


def _items(images: Any) -> list[Any]:
    from PIL import Image

    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(
                f"an image tensor must be [N, 3, H, W], got rank {images.ndim} with shape {tuple(images.shape)}"
            )
        return list(images.unbind(0))
    if _is_array(images):
        if images.ndim == 4:
            return list(images)
        if images.ndim in (2, 3):
            return [images]
        raise ValueError(f"an image array must be [H, W, 3] (or [N, H, W, 3]), got shape {tuple(images.shape)}")
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    try:
        items = list(images)
    except TypeError:
        raise TypeError(
            f"images must be a list of PIL images, paths, arrays or tensors, got {type(images).__name__}"
        ) from None
    if not items:
        raise ValueError("the image list is empty")
    return items


def check_images(images: Any) -> list[Any]:
    """The cheap checks (types, shapes, that each path is a file) without decoding any image, so a
    bad argument fails before a model is loaded. Returns the list of items."""
    from PIL import Image

    items = _items(images)
    for i, item in enumerate(items):
        what = f"image {i}"
        if isinstance(item, Image.Image):
            continue
        if isinstance(item, (str, os.PathLike)):
            check_not_url(item, what)
            path = Path(item)
            if path.is_dir():
                raise ValueError(f"{what}: {path} is a folder, not an image file")
            if not path.is_file():
                raise FileNotFoundError(f"{what}: image file not found: {path}")
        elif isinstance(item, torch.Tensor):
            if item.device.type == "meta":
                raise ValueError(f"{what} is a tensor on the meta device, which holds no data")
        elif _is_array(item):
            _check_array_shape(item, what)
        else:
            raise TypeError(f"{what} is a {type(item).__name__}; expected a PIL image, a path, an array or a tensor")
    return items


def _check_array_shape(a, what: str) -> None:
    if a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4)):
        return
    hint = " (channels first? arrays are [H, W, 3]: transpose(1, 2, 0))" if a.ndim == 3 and a.shape[0] in (3, 4) else ""
    raise ValueError(f"{what} must be an [H, W, 3] (or [H, W], [H, W, 4]) array, got shape {tuple(a.shape)}{hint}")


def _pil_decode(img, what: str):
    """A PIL image -> an 8-bit RGB PIL image, or a float tensor [3, H, W] for 16-bit/float modes
    (``convert("RGB")`` would clip their values above 255 to white)."""
    import numpy as np

    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if img.mode == "F":
            lo, hi = float(arr.min()), float(arr.max())
            if lo < 0.0 or hi > 1.0:
                raise ValueError(f"{what} is a float (mode F) image with values in [{lo:.4g}, {hi:.4g}]; expected [0, 1]")
        else:
            if arr.size and (arr.min() < 0 or arr.max() > 65535):
                raise ValueError(f"{what} is a 32-bit integer image with values outside [0, 65535]")
            arr = arr / 65535.0
        t = torch.from_numpy(arr.astype(np.float32))
        return t.expand(3, *t.shape).contiguous()
    return img.convert("RGB") if img.mode != "RGB" else img


def _array_decode(a, what: str):
    import numpy as np
    from PIL import Image

    _check_array_shape(a, what)
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]  # alpha dropped, as PIL's convert("RGB") does
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(a)).convert("RGB")
    if a.dtype == np.uint16:
        t = torch.from_numpy(a.astype(np.float32) / 65535.0)
    elif a.dtype.kind == "f":
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    else:
        raise TypeError(f"{what} is an array of dtype {a.dtype}; use uint8 (0-255), uint16 or float in [0, 1]")
    t = t.expand(3, *t.shape) if t.ndim == 2 else t.permute(2, 0, 1)
    return _check_tensor(t.contiguous(), what)


def is_url(p: object) -> bool:
    """Whether an image reference is a URL (scheme://...), which fastitm does not fetch."""
    return isinstance(p, str) and "://" in p[:16]


def check_not_url(p: str | os.PathLike, what: str) -> None:
    """A URL given as an image is said to be one (``Path`` would fold its ``//`` into a missing file)."""
    if is_url(p):
        raise ValueError(f"{what}: {p} is a URL; fastitm does not fetch images: download it and give the file path "
                         "(or a PIL image)")


def _load_path(p: str | os.PathLike, what: str):
    from PIL import Image, UnidentifiedImageError

    check_not_url(p, what)
    path = Path(p)
    try:
        with Image.open(path) as img:
            img.load()
            return _pil_decode(img, f"{what} ({path})")
    except Image.DecompressionBombError as e:
        raise ValueError(f"{what}: {path} is too large to decode safely ({e}); if you trust the file, raise "
                         "PIL.Image.MAX_IMAGE_PIXELS before scoring") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{what}: cannot read image {path}: {e}") from None


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
    if t.numel():
        lo, hi = float(t.min()), float(t.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{what} has values in [{lo:.4g}, {hi:.4g}]; expected [0, 1]")
    return t.float()


def _to_tensor(img) -> torch.Tensor:
    """An 8-bit RGB PIL image -> float [3, H, W] in [0, 1]; a tensor passes through."""
    import numpy as np

    if isinstance(img, torch.Tensor):
        return img
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _to_pil(img):
    """A float tensor [3, H, W] in [0, 1] -> an 8-bit RGB PIL image (rounded); a PIL image passes through."""
    from PIL import Image

    if not isinstance(img, torch.Tensor):
        return img
    arr = (img.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(arr, "RGB")


def center_crop_geometry(w: int, h: int, size: int) -> tuple[int, int, int, int]:
    """torchvision's ``Resize(size)`` then ``CenterCrop(size)`` for a w x h image: the resized
    (width, height) and the crop's (left, top). 640x480 -> 682x512, crop at (85, 0)."""
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    return nw, nh, int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))


def resize_image(img, size: int, mode: str) -> torch.Tensor:
    """A decoded image (8-bit RGB PIL image or float tensor [3, H, W]) -> float [3, size, size] in [0, 1]."""
    from PIL import Image

    if mode == "squash_pil":
        img = _to_pil(img)
        if img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        return _to_tensor(img)
    if mode == "center_crop":
        h, w = (img.shape[1], img.shape[2]) if isinstance(img, torch.Tensor) else (img.height, img.width)
        nw, nh, left, top = center_crop_geometry(w, h, size)
        if isinstance(img, torch.Tensor):
            x = img
            if (nh, nw) != (h, w):
                x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
            return x[:, top : top + size, left : left + size].contiguous()
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BICUBIC)
        return _to_tensor(img.crop((left, top, left + size, top + size)))
    x = _to_tensor(img)
    if tuple(x.shape[1:]) == (size, size):
        return x
    x = F.interpolate(x[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
    return x.clamp(0.0, 1.0)


def prepare_images(images: Any, resolution: int, resize: str = "squash") -> torch.Tensor:
    """PIL images, file paths, [H, W, 3] numpy arrays (uint8, uint16, or float in [0, 1]), [3, H, W]
    tensors, or one float tensor [N, 3, H, W] in [0, 1] -> float32 [N, 3, resolution, resolution]
    in [-1, 1] on the CPU."""
    from PIL import Image

    check_resize(resize)
    items = check_images(images)
    out = []
    for i, item in enumerate(items):
        what = f"image {i}"
        if isinstance(item, Image.Image):
            img = _pil_decode(item, what)
        elif isinstance(item, (str, os.PathLike)):
            img = _load_path(item, what)
        elif isinstance(item, torch.Tensor):
            img = _check_tensor(item.detach().cpu(), what)
        else:
            img = _array_decode(item, what)
        h, w = (img.shape[1], img.shape[2]) if isinstance(img, torch.Tensor) else (img.height, img.width)
        if h == 0 or w == 0:
            raise ValueError(f"{what} is empty ({w}x{h} pixels)")
        out.append(resize_image(img, resolution, resize))
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


__all__ = ["RESIZE_MODES", "center_crop_geometry", "check_images", "check_resize", "prepare_images",
           "prepare_texts", "resize_image"]
