"""Running the UNet on packed rows: eagerly, or by replaying a captured CUDA graph.

On CUDA, launching a UNet's few hundred kernels one by one from Python costs more than the small
kernels themselves at scoring batch sizes. :class:`UNetRunner` captures the UNet forward (with the
fused attention processors and their pooled-score sink, when installed) once per batch bucket and
replays it for every batch: inputs are copied into static buffers, the last, smaller batch is padded
(the padding rows compute garbage that is never read), and the outputs are static views the caller
consumes before the next replay (the error reduction runs on the same stream, so stream order makes
that safe). On the CPU the runner is always eager.

Off by default (``FASTITM_CUDA_GRAPHS=1`` turns graphs on): measured on an H200 with the SD 2.1-base
architecture in bf16 (bench/RESULTS.md), one denoiser batch of 16-128 rows takes 45-320 ms of GPU
time, so launch overhead is already hidden, and each ``fastitm.score`` call's capture (two warm-up
forwards, then the captured one) made the engine 4-33% slower than eager on 512-row calls.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..models.families import get
from ..ops._backend import brief_error


def graphs_enabled(device: torch.device) -> bool:
    """CUDA graphs are used on CUDA devices when ``FASTITM_CUDA_GRAPHS=1`` (off by default: see above)."""
    return device.type == "cuda" and os.environ.get("FASTITM_CUDA_GRAPHS", "0").strip() in ("1", "true", "on")


@dataclass
class _Captured:
    graph: Any
    x: torch.Tensor
    t: torch.Tensor
    cond: dict
    pred: torch.Tensor
    pooled: torch.Tensor | None


class UNetRunner:
    """``runner(x [n, C, h, w], t [n] int64, cond) -> (pred [n, C, h, w], pooled [n] or None)``.

    ``cond``: the conditioning rows, a dict of tensors each [n, ...] (``{"hidden": [n, L, D]}`` for
    SD; SDXL and SD 3 add pooled embeddings and time ids), or a bare [n, L, D] hidden-state tensor.
    ``forward(unet, x, t, cond)``: how the model family calls its denoiser (default: SD's UNet call).
    ``sink``: the :class:`fastitm.engine.attention.PooledScores` of installed fused processors, or None.
    ``bucket``: the batch size graphs are captured for (every call has n <= bucket).
    ``use_graph``: capture and replay (CUDA only); otherwise run eagerly through the same interface.
    """

    def __init__(self, unet, sink=None, *, bucket: int, use_graph: bool, warmup: int = 2, forward=None) -> None:
        if use_graph and unet.device.type != "cuda":
            raise ValueError("CUDA graphs need the UNet on a CUDA device")
        self.unet, self.sink, self.bucket, self.use_graph, self.warmup = unet, sink, bucket, use_graph, warmup
        if forward is None:

            forward = get("sd").forward
        self.forward = forward
        self.fallback: str | None = None  # why capture failed, when it did
        self._captured: _Captured | None = None
        self.replays = 0
        # A compiled denoiser (torch.compile with fixed shapes, fastitm.models.speed.apply) is specialised to its
        # batch shape: a smaller batch (a call's last, a racing round's) would compile it again, minutes
        # on a CPU. Eager calls are then padded to the bucket, as graph replays are.
        # Its guards also check strides: every call gets the latents in one layout, its convolutions'.
        self.pad = getattr(unet, "_compiled_call_impl", None) is not None
        self.padded_rows = 0
        self.compiled_ok = False  # a compiled call has succeeded: later errors are the run's own
        w = getattr(getattr(unet, "conv_in", None), "weight", None)
        nhwc = w is not None and w.dim() == 4 and not w.is_contiguous() \
            and w.is_contiguous(memory_format=torch.channels_last)
        self.layout = torch.channels_last if nhwc else torch.contiguous_format

    def _forward(self, x, t, cond):
        if self.sink is not None:
            self.sink.reset()
        pred = self.forward(self.unet, x, t, cond)
        pooled = self.sink.row_scores().float() if self.sink is not None else None
        return pred, pooled

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond):
        if isinstance(cond, torch.Tensor):
            cond = {"hidden": cond}
        n = x.shape[0]
        if n > self.bucket:
            raise ValueError(f"{n} rows exceed the runner's batch bucket {self.bucket}")
        if not self.use_graph:
            if not self.pad:
                return self._forward(x, t, cond)
            if n < self.bucket:
                fill = torch.arange(self.bucket, device=x.device) % n  # real rows repeated: no garbage
                x, t, cond = x[fill], t[fill], {key: value[fill] for key, value in cond.items()}
                self.padded_rows += self.bucket - n
            try:
                pred, pooled = self._forward(x.contiguous(memory_format=self.layout), t, cond)
            except Exception as e:  # noqa: BLE001 - a compiler that fails (no C++ toolchain, an op it lacks)
                if self.compiled_ok:
                    raise
                # The first compiled call failed: the run goes on with the eager denoiser, slower, the same
                # numbers, rather than being lost to the compiler.
                self.unet._compiled_call_impl = None
                cause = getattr(e, "inner_exception", None) or e.__cause__ or e  # dynamo wraps the compiler's error
                self.pad, self.fallback = False, brief_error(cause)
                warnings.warn(f"torch.compile of the denoiser failed ({self.fallback}); running it eagerly",
                              RuntimeWarning, stacklevel=2)
                return self._forward(x[:n], t[:n], {key: value[:n] for key, value in cond.items()})
            self.compiled_ok = True
            return pred[:n], (None if pooled is None else pooled[:n])
        if self._captured is None:
            try:
                self._captured = self._capture(x, t, cond)
            except Exception as e:  # noqa: BLE001 - any capture failure: a run must not be lost to it
                # A model or processor that cannot be captured (a host sync, an unsupported op on
                # this GPU or driver) runs eagerly: slower, same numbers.
                self.use_graph = False
                self.fallback = brief_error(e)
                warnings.warn(f"CUDA graph capture failed ({self.fallback}); running the denoiser eagerly",
                              RuntimeWarning, stacklevel=2)
                _end_failed_capture(x.device)
                return self._forward(x, t, cond)
        c = self._captured
        c.x[:n].copy_(x)
        c.t[:n].copy_(t)
        for key, value in cond.items():
            c.cond[key][:n].copy_(value)
        c.graph.replay()
        self.replays += 1
        return c.pred[:n], (None if c.pooled is None else c.pooled[:n])

    def _capture(self, x, t, cond) -> _Captured:
        # Static inputs start as real rows (repeated), so warm-up and padding never see garbage.
        fill = torch.arange(self.bucket, device=x.device) % x.shape[0]
        sx, st = x[fill].clone(), t[fill].clone()
        sc = {key: value[fill].clone() for key, value in cond.items()}
        # Warm-up on a side stream: lazy initialisation (cuDNN/cuBLAS handles, Triton compilation)
        # must happen before capture, and not on the stream being captured.
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._forward(sx, st, sc)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            pred, pooled = self._forward(sx, st, sc)
        return _Captured(graph, sx, st, sc, pred, pooled)


def _end_failed_capture(device) -> None:
    """After a failed capture, let pending work finish so the eager run starts on a clean stream."""
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001 - the eager run reports any lasting error itself
            pass
