"""The fused cross-attention processor inside a real (tiny) diffusers UNet."""

import pytest
import torch

import fastitm
from fastitm.attention import lse_pooling
from fastitm.ops import native_status
from fastitm.testing import assert_close

BACKENDS = ["reference", pytest.param("native", marks=pytest.mark.skipif(native_status() is not None,
                                                                        reason=str(native_status()))), "triton"]


def unet_inputs(tiny, B=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, *tiny.latent_shape, generator=g)
    t = torch.tensor([10, 500, 990][:B])
    ids = tiny.tokenizer(["a red dog", "a blue circle left of a cat", ""][:B], padding="max_length",
                         max_length=77, return_tensors="pt").input_ids
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
