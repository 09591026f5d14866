"""Test data folders built from the released annotation excerpts in ``tests/fixtures/released``
(see its SOURCES.md), with a small synthetic image written at every path they name."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

RELEASED = Path(__file__).parent / "fixtures" / "released"


def copy(name: str, dest: Path) -> Path:
    """Copy the released file or folder ``name`` (relative to the fixtures) to ``dest`` / ``name``."""
    src, out = RELEASED / name, dest / name
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, out) if src.is_dir() else shutil.copy(src, out)
    return out


def image(key: str, size: int = 16) -> Image.Image:
    """A distinct random RGB image per ``key`` (the same one every time)."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def write_images(root: Path, paths) -> list[Path]:
    """A synthetic image at each path under ``root`` (PNG bytes whatever the extension: lossless,
    so the pixels scored are the pixels written)."""
    out = []
    for p in paths:
        f = root / p
        f.parent.mkdir(parents=True, exist_ok=True)
        if not f.exists():
            image(str(p)).save(f, format="PNG")
        out.append(f)
    return out
