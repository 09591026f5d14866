"""Speed levers: the dtype and batch size chosen by device, and optional model transforms.

Every lever keeps the numbers (each has a CPU correctness test against the untransformed model) and
has a ``gpu``-marked benchmark (``bench/test_levers_bench.py``). What is on by default:

- dtype: bfloat16 on CUDA (the GPU's fast matrix units; a UNet's scores in bf16 stay within bf16's
  rounding of the fp32 ones), float32 on the CPU. ``dtype="bf16"`` on a CPU works everywhere, and is
  fast only with AVX512-BF16 or AMX (:func:`cpu_bf16_support` says which).
- batch size: on CUDA the largest power of two whose activations fit a fraction of the free memory
  (measured by a 2-row probe of the denoiser); on the CPU 32 rows for small latents (the UNet's rows/s
  there keep growing up to about 32), fewer as latents grow.
- ``channels_last`` (the UNet's and the VAE encoder's convolutions in NHWC): on for a float32 model on
  the CPU (oneDNN's NHWC convolutions: SD 2.1-base at 256 px, the VAE encode 0.70x the time and a
  UNet batch of 8 0.95x; the embedded model no slower), off on CUDA (0.89x the rows/s on an H200,
  SD 2.1-base, bf16, batch 64). :func:`default_channels_last` decides it.
- off, until a GPU run measures them, ``fuse_qkv`` (diffusers' fused QKV projections of self-attention) and,
  on CUDA, ``compile`` (``torch.compile`` of the denoiser; composes with the CUDA graph runner, which
  captures the compiled forward).
- ``compile`` on the CPU: the command line's runs (``fastitm score``, ``fastitm eval``) compile the
  denoiser when the run is long enough to repay it (:func:`compile_pays`, from the plan's rows before
  the run, the reason printed); ``--compile`` / ``--no-compile`` decide it instead. Python calls compile
  only when asked (``load_model(..., compile=True)``): a library call cannot know how many follow.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from typing import Any

import torch

# CPU batch size: 32 rows up to 32x32 latents, then as many rows as hold 32 * 32 * 32 latent pixels
# (64x64 latents: 8 rows; 128x128: 2).
CPU_MAX_BATCH = 32
CPU_BATCH_PIXELS = 32 * 32 * 32
CUDA_MEMORY_FRACTION = 0.5
CUDA_MAX_BATCH = 128


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a CUDA device that supports it, float32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@functools.cache
def cpu_bf16_support() -> str | None:
    """The CPU's native bfloat16 instructions ("amx_bf16", "avx512_bf16"), or None without them."""
    try:
        flags = set()
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        return None
    for name in ("amx_bf16", "avx512_bf16"):
        if name in flags:
            return name
    return None


def check_cpu_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """Warn, naming what the CPU lacks, when bfloat16 runs on a CPU without native bf16 instructions
    (it works, converted in software, and is usually slower than float32 there)."""
    if device.type == "cpu" and dtype == torch.bfloat16 and cpu_bf16_support() is None \
            and os.environ.get("FASTITM_QUIET_BF16") != "1":
        warnings.warn("dtype bf16 on a CPU without AVX512-BF16 or AMX: it runs with converted float32 arithmetic "
                      "and is usually slower than fp32 here; use dtype fp32 on this CPU", RuntimeWarning, stacklevel=3)


def default_batch_size(model) -> int:
    """Rows per denoiser call when the caller gives none (see the module docstring)."""
    if model.device.type == "cuda":
        cached = getattr(model, "_fastitm_batch_size", None)
        if cached is None:
            cached = cuda_batch_size(model)
            model._fastitm_batch_size = cached  # once per model: the probe costs a denoiser call
        return cached
    _, h, w = model.latent_shape
    return max(1, min(CPU_MAX_BATCH, CPU_BATCH_PIXELS // (h * w)))


@torch.no_grad()
def cuda_batch_size(model, fraction: float = CUDA_MEMORY_FRACTION, cap: int = CUDA_MAX_BATCH) -> int:
    """The largest power of two (at most ``cap``) whose denoiser activations, measured by a 2-row probe,
    fit ``fraction`` of the device's free memory."""
    device = model.device
    torch.cuda.synchronize(device)
    free, _ = torch.cuda.mem_get_info(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    cond = model.spec.encode_empty(model)
    cond = {k: v.expand(2, *v.shape[1:]) for k, v in cond.items()}
    x = torch.zeros(2, *model.latent_shape, device=device, dtype=model.dtype)
    t = torch.full((2,), model.num_train_timesteps // 2, device=device, dtype=torch.long)
    model.spec.forward(model.unet, x, t, cond)
    torch.cuda.synchronize(device)
    per_row = max(1, (torch.cuda.max_memory_allocated(device) - base) // 2)
    return largest_fitting_batch(free, per_row, fraction, cap)


def default_channels_last(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`fastitm.load_model` puts the convolutions in channels-last layout by default:
    for float32 on the CPU only (measured faster there; slower on an H200 in bf16; unmeasured in
    low precision on the CPU, where bf16 convolutions take a slow path anyway)."""
    return device.type == "cpu" and dtype == torch.float32


# The compile lever on the CPU, measured by bench/compile_bench.py (bench/RESULTS.md): SD 2.1-base
# architecture at 256 px, fp32, 2 threads, batches of 8, whole fastitm.score calls alternating, medians of
# 3: the compiled denoiser's calls took 0.922 of the eager ones' time (inductor with frozen weights; row
# sharing off under compile, on in eager), and compiling cost 104 s, 9.3 eager batches' time. A run
# compiles when it saves at least twice that.
CPU_COMPILE_SAVING = 0.078  # of each full batch's eager time
CPU_COMPILE_COST_BATCHES = 9.3  # compiling, in eager batches' time
CPU_COMPILE_PAYBACK = 2.0
AUTO_COMPILE_BACKEND: bool | str = True  # what auto_compile passes to apply(compile=...): inductor


def compile_pays(device: torch.device, batches: int, padded: int) -> tuple[bool, str]:
    """Whether compiling the denoiser repays itself on a run of ``batches`` denoiser batches, ``padded`` of
    them short ones (a compiled denoiser is specialised to one batch shape, so a short batch is padded to
    full and its padding rows are lost time); and why, in one line. CPU only (unmeasured on GPUs)."""
    if device.type != "cpu":
        return False, "off (decided on the CPU only; --compile turns it on)"
    saved = batches * CPU_COMPILE_SAVING - padded  # in eager batches' time
    cost = CPU_COMPILE_COST_BATCHES
    if saved >= CPU_COMPILE_PAYBACK * cost:
        return True, (f"on: {batches} denoiser batches should save about {saved:.0f} batches' time, against about "
                      f"{cost:.0f} to compile (--no-compile turns it off)")
    return False, (f"off: {batches} denoiser batches would save about {max(saved, 0.0):.1f} batches' time, less than "
                   f"twice the {cost:.0f} compiling costs (--compile turns it on)")


def auto_compile(model, rows: list[int], batch_size: int, *, rounds: bool = False, say: bool = True) -> str:
    """The command line's ``compile`` decision for a run of engine calls of ``rows`` rows each (before any
    is scored): compile the denoiser in place when :func:`compile_pays`; returns the reason, and says it
    on stderr when compile is on (``say``: False on all but one rank). ``rounds``: the run races or
    eliminates candidates, so its calls run in rounds of unknown sizes (each short batch padded): left off."""
    why = _compile_decision(model, rows, batch_size, rounds)
    if say and why.startswith("on"):
        print(f"fastitm: compile {why}", file=sys.stderr)
    return why


def _compile_decision(model, rows: list[int], batch_size: int, rounds: bool) -> str:
    if model.levers.get("compile"):
        return "on (asked for)"
    if not hasattr(model.unet, "conv_in"):
        return "off (measured for UNet denoisers only; --compile turns it on)"
    if rounds:
        return "off: racing and elimination run rounds of varying sizes, each short batch padded (--compile turns it on)"
    batches, padded = batches_of(rows, batch_size)
    pays, why = compile_pays(model.device, batches, padded)
    if pays:
        levers = dict(model.levers)
        apply(model, compile=AUTO_COMPILE_BACKEND)
        model.levers = {**levers, "compile": True}  # the levers applied before stay as they are
    return why


def batches_of(rows: list[int], batch_size: int) -> tuple[int, int]:
    """(denoiser batches, short ones) of engine calls of ``rows`` rows each, cut into ``batch_size``."""
    return sum(-(-r // batch_size) for r in rows), sum(1 for r in rows if r % batch_size)


def largest_fitting_batch(free_bytes: int, per_row_bytes: int, fraction: float, cap: int) -> int:
    """The largest power of two, at least 1 and at most ``cap``, whose rows of ``per_row_bytes`` fit
    ``fraction`` of ``free_bytes``."""
    rows = int(fraction * free_bytes // max(1, per_row_bytes))
    bs = 1
    while bs * 2 <= min(rows, cap):
        bs *= 2
    return bs


def apply(model, *, channels_last: bool = False, fuse_qkv: bool = False, compile: bool | str = False) -> Any:
    """Apply the optional levers to ``model`` in place and return it.

    ``channels_last``: the UNet's and the VAE encoder's weights in NHWC, and with them their
    activations (a convolution takes the layout of its weight; a transformer denoiser has no
    convolutions to reorder: only its VAE is). The values are unchanged, so any other user of these
    modules gets the same numbers up to the convolution's rounding. ``fuse_qkv``: diffusers' ``fuse_qkv_projections`` (one
    matmul for the self-attention Q, K and V; the cross-attention processors fastitm installs read the
    unfused K and V, which diffusers keeps). ``compile``: ``torch.compile`` the denoiser's forward in
    place (True: the default inductor backend; a string names another backend, e.g. "eager" to check
    tracing without a compiler).
    """
    unet = model.unet
    if channels_last:
        vae = model.vae
        for part in (unet if hasattr(unet, "conv_in") else None, getattr(vae, "encoder", None),
                     getattr(vae, "quant_conv", None)):
            if part is not None:
                part.to(memory_format=torch.channels_last)
    if fuse_qkv:
        if not hasattr(unet, "fuse_qkv_projections"):
            raise ValueError(f"{type(unet).__name__} has no fuse_qkv_projections")
        unet.fuse_qkv_projections()
    if compile:
        backend = "inductor" if compile is True else compile if callable(compile) else str(compile)
        if backend == "inductor" and unet.device.type == "cpu":
            from torch._inductor import config as inductor

            # the weights folded into the graph as constants: what bench/compile_bench.py measured (inductor's
            # setting is global and read when the denoiser first runs, so it stays on)
            inductor.freezing = True
        unet.compile(backend=backend, dynamic=False)
    model.levers = {"channels_last": bool(channels_last), "fuse_qkv": bool(fuse_qkv),
                    "compile": compile if isinstance(compile, str) else bool(compile)}
    return model
