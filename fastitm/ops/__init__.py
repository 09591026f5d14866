"""fastitm ops: one module per op, each with its pure-PyTorch ``*_ref`` and a dispatching entry.

``backend`` is "auto" (Triton on CUDA, the native C++ op on CPU when built, else the reference),
"triton", "native" or "reference"; ``FASTITM_BACKEND`` overrides "auto".

May import: torch, and lazily the Triton kernels (:mod:`fastitm.kernels`) and the compiled extension
(``fastitm._C``), both optional; nothing else of fastitm (every layer above calls these ops).
"""

from ._backend import BACKENDS, BackendUnavailable, native_status, triton_status
from .cross_attention_lse import cross_attention_lse, cross_attention_lse_ref
from .error_reduce import error_reduce, error_reduce_ref

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "cross_attention_lse",
    "cross_attention_lse_ref",
    "error_reduce",
    "error_reduce_ref",
    "native_status",
    "triton_status",
]
