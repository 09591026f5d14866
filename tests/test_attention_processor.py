"""The fused cross-attention processor inside a real (tiny) diffusers UNet."""

import pytest
import torch

import fastitm
from fastitm.engine.attention import lse_pooling
from fastitm.ops import native_status
from fastitm.testing import assert_close

BACKENDS = ["reference", pytest.param("native", marks=pytest.mark.skipif(native_status() is not None,
                                                                        reason=str(native_status()))), "triton"]


def unet_inputs(tiny, B=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, *tiny.latent_shape, generator=g)
    t = torch.tensor([10, 500, 990][:B])
    ids = tiny.tokenizer(["a red dog", "a blue circle left of a cat", ""][:B], padding="max_length",
                         max_length=77, return_tensors="pt").input_ids.to(tiny.text_encoder.device)
    with torch.no_grad():
        emb = tiny.text_encoder(ids)[0]
    return x, t, emb


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pool,layers", [("logits", "all"), ("probs", "last")])
def test_unet_output_unchanged_and_pooled_matches_hooks(triton_interpret, tiny, backend, pool, layers):
    x, t, emb = unet_inputs(tiny)
    with torch.no_grad():
        stock = tiny.unet(x, t, encoder_hidden_states=emb).sample
        with fastitm.reference.capture_attention_lse(tiny.unet, layers, pool, 1.7) as records:
            tiny.unet(x, t, encoder_hidden_states=emb)
        with lse_pooling(tiny.unet, layers, pool, 1.7, backend) as sink:
            fused = tiny.unet(x, t, encoder_hidden_states=emb).sample
    assert_close(fused, stock, rtol=1e-5, atol=1e-5, name="unet output")
    expected = torch.stack([r.mean(dim=1) for r in records]).mean(0)
    assert_close(sink.row_scores(), expected, rtol=1e-5, atol=1e-6, name="pooled")
    # the stock processors are back
    procs = {type(p).__name__ for p in tiny.unet.attn_processors.values()}
    assert procs == {"AttnProcessor2_0"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdxl_width_cross_attention(triton_interpret, backend):
    """One attn2 of SDXL base's 1280-wide blocks as released: 20 heads of 64, a 2048-wide context
    (both text encoders' states) with 77 keys; the fused processor against the stock one."""
    from diffusers.models.attention_processor import Attention

    from fastitm.engine.attention import LSEPoolingAttnProcessor, PooledScores

    g = torch.Generator().manual_seed(3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        attn = Attention(query_dim=1280, cross_attention_dim=2048, heads=20, dim_head=64, bias=False).eval()
    hidden = torch.randn(2, 37, 1280, generator=g)  # 37 query rows: not a multiple of any block size
    context = torch.randn(2, 77, 2048, generator=g)
    with torch.no_grad():
        stock = attn(hidden, encoder_hidden_states=context)
        q = attn.to_q(hidden).view(2, 37, 20, 64).transpose(1, 2)
        k = attn.to_k(context).view(2, 77, 20, 64).transpose(1, 2)
        want = fastitm.reference.attention_lse_ref(q, k, attn.scale, "logits", 1.0).mean(dim=1)
        sink = PooledScores()
        attn.set_processor(LSEPoolingAttnProcessor("sdxl", sink, backend=backend))
        fused = attn(hidden, encoder_hidden_states=context)
    assert_close(fused, stock, rtol=1e-5, atol=1e-5, name="output")
    assert_close(sink.row_scores(), want, rtol=1e-5, atol=1e-5, name="pooled")


@pytest.mark.gpu
def test_masked_processors_capture_in_a_cuda_graph():
    """A key mask is checked eagerly (a host read) but not while a CUDA graph is being captured, so
    processors with one are captured like the others and replay the eager numbers."""
    from fastitm.engine.attention import LSEPoolingAttnProcessor, PooledScores
    from fastitm.engine.common import cross_attention_layers
    from fastitm.engine.cuda_graphs import UNetRunner

    tiny = fastitm.testing.tiny_model(seed=0).to(device="cuda")
    x, t, emb = (a.cuda() for a in unet_inputs(tiny))  # the text encoder runs where the model is
    mask = torch.ones(3, 77, dtype=torch.bool, device="cuda")
    mask[:, 20:] = False
    sink = PooledScores()
    for name, m in cross_attention_layers(tiny.unet, "all"):
        m.set_processor(LSEPoolingAttnProcessor(name, sink, "probs", 1.5, "triton", key_mask=mask))
    with torch.no_grad():
        eager = UNetRunner(tiny.unet, sink, bucket=3, use_graph=False)(x, t, emb)
        eager = tuple(a.clone() for a in eager)
        runner = UNetRunner(tiny.unet, sink, bucket=3, use_graph=True)
        graphed = runner(x, t, emb)
    assert runner.fallback is None and runner.replays == 1
    assert_close(graphed[0], eager[0], rtol=1e-5, atol=1e-5, name="pred")
    assert_close(graphed[1], eager[1], rtol=1e-5, atol=1e-5, name="pooled")
