"""Memory of a Discffusion training step: the fused cross-attention processor (its backward recomputes
the attention map) against stock attention with the LogSumExp pooling taken by forward hooks (the
reference, which keeps every [Lq, Lk] map for the backward), same LoRA, same inputs.

On the CPU the figure is the bytes autograd saves for the backward during the forward pass
(``torch.autograd.graph.saved_tensors_hooks``): exact and independent of the allocator. On a GPU
(``gpu`` marker) it is the peak of ``torch.cuda.max_memory_allocated`` over forward + backward.
Run: pytest bench/test_train_memory_bench.py -s
"""

import pytest
import torch
from benchutil import context

import fastitm
from fastitm.engine.attention import lse_pooling
from fastitm.models.lora import add_lora
from fastitm.reference import capture_attention_lse


def _inputs(model, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, *model.latent_shape, generator=g).to(model.device, model.dtype)
    t = torch.randint(0, 1000, (rows,), generator=g).to(model.device)
    L, D = model.tokenizer.model_max_length, model.text_encoder.config.hidden_size
    emb = torch.randn(rows, L, D, generator=g).to(model.device, model.dtype)
    return x, t, emb


def _fused_score(model, x, t, emb):
    with lse_pooling(model.unet, "all", "logits", 1.0, "auto") as sink:
        sink.reset()
        model.unet(x, t, encoder_hidden_states=emb)
        return sink.row_scores()


def _hooked_score(model, x, t, emb):
    with capture_attention_lse(model.unet, "all", "logits", 1.0) as rec:
        model.unet(x, t, encoder_hidden_states=emb)
    return torch.stack([r.mean(dim=1) for r in rec]).mean(dim=0)


def saved_bytes(fn, *args) -> tuple[int, torch.Tensor]:
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return total[0], out


def test_training_step_memory_cpu(report, benchmark):
    model = fastitm.load_model()
    add_lora(model.unet, 4, "cross")
    rows = 40  # a Discffusion batch: 8 images x (true caption + 4 negatives)
    x, t, emb = _inputs(model, rows)
    fused_bytes, fused = saved_bytes(_fused_score, model, x, t, emb)
    hooked_bytes, hooked = saved_bytes(_hooked_score, model, x, t, emb)
    torch.testing.assert_close(fused, hooked, rtol=1e-4, atol=1e-4)  # the same training signal
    # ... and the same gradients on the LoRA weights
    grads = []
    for fn in (_fused_score, _hooked_score):
        model.unet.zero_grad(set_to_none=True)
        fn(model, x, t, emb).sum().backward()
        grads.append({n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                      for n, p in model.unet.named_parameters() if "lora_" in n})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-5, msg=name)
    for k, v in context(model.device, model.dtype, model=model.source, rows=rows, lora="rank 4, cross-attention",
                        layers="all cross-attention").items():
        report(k, v)
    report("saved_for_backward_fused_MB", round(fused_bytes / 2**20, 2))
    report("saved_for_backward_hooks_MB", round(hooked_bytes / 2**20, 2))
    report("ratio", round(hooked_bytes / fused_bytes, 3))
    benchmark.pedantic(lambda: saved_bytes(_fused_score, model, x, t, emb), rounds=1, warmup_rounds=0)
    assert fused_bytes < hooked_bytes


@pytest.mark.gpu
def test_training_step_peak_memory_gpu(report, benchmark):
    model = fastitm.testing.sd21_base_architecture(device="cuda", dtype=torch.bfloat16)
    add_lora(model.unet, 4, "cross")
    x, t, emb = _inputs(model, 10)
    peaks = {}
    for name, fn in (("fused", _fused_score), ("hooks", _hooked_score)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(model, x, t, emb).float().sum().backward()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
        model.unet.zero_grad(set_to_none=True)
    for k, v in context(model.device, model.dtype, model=model.source, rows=10).items():
        report(k, v)
    report("peak_fused_MB", round(peaks["fused"] / 2**20, 1))
    report("peak_hooks_MB", round(peaks["hooks"] / 2**20, 1))
    benchmark.pedantic(lambda: None, rounds=1)
    assert peaks["fused"] < peaks["hooks"]
