"""Triton kernels, installed as ``fastitm.kernels``.

Each module holds a private ``@triton.jit`` kernel and a launcher; they import Triton at module
import, so ``fastitm`` imports them only after deciding Triton is available.
"""
