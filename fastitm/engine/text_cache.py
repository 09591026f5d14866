"""Each text encoded once across the engine calls of a run: :class:`TextCache`.

An evaluation scores its items in many engine calls (:mod:`fastitm.evaluate.runner`), and each call
encodes the texts it is given. Where every item shares its texts (the classify task: every image
against the same class prompts, a thousand of them for ImageNet) that is the text encoder run once
per image over every prompt. A :class:`TextCache` passed to :func:`fastitm.score` (``text_cache=``)
keeps each text's conditioning rows from the first call that needs them, so the class prompts are
encoded once per run.

A text's rows do not depend on the other texts encoded beside it (each is padded to the encoder's
length on its own), so a cached row is the row a fresh call computes, to the float rounding of the
encoder's batch.
"""

from __future__ import annotations

import weakref

import torch

from ..models.families.base import concat_cond
from .common import encode_chunked


class TextCache:
    """Conditioning rows by text, for one model (another model is refused: its rows differ).

    ``encoded``: how many texts (and empty prompts) the encoder has run on through this cache."""

    def __init__(self) -> None:
        self._model: weakref.ref | None = None
        self._where: tuple | None = None
        self._rows: dict[str, dict[str, torch.Tensor]] = {}
        self._empty: dict[str, torch.Tensor] | None = None
        self.encoded = 0

    def __len__(self) -> int:
        return len(self._rows)

    def _check(self, model) -> None:
        where = (model.dtype, str(model.device))
        if self._model is None:
            self._model, self._where = weakref.ref(model), where
        elif self._model() is not model or self._where != where:
            raise ValueError("this TextCache holds another model's text rows (or this model's in another dtype or "
                             "device); use one TextCache per model")

    def encode(self, model, texts: list[str], empty: bool = False) -> dict[str, torch.Tensor]:
        """What :func:`fastitm.engine.common.encode_conditioning` returns for ``texts`` (one row per text, the
        empty prompt's last with ``empty``), encoding only the texts this cache has not seen."""

        self._check(model)
        new = list(dict.fromkeys(t for t in texts if t not in self._rows))
        if new:
            cond = encode_chunked(model, new)
            for n, t in enumerate(new):
                self._rows[t] = {k: v[n : n + 1] for k, v in cond.items()}
            self.encoded += len(new)
        parts = [self._rows[t] for t in texts]
        if empty:
            if self._empty is None:
                self._empty = model.spec.encode_empty(model)
                self.encoded += 1
            parts.append(self._empty)
        return concat_cond(*parts) if parts else None
