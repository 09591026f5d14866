"""Diffusers integration: a cross-attention processor that runs the fused attention + LSE op.

Installed on the UNet's selected cross-attention layers (``attn2``), it computes the layer's output
with :func:`fastitm.ops.cross_attention_lse` and adds each batch row's pooled score, per head, into
a :class:`PooledScores` sink the scorer reads after the forward pass. Self-attention layers and
unselected cross-attention layers keep their processors (PyTorch SDPA).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

from ..ops.cross_attention_lse import cross_attention_lse
from .common import cross_attention_layers


class PooledScores:
    """Per layer: the running sum over forward calls of the mean-over-rows LSE, [B, H] float32."""

    def __init__(self) -> None:
        self.per_layer: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.per_layer.clear()

    def add(self, name: str, pooled_mean: torch.Tensor) -> None:
        prev = self.per_layer.get(name)
        self.per_layer[name] = pooled_mean if prev is None else prev + pooled_mean

    def row_scores(self) -> torch.Tensor:
        """[B]: the mean over layers of the mean over heads (Discffusion's per-row score)."""
        if not self.per_layer:
            raise RuntimeError("no pooled scores recorded: was the UNet run with the processors installed?")
        return torch.stack([v.mean(dim=1) for v in self.per_layer.values()]).mean(dim=0)


class LSEPoolingAttnProcessor:
    """Cross-attention through the fused op; records pooled LSE per (batch row, head) in ``sink``."""

    def __init__(self, name: str, sink: PooledScores, pool: str = "logits", lam: float = 1.0,
                 backend: str = "auto", key_mask: torch.Tensor | None = None) -> None:
        self.name, self.sink, self.pool, self.lam, self.backend = name, sink, pool, lam, backend
        self.key_mask = key_mask
        # Outside torch.compile's graph: the op hands raw pointers to C++ or launches Triton, and the
        # sink is Python state; the rest of the denoiser compiles around this call. Wrapped here rather
        # than by a decorator: torch.compiler.disable imports torch._dynamo (2-3 s), which `import
        # fastitm` would otherwise pay in every process, scoring or not.
        self._fused = torch.compiler.disable(self._fused_eager)

    def _fused_eager(self, q, k, v, scale):
        out, pooled = cross_attention_lse(q, k, v, scale=scale, pool=self.pool, lam=self.lam, key_mask=self.key_mask,
                                          backend=self.backend)
        self.sink.add(self.name, pooled / q.shape[2])
        return out

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError(f"{self.name}: LSEPoolingAttnProcessor is for cross-attention layers only")
        if attention_mask is not None:
            raise ValueError(f"{self.name}: an attention_mask is not supported; use the processor's key_mask")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        B = query.shape[0]
        heads = attn.heads
        d = key.shape[-1] // heads
        # Views, not copies: the kernels take strides (the native launcher copies when it must).
        q = query.view(B, -1, heads, d).transpose(1, 2)
        k = key.view(B, -1, heads, d).transpose(1, 2)
        v = value.view(B, -1, heads, d).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = self._fused(q, k, v, attn.scale)
        hidden_states = out.transpose(1, 2).reshape(B, -1, heads * d).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def lse_pooling(unet, layers: str = "all", pool: str = "logits", lam: float = 1.0, backend: str = "auto"):
    """Install :class:`LSEPoolingAttnProcessor` on the selected cross-attention layers for the block;
    yields the :class:`PooledScores` sink and restores the previous processors afterwards."""
    sink = PooledScores()
    chosen = cross_attention_layers(unet, layers)
    saved = [(m, m.processor) for _, m in chosen]
    try:
        for name, m in chosen:
            m.set_processor(LSEPoolingAttnProcessor(name, sink, pool, lam, backend))
        yield sink
    finally:
        for m, proc in saved:
            m.set_processor(proc)
