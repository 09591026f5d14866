"""Work sharing inside the denoiser: the rows of one batch compute what they share once.

A scoring batch repeats its inputs. The rows of one (image, timestep) cell (each of its texts, and
the empty prompt) have the same noisy latent and timestep; every row of one text has the same hidden
states. Two parts of a UNet2DConditionModel read only one of the two, so :class:`RowSharing` runs them
once per distinct input and gathers the result back to the rows:

- **the text-free prefix** (per cell): the blocks before the first cross-attention read only the
  latent and the time embedding, which is the timestep's alone when the UNet adds nothing to it
  (SD 1.x/2.x; SDXL adds the pooled text and time ids, so it has no such prefix). These are the
  first down block's first ResNet and the self-attention of its first transformer block (at SD 2.1's
  32x32 latents, 2.8% of a row's time on the CPU). The convolution in front of them is too cheap to
  be worth a gather.
- **the cross-attention keys and values** (per text): ``to_k`` and ``to_v`` (``to_kv`` when fused) of
  every cross-attention layer project the text's hidden states, the same for every row of that text
  (1.9% of a row's time there, 77 tokens x 1024 channels into each layer's width).

Forward hooks do it, so any attention processor (diffusers', fastitm's fused LSE pooling) gets the
same tensors it would have computed. A hook slices its module's inputs to one representative row per
distinct input and gathers the output back with ``index_select``; identical rows going into
per-sample operations give identical rows out, so the values are those of running every row, up to
the rounding a different batch shape gives a kernel. Off under CUDA graphs and ``torch.compile``
(whose shapes must not vary from batch to batch) and with ``FASTITM_ROW_SHARING=0``.
"""

from __future__ import annotations

import os

import torch

from .common import to_device


def disabled_reason(unet, *, use_graph: bool = False) -> str | None:
    """Why row sharing is off for this denoiser, or None when it applies."""
    if os.environ.get("FASTITM_ROW_SHARING", "1").strip().lower() in ("0", "false", "off"):
        return "off (FASTITM_ROW_SHARING=0)"
    if not hasattr(unet, "down_blocks") or not hasattr(unet, "conv_in"):
        return f"{type(unet).__name__} is not a UNet with cross-attention"
    if use_graph:
        return "off under CUDA graphs (a captured graph has fixed shapes)"
    if getattr(unet, "_compiled_call_impl", None) is not None:
        return "off under torch.compile (shapes would vary by batch)"
    return None


def prefix_modules(unet) -> list[torch.nn.Module]:
    """The modules an SD 1.x/2.x UNet runs before its first cross-attention, whose inputs are one
    cell's alone: the first down block's first ResNet and its first transformer block's
    self-attention (the ResNet alone when that attention is not a plain self-attention). Empty when
    the time embedding takes more than the timestep (SDXL's text and time ids) or the first down
    block has no cross-attention."""
    cfg = unet.config
    if cfg.get("addition_embed_type") is not None or cfg.get("class_embed_type") is not None:
        return []
    block = unet.down_blocks[0]
    if not getattr(block, "attentions", None):  # (SDXL's first block has none, and no prefix either)
        return []
    mods: list[torch.nn.Module] = [block.resnets[0]]
    first = getattr(block.attentions[0], "transformer_blocks", [None])[0]
    attn1 = getattr(first, "attn1", None)
    if attn1 is not None and not getattr(first, "only_cross_attention", False) \
            and not getattr(attn1, "is_cross_attention", True):
        mods.append(attn1)
    return mods


def kv_modules(unet) -> list[torch.nn.Module]:
    """The key and value projections of every cross-attention layer (``to_kv`` too, for fused ones)."""
    out = []
    for m in unet.modules():
        if getattr(m, "is_cross_attention", False) and hasattr(m, "to_k"):
            out += [p for p in (m.to_k, m.to_v, getattr(m, "to_kv", None)) if p is not None]
    return out


class _Groups:
    """One batch's rows grouped by a key: ``rep`` [G] the first row of each group, ``inv`` [n] each
    row's group (both on the device)."""

    def __init__(self, n: int, rep: torch.Tensor, inv: torch.Tensor, device: torch.device) -> None:
        self.n, self.g = n, len(rep)
        both = to_device(torch.cat([rep, inv]), device)  # one copy, without waiting for the device
        self.rep, self.inv = both[: self.g], both[self.g :]


def _groups(key: torch.Tensor, device: torch.device) -> _Groups | None:
    """The rows of ``key`` [n] (CPU) grouped, or None when every row is its own group (a gather would
    only add a copy)."""
    n = len(key)
    _, inv = torch.unique(key, return_inverse=True)
    g = int(inv.max()) + 1
    if g == n:
        return None
    rep = torch.full((g,), n, dtype=torch.long).scatter_reduce(0, inv, torch.arange(n), "amin")
    return _Groups(n, rep, inv, device)


class RowSharing:
    """Hooks on a UNet that share the prefix per cell and the cross-attention K/V per text.

    ``with RowSharing(unet) as share:`` installs the hooks (removed on exit); before each denoiser
    call, ``share.batch(cells [n], texts [n], device)`` gives each row's cell and text keys (CPU int64;
    rows with equal keys have equal inputs to the shared parts). A call of another batch size, or before
    :meth:`batch`, runs unshared. ``rows`` counts the rows the shared parts ran: ``{"prefix": .,
    "kv": .}`` against ``rows["all"]`` in all.
    """

    def __init__(self, unet) -> None:
        self.prefix, self.kv = prefix_modules(unet), kv_modules(unet)
        self._cells: _Groups | None = None
        self._texts: _Groups | None = None
        self._handles: list = []
        self._sliced: set[int] = set()
        self.rows = {"all": 0, "prefix": 0, "kv": 0}

    def batch(self, cells: torch.Tensor, texts: torch.Tensor, device: torch.device) -> None:
        n = len(cells)
        self.rows["all"] += n
        # a part whose rows are all distinct runs as is
        self._cells = _groups(cells, device) if self.prefix else None
        self._texts = _groups(texts, device) if self.kv else None
        self.rows["prefix"] += self._cells.g if self._cells is not None else n
        self.rows["kv"] += self._texts.g if self._texts is not None else n

    def __enter__(self) -> RowSharing:
        for m in self.prefix:
            self._handles.append(m.register_forward_pre_hook(self._pre(lambda: self._cells), with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._post(lambda: self._cells)))
        for m in self.kv:
            self._handles.append(m.register_forward_pre_hook(self._pre(lambda: self._texts), with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._post(lambda: self._texts)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._cells = self._texts = None

    def _pre(self, groups):
        def hook(mod, args, kwargs):
            grp = groups()
            if grp is None or not args or not torch.is_tensor(args[0]) or args[0].shape[0] != grp.n \
                    or kwargs.get("attention_mask") is not None:
                return None

            def take(v):  # every per-row tensor input (hidden states, a ResNet's temb)
                return v.index_select(0, grp.rep) if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == grp.n else v

            self._sliced.add(id(mod))
            return tuple(take(a) for a in args), {k: take(v) for k, v in kwargs.items()}
        return hook

    def _post(self, groups):
        def hook(mod, args, out):
            if id(mod) not in self._sliced:
                return None
            self._sliced.discard(id(mod))
            grp = groups()
            full = out.index_select(0, grp.inv)
            if out.dim() == 4 and out.is_contiguous(memory_format=torch.channels_last):
                full = full.contiguous(memory_format=torch.channels_last)  # keep the convolutions' layout
            return full
        return hook
