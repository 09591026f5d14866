"""fastitm.engine.sharing: within a batch, the UNet's text-free prefix runs once per (image, timestep) cell and
the cross-attention keys and values once per text, with the values of running every row."""

import pytest
import torch

import fastitm
from fastitm.engine.sharing import RowSharing, disabled_reason, kv_modules, prefix_modules
from fastitm.testing import assert_close

T = 6
TEXTS = ["a red square", "a blue circle", "two green triangles", "a small dog"]


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(3)
    return torch.rand(3, 3, 16, 16, generator=g)


def batch_sizes_into(modules):
    """Record the batch size each call of ``modules`` receives (hooks registered before the sharing's
    run first, so they see the unsliced rows; ``seen`` lists what the module itself computed)."""
    seen = []
    handles = [m.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0])) for m in modules]
    return seen, handles


def test_the_shared_parts_run_once_per_cell_and_per_text_with_the_same_output(tiny):
    unet = tiny.unet
    prefix, kv = prefix_modules(unet), kv_modules(unet)
    first = unet.down_blocks[0]
    assert prefix == [first.resnets[0], first.attentions[0].transformer_blocks[0].attn1]
    cross = [m for m in unet.modules() if getattr(m, "is_cross_attention", False)]
    assert len(cross) > 1 and kv == [p for m in cross for p in (m.to_k, m.to_v)]
    g = torch.Generator().manual_seed(0)
    cells = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])  # 3 cells
    texts = torch.tensor([0, 1, 4, 0, 4, 1, 0, 4])  # 3 texts (4: the empty prompt)
    x = torch.randn(3, 4, 8, 8, generator=g)[cells]
    t = torch.tensor([5, 400, 900])[cells]
    hid = torch.randn(5, 77, 32, generator=g)[texts]
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=hid).sample
        with RowSharing(unet) as share:
            seen_prefix, h1 = batch_sizes_into(prefix)
            seen_kv, h2 = batch_sizes_into(kv)
            share.batch(cells, texts, torch.device("cpu"))
            got = unet(x, t, encoder_hidden_states=hid).sample
            for h in h1 + h2:
                h.remove()
            other = unet(x[:5], t[:5], encoder_hidden_states=hid[:5]).sample  # another batch size: unshared
    assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_close(other, want[:5], rtol=1e-5, atol=1e-6)
    assert seen_prefix == [3, 3] and seen_kv == [3] * len(kv)
    assert share.rows == {"all": 8, "prefix": 3, "kv": 3}
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in prefix + kv)  # removed on exit


def test_families_share_what_reads_one_input(tiny):
    sdxl, sd3 = fastitm.testing.tiny_sdxl_model(seed=0), fastitm.testing.tiny_sd3_model(seed=0)
    # SDXL's time embedding adds the pooled text: no text-free prefix, but its keys and values are per text
    assert prefix_modules(sdxl.unet) == [] and len(kv_modules(sdxl.unet)) > 0
    assert "not a UNet" in disabled_reason(sd3.unet)  # joint attention: the text stream changes per block
    assert disabled_reason(tiny.unet) is None


@pytest.mark.parametrize("method,kw", [("diffusion_itm", {}), ("discffusion", {"preset": "published"}),
                                       ("diffusion_classifier", {})])
def test_engine_scores_are_those_of_every_row_and_the_shared_rows_are_counted(tiny, images, method, kw,
                                                                              monkeypatch):
    uncond = method != "diffusion_classifier"
    per_image = (len(TEXTS) + uncond) * T
    # one image's rows per batch: each batch holds T cells and len(TEXTS) + uncond texts
    args = dict(model=tiny, method=method, timesteps=T, batch_size=per_image, progress=False, **kw)
    got = fastitm.score(images, TEXTS, **args)
    monkeypatch.setenv("FASTITM_ROW_SHARING", "0")
    want = fastitm.score(images, TEXTS, **args)
    # a DiffusionITM score is a difference of errors of about 1: its rounding is absolute
    assert_close(got.per_timestep, want.per_timestep, rtol=1e-5, atol=1e-5)
    assert_close(got.matrix, want.matrix, rtol=1e-5, atol=1e-5)
    assert want.stats["row_sharing"].startswith("off") and "prefix_rows" not in want.stats
    assert got.stats["row_sharing"] == "on" and got.stats["unet_rows"] == len(images) * per_image
    assert got.stats["prefix_rows"] == len(images) * T
    assert got.stats["kv_rows"] == len(images) * (len(TEXTS) + uncond)
