"""Models by Hugging Face hub id ("org/name"), resolved through huggingface_hub's cache as diffusers'
``from_pretrained`` resolves them: downloaded where the network allows, read from the cache alone with
``HF_HUB_OFFLINE=1`` or ``local_files_only=True``. A path that exists is always the folder itself (a
string that is both a folder and an id means the folder)."""

from __future__ import annotations

import os
import re
from pathlib import Path

# owner/name as the hub spells repository ids (letters, digits, "-", "_", "."), nothing else.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Weight files of other variants than the one asked for (diffusers names them name.<variant>.safetensors).
_OTHER_VARIANTS = ["*.fp16.*", "*.bf16.*", "*.fp32.*", "*.non_ema.*", "*.ema_only.*"]


def is_repo_id(ref: object) -> bool:
    return isinstance(ref, str) and bool(_REPO_ID.match(ref)) and not ref.startswith((".", "~"))


def resolve(ref: str | os.PathLike, *, revision: str | None = None, variant: str | None = None,
            cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> Path:
    """The local folder of ``ref``: the path itself when it exists (or is not an id), else the cached
    snapshot of the hub repository ``ref`` at ``revision`` (default branch), fetched if missing and
    the hub is reachable. Only what a diffusers model needs is fetched: configs, tokenizer files and
    the safetensors weights of ``variant`` (e.g. "fp16"; default: the plain ones)."""
    path = Path(ref).expanduser()
    if path.exists() or not is_repo_id(str(ref)):
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = bool(local_files_only or constants.HF_HUB_OFFLINE)
    weights = f"*/*.{variant}*.safetensors" if variant else "*/*.safetensors"
    cache = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    try:
        got = snapshot_download(str(ref), revision=revision, cache_dir=cache_dir, local_files_only=offline,
                                allow_patterns=["model_index.json", "*/*.json", "*/*.txt", "*/*.model", weights],
                                ignore_patterns=None if variant else _OTHER_VARIANTS)
    except GatedRepoError:
        raise PermissionError(f"{ref} is a gated repository: accept its terms on https://huggingface.co/{ref} and "
                              "log in (`hf auth login`, or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{ref}: no such model folder, and no such repository on the Hugging Face hub (or it "
                                "is private: log in with `hf auth login` or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{ref}: the hub repository has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        why = "offline (HF_HUB_OFFLINE=1 or local_files_only)" if offline else "the hub could not be reached"
        raise FileNotFoundError(
            f"{ref}: not a folder, and not in the Hugging Face cache ({cache}"
            f"{f', revision {revision}' if revision else ''}); {why}. Download it once where the hub is reachable "
            f"(`hf download {ref}`, into that cache) or pass the model's folder") from None
    return Path(got)
