"""preset="published": each published choice pinned by a hand computation, engine == reference under
every preset, and Discffusion's published formula rebuilt independently with forward hooks."""

import warnings

import pytest
import torch
from PIL import Image

import fastitm
from fastitm.core.inputs import center_crop_geometry, prepare_images
from fastitm.core.methods import elimination_stages
from fastitm.ops import native_status
from fastitm.testing import assert_close

TEXTS = ["a red circle", "a blue square left of a dog", "a cat", "green"]
BACKENDS = ["reference", pytest.param("native", marks=pytest.mark.skipif(native_status() is not None,
                                                                         reason=str(native_status())))]


def small_unet(layers_per_block, transformer_layers=1, down=("CrossAttnDownBlock2D",) * 2,
               up=("CrossAttnUpBlock2D",) * 2):
    from diffusers import UNet2DConditionModel

    n = len(down)
    return UNet2DConditionModel(sample_size=8, block_out_channels=(32,) * n, layers_per_block=layers_per_block,
                                down_block_types=down, up_block_types=up, cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8,
                                transformer_layers_per_block=transformer_layers)


def names(unet, which):
    return [n for n, _ in fastitm.engine.common.cross_attention_layers(unet, which)]


def test_published_layers_two_and_three_attentions_per_block():
    # layers_per_block=2: down blocks hold 2 attentions, up blocks 3, the mid block 1.
    unet = small_unet(2)
    tb = "transformer_blocks.0.attn2"
    assert names(unet, "published") == [
        f"down_blocks.1.attentions.0.{tb}", f"down_blocks.1.attentions.1.{tb}",
        f"mid_block.attentions.0.{tb}",
        f"up_blocks.1.attentions.0.{tb}", f"up_blocks.1.attentions.1.{tb}", f"up_blocks.1.attentions.2.{tb}",
    ]
    assert names(unet, "last") == [f"down_blocks.0.attentions.1.{tb}", f"down_blocks.1.attentions.1.{tb}",
                                   f"mid_block.attentions.0.{tb}", f"up_blocks.0.attentions.2.{tb}",
                                   f"up_blocks.1.attentions.2.{tb}"]
    assert len(names(unet, "all")) == 2 + 2 + 1 + 3 + 3


def test_published_layers_skip_blocks_without_cross_attention_and_take_the_last_transformer_block():
    # As SD: the deepest down block and the first up block have no cross-attention; two transformer
    # blocks per attention (as SDXL): only the last one's attn2 counts.
    unet = small_unet(1, transformer_layers=2, down=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                      up=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    assert names(unet, "published") == [
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2",
        "mid_block.attentions.0.transformer_blocks.1.attn2",
        "up_blocks.2.attentions.0.transformer_blocks.1.attn2",
        "up_blocks.2.attentions.1.transformer_blocks.1.attn2",
    ]


def test_published_layers_on_the_embedded_model():
    model = fastitm.load_model()
    assert len(names(model.unet, "published")) == 4 and len(names(model.unet, "last")) == 5


def test_timestep_schemes_by_hand(tiny):
    plan = fastitm.make_plan(tiny, 10, scheme="midpoint")
    assert plan.timesteps.tolist() == [50, 150, 250, 350, 450, 550, 650, 750, 850, 950]
    # 1000 // 3 = 333, start 333 // 2 = 166, three entries
    assert fastitm.make_plan(tiny, 3, scheme="midpoint").timesteps.tolist() == [166, 499, 832]
    # Discffusion: 999 - g for g in range(10, 990, 100), ascending
    plan = fastitm.make_plan(tiny, 10, scheme="discffusion")
    assert plan.timesteps.tolist() == [89, 189, 289, 389, 489, 589, 689, 789, 889, 989]


def test_shared_noise_is_one_tensor(tiny):
    plan = fastitm.make_plan(tiny, 4, seed=7, noise="shared")
    one = torch.randn((1, *tiny.latent_shape), generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(plan.noise[k], one[0]) for k in range(4))
    assert plan.noise_mode == "shared" and plan.describe()["noise"] == "shared"


def test_published_elimination_rounds_timestep_sets():
    # n_samples [2, 5, 10] on 10 timesteps: 2, then 6, then 10 evaluated in all.
    stages = elimination_stages(10, ((2, 5), (5, 2)), "published")
    assert stages == [[2, 7], [1, 3, 5, 9], [0, 4, 6, 8]]
    assert elimination_stages(10, ((2, 5), (5, 2)), "spread")[0] == [5, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_published_elimination_engine_equals_reference(tiny, backend):
    imgs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    texts = ["a red circle", "a cat", "green", "a dog", "blue", "a square"]
    kw = dict(model=tiny, method="diffusion_classifier", elimination=[(2, 5), (5, 2)], order="published")
    res = fastitm.score(imgs, texts, timesteps=10, scheme="midpoint", batch_size=7, backend=backend, **kw)
    ref = fastitm.reference.score(imgs, texts, plan=res.plan, **kw)
    assert torch.equal(res.matrix.isinf(), ref.matrix.isinf())
    fin = res.matrix.isfinite()
    assert_close(res.matrix[fin], ref.matrix[fin], rtol=1e-5, atol=1e-6)
    assert torch.equal(res.per_timestep.isnan(), ref.per_timestep.isnan())
    # rows: 6 texts x 2 timesteps, 5 x 4 more, 2 x the last 4, per image
    assert res.stats["unet_rows"] == 2 * (6 * 2 + 5 * 4 + 2 * 4)
    # The published script gives its r-th evaluated timestep the r-th noise draw.
    order = [2, 7, 1, 3, 5, 9, 0, 4, 6, 8]
    draws = torch.randn((10, *tiny.latent_shape), generator=torch.Generator().manual_seed(0))
    for r, k in enumerate(order):
        assert torch.equal(res.plan.noise[k], draws[r])


@pytest.mark.parametrize("w,h,expected", [(640, 480, (682, 512, 85, 0)), (480, 640, (512, 682, 0, 85)),
                                          (513, 512, (513, 512, 0, 0))])
def test_center_crop_geometry(w, h, expected):
    # torchvision: short side to 512, long side int(512 * long / short); crop at round((side - 512) / 2)
    assert center_crop_geometry(w, h, 512) == expected


def _pil(w, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


def _pixels(img):
    import numpy as np

    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1) * 2 - 1


def test_center_crop_and_squash_pil_follow_pil_bicubic():
    img = _pil(40, 30)
    # center_crop to 16: 40x30 -> int(16 * 40 / 30) = 21 x 16, crop left round(5 / 2) = 2
    want = img.resize((21, 16), Image.BICUBIC).crop((2, 0, 18, 16))
    assert torch.equal(prepare_images([img], 16, "center_crop")[0], _pixels(want))
    assert torch.equal(prepare_images([img], 16, "squash_pil")[0], _pixels(img.resize((16, 16), Image.BICUBIC)))
    # A float tensor input is center-cropped by torch's antialiased bicubic, as torchvision does.
    t = _pixels(img)[None] * 0.5 + 0.5
    resized = torch.nn.functional.interpolate(t, size=(16, 21), mode="bicubic", antialias=True, align_corners=False)
    assert_close(prepare_images(t, 16, "center_crop")[0], resized[0, :, :, 2:18] * 2 - 1, rtol=0, atol=1e-6)


def test_sample_per_timestep_by_hand(tiny):
    """One pair, two timesteps: the latent of (image 0, timestep k) is mean + std * eps_k with eps_k from
    a generator seeded cell_seed(seed, 0, k); the score is minus the mean MSE."""
    from fastitm.core.plan import cell_seed

    img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    res = fastitm.score(img, ["a cat"], model=tiny, method="diffusion_classifier", timesteps=[100, 700], seed=4,
                        latent="sample_per_timestep")
    dist = tiny.vae.encode(img * 2 - 1).latent_dist
    emb = tiny.text_encoder(tiny.tokenizer(["a cat"], padding="max_length", max_length=77,
                                           return_tensors="pt").input_ids)[0]
    errs = []
    for k, t in enumerate([100, 700]):
        eps = torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(cell_seed(4, 0, k)))
        z = (dist.mean + dist.std * eps) * tiny.vae.config.scaling_factor
        abar = tiny.scheduler.alphas_cumprod[t]
        noise = res.plan.noise[k : k + 1]
        x = abar.sqrt() * z + (1 - abar).sqrt() * noise
        pred = tiny.unet(x, torch.tensor([t]), encoder_hidden_states=emb).sample
        errs.append(((pred - noise) ** 2).mean())
    assert_close(res.matrix[0, 0], -torch.stack(errs).mean(), rtol=1e-5, atol=1e-7)
    assert cell_seed(4, 0, 0) != cell_seed(4, 0, 1) != cell_seed(4, 1, 0)


@pytest.mark.parametrize("method", fastitm.METHODS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_equals_reference_under_every_preset(tiny, method, backend):
    imgs = [_pil(20, 14, seed=1), _pil(16, 16, seed=2), _pil(12, 18, seed=3)]
    for preset in (None, "published"):
        res = fastitm.score(imgs, TEXTS, model=tiny, method=method, preset=preset, timesteps=3, seed=5,
                            batch_size=5, backend=backend)
        ref = fastitm.reference.score(imgs, TEXTS, model=tiny, method=method, preset=preset, plan=res.plan)
        scale = 20.0 if method == "diffusion_itm" or preset else 1.0
        assert_close(res.matrix, ref.matrix, rtol=1e-5, atol=1e-6 * scale, name=f"{method} {preset}")
        assert res.preset == ref.preset == preset and res.choices == ref.choices


def test_mixed_term_through_triton(triton_interpret, tiny):
    imgs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    res = fastitm.score(imgs, TEXTS[:3], model=tiny, method="discffusion", preset="published", timesteps=2,
                        batch_size=3, backend="triton")
    ref = fastitm.reference.score(imgs, TEXTS[:3], model=tiny, method="discffusion", preset="published",
                                  plan=res.plan)
    assert res.backend == "triton"
    assert_close(res.matrix, ref.matrix, rtol=1e-5, atol=2e-5)


def test_preset_choices_and_explicit_overrides(tiny):
    img = torch.rand(1, 3, 16, 16)
    res = fastitm.score(img, ["a"], model=tiny, method="discffusion", preset="published", timesteps=2)
    assert res.choices == {"resize": "squash_pil", "latent": "sample_per_timestep", "scheme": "discffusion",
                           "noise": "per_timestep"}
    assert res.options["layers"] == "published" and res.options["mix_uncond"] and res.options["denoise"]
    assert res.plan.timesteps.tolist() == [489, 989]
    over = fastitm.score(img, ["a"], model=tiny, method="discffusion", preset="published", timesteps=2,
                         latent="mean", layers="all")
    assert over.choices["latent"] == "mean" and over.options["layers"] == "all"
    assert over.options["mix_uncond"] and over.to_json()["preset"] == "published"
    dc = fastitm.score(img, ["a"], model=tiny, method="diffusion_classifier", preset="published", timesteps=2)
    assert dc.choices["resize"] == "center_crop" and dc.plan.timesteps.tolist() == [250, 750]
    assert fastitm.score(img, ["a"], model=tiny, timesteps=2).preset is None
    with pytest.raises(ValueError, match="unknown preset"):
        fastitm.score(img, ["a"], model=tiny, preset="paper")


def _published_discffusion(model, images, texts, timesteps, noise):
    """Discffusion's published score, rebuilt from its description: for each (image, text) a batch of
    [empty prompt; text] rows at t = 999 - g; in the last block with cross-attention of each of down,
    mid and up, every attention's last transformer block's attn2 gives the mean over the batch, heads
    and pixels of LogSumExp over keys of the logits; the attention term is the mean over those layers;
    plus ||eps - pred_empty|| - ||eps - pred_text||; averaged over timesteps. Posterior-mean latents."""
    unet = model.unet
    chosen = []
    for stage in (unet.down_blocks, [unet.mid_block], unet.up_blocks):
        last = [b for b in stage if getattr(b, "has_cross_attention", False)][-1]
        chosen += [a.transformer_blocks[-1].attn2 for a in last.attentions]
    means = []

    def hook(attn, args, kwargs):
        h, enc = args[0], kwargs["encoder_hidden_states"]
        q, k = attn.to_q(h), attn.to_k(enc)
        b, heads = q.shape[0], attn.heads
        q = q.reshape(b, -1, heads, q.shape[-1] // heads).permute(0, 2, 1, 3)
        k = k.reshape(b, -1, heads, k.shape[-1] // heads).permute(0, 2, 1, 3)
        logits = q @ k.transpose(-1, -2) * attn.scale
        means.append(torch.logsumexp(logits, dim=-1).mean())

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in chosen]
    tok = model.tokenizer

    def embed(t):
        return model.text_encoder(tok([t], padding="max_length", max_length=tok.model_max_length,
                                      return_tensors="pt").input_ids)[0]

    out = torch.zeros(len(images), len(texts), dtype=torch.float64)
    try:
        for i, img in enumerate(images):
            z = model.vae.encode(img[None] * 2 - 1).latent_dist.mean * model.vae.config.scaling_factor
            for j, text in enumerate(texts):
                cond = torch.cat([embed(""), embed(text)])
                total = 0.0
                for n, t in enumerate(timesteps):
                    abar = model.scheduler.alphas_cumprod[t]
                    x = abar.sqrt() * z + (1 - abar).sqrt() * noise[n : n + 1]
                    means.clear()
                    pred = unet(torch.cat([x, x]), torch.tensor([t, t]), encoder_hidden_states=cond).sample
                    ascore = sum(means) / len(means)
                    e_u = (noise[n] - pred[0]).flatten().norm()
                    e_c = (noise[n] - pred[1]).flatten().norm()
                    total += float(ascore + e_u - e_c)
                out[i, j] = total / len(timesteps)
    finally:
        for h in handles:
            h.remove()
    return out


@torch.no_grad()
def test_discffusion_published_equals_an_independent_rebuild_on_the_embedded_model():
    from fastitm import data

    model = fastitm.load_model()
    examples = data.make_dataset(2, "heldout", seed=3, size=model.resolution)
    images = torch.stack([_pixels(e.image) * 0.5 + 0.5 for e in examples])
    texts = [examples[0].caption, examples[1].caption, next(iter(examples[0].negatives.values()))]
    res = fastitm.score(images, texts, model=model, method="discffusion", preset="published", latent="mean",
                        timesteps=4, seed=11)
    ts = [999 - g for g in range(10, 990, 1000 // 4)][::-1]
    assert res.plan.timesteps.tolist() == ts
    want = _published_discffusion(model, images, texts, ts, res.plan.noise)
    assert_close(res.matrix.double(), want, rtol=1e-5, atol=1e-6)
    # And the fastitm default (all layers, no mixing, no denoising) is a different number.
    plain = fastitm.score(images, texts, model=model, method="discffusion", plan=res.plan)
    assert (plain.matrix.double() - want).abs().max() > 1e-3


def test_grid_count_that_runs_more_timesteps_warns(tiny):
    with pytest.warns(UserWarning, match="gives 980 timesteps, and 980 will run"):
        plan = fastitm.make_plan(tiny, 501)
    assert len(plan) == 980
    for T in (334, 500):
        with pytest.warns(UserWarning, match="gives 490 timesteps, and 490 will run"):
            assert len(fastitm.make_plan(tiny, T)) == 490
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(fastitm.make_plan(tiny, 100)) == 98  # fewer than asked: the published T=100, no warning
