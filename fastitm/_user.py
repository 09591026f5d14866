"""Warnings that point at the user's line, not at fastitm's internals."""

from __future__ import annotations

import os
import sys

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
# Decorators between our frames (torch.no_grad's wrapper): not the user's line either.
_WRAPPERS = (os.path.join("torch", "utils", "_contextlib.py"),)


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` called by the function calling this: the first frame
    outside the fastitm package (the depth differs by entry point: score, eval, reference)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(_PACKAGE)
                                 or frame.f_code.co_filename.endswith(_WRAPPERS)):
        frame, level = frame.f_back, level + 1
    return level
