"""Which fast paths can run here, decided once (lazily, never at import time).

``FASTITM_BACKEND=auto|triton|native|reference`` overrides the choice of ``backend="auto"``.
``TRITON_INTERPRET=1`` lets the Triton backend run on CPU tensors (slowly: for tests).

Safe first contact: before ``backend="auto"`` first uses a Triton kernel on a device and dtype, the
op's self-check compiles it and compares it with the reference on a small input; if compiling or the
comparison fails, a warning says why (once) and the op runs on the PyTorch reference. A user on a GPU
we could not test never loses a run to our kernel. ``backend="triton"`` named explicitly is not
second-guessed: its failures raise.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch

BACKENDS = ("auto", "triton", "native", "reference")


class BackendUnavailable(RuntimeError):
    """A backend asked for by name cannot run this input; the message says why."""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_status() -> str | None:
    """None when Triton is importable, else the reason it is not."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"Triton is not importable ({type(e).__name__}: {e})"
    return None


@functools.cache
def native_status() -> str | None:
    """None when the compiled extension fastitm._C loads and matches, else the reason."""
    try:
        from .. import _C
    except ImportError as e:
        return (f"the native extension fastitm._C is not built ({e}); reinstall with a C++ compiler and "
                "cmake: pip install --no-build-isolation -e .")
    from_abi = _C.abi_version()
    if from_abi != NATIVE_ABI:
        return f"fastitm._C is a stale build (ABI {from_abi}, expected {NATIVE_ABI}); rebuild it"
    return None


# Must equal FASTITM_NATIVE_ABI in csrc/fastitm.h.
NATIVE_ABI = 3


def env_backend() -> str:
    b = os.environ.get("FASTITM_BACKEND", "auto").strip().lower() or "auto"
    if b not in BACKENDS:
        raise ValueError(f"FASTITM_BACKEND={b!r} is not one of {BACKENDS}")
    return b


def reasons_against(backend: str, tensors: list[torch.Tensor]) -> list[str]:
    """Why ``backend`` cannot run on these tensors (empty list: it can)."""
    devices = {t.device.type for t in tensors}
    out = []
    if backend == "triton":
        if triton_status():
            out.append(triton_status())
        if devices != {"cuda"} and not (triton_interpret() and devices == {"cpu"}):
            out.append(f"Triton needs CUDA tensors (got {sorted(devices)}); set TRITON_INTERPRET=1 to run it on CPU")
    elif backend == "native":
        if native_status():
            out.append(native_status())
        if devices != {"cpu"}:
            out.append(f"the native extension runs on CPU tensors (got {sorted(devices)})")
    return out


_warned: set[str] = set()


def choose(backend: str, tensors: list[torch.Tensor], op: str) -> str:
    """Resolve ``backend`` for one call. A backend named explicitly that cannot run raises with
    every reason; "auto" picks Triton on CUDA, native on CPU, else the reference (warning once)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        backend = env_backend()
    if backend == "reference":
        return backend
    if backend != "auto":
        why = reasons_against(backend, tensors)
        if why:
            raise BackendUnavailable(f"{op}: backend {backend!r} cannot run: " + "; ".join(why))
        return backend
    device = tensors[0].device.type
    preferred = _preferred(device)
    why = reasons_against(preferred, tensors)
    if not why and preferred == "triton":
        failed = first_contact(op, tensors[0].device, tensors[0].dtype)
        if failed is None:
            return preferred
        key = f"{op}:first-contact:{tensors[0].device}:{tensors[0].dtype}"
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"{op}: the Triton kernel failed its first check on this device ({failed}); using the "
                          "PyTorch reference instead (same numbers, slower). backend='triton' would raise.",
                          RuntimeWarning, stacklevel=3)
        return "reference"
    if not why:
        return preferred
    if preferred == "triton" and device == "cpu" and not reasons_against("native", tensors):
        return "native"
    key = f"{op}:{preferred}:{device}"
    if key not in _warned and device == "cuda":
        _warned.add(key)
        warnings.warn(f"{op}: falling back to the PyTorch reference: " + "; ".join(why), stacklevel=3)
    return "reference"


def _preferred(device_type: str) -> str:
    # On CPU the native op is the fast path even under TRITON_INTERPRET=1 (the interpreter is for
    # checking kernels, not for speed); Triton runs on CPU only when asked for by name.
    return "triton" if device_type == "cuda" else "native"


# op name -> self-check(device, dtype) returning None (the kernel matched the reference) or a reason.
_SELF_CHECKS: dict[str, Callable[[torch.device, torch.dtype], str | None]] = {}
_first_contact: dict[tuple, str | None] = {}


def register_self_check(op: str, check: Callable[[torch.device, torch.dtype], str | None]) -> None:
    """Register the op's Triton self-check (each op module registers its own at import)."""
    _SELF_CHECKS[op] = check


def first_contact(op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the Triton kernel(s) of ``op`` compiled and matched the reference on a small input
    on ``device`` in ``dtype``, else why not. Checked once per (op, device, dtype). An op with no
    self-check of its own (e.g. "fastitm.score") stands for every registered kernel."""
    names = [op] if op in _SELF_CHECKS else sorted(_SELF_CHECKS)
    for name in names:
        key = (name, str(device), dtype)
        if key not in _first_contact:
            try:
                _first_contact[key] = _SELF_CHECKS[name](device, dtype)
            except Exception as e:  # a compilation error, an unsupported instruction, a launch failure
                _first_contact[key] = brief_error(e)
        if _first_contact[key] is not None:
            return f"{name}: {_first_contact[key]}"
    return None


def brief_error(e: BaseException) -> str:
    """"ExceptionType: the first line of its message", for one-line warnings and reports."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def reset_first_contact() -> None:
    """Forget the self-check results and warnings (tests)."""
    _first_contact.clear()
    _warned.clear()


def self_check_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) of a self-check against the float32 reference: well above rounding, far below a bug."""
    return {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2)}.get(dtype, (6e-2, 6e-2))
