"""Latent Consistency Models: an LCM-distilled SD UNet (``time_cond_proj_dim``) scores with every method,
its guidance embedding computed as diffusers' LatentConsistencyModelPipeline does and recorded; a LoRA
in diffusers' file format (an LCM-LoRA's ``pytorch_lora_weights.safetensors``) loads onto a plain SD
model. Tiny models built from configs."""

import pytest
import torch

import fastitm
from fastitm import testing
from fastitm.core.inputs import prepare_images
from fastitm.engine.common import encode_images, noisy_latents
from fastitm.models.families.sd import clip_ids
from fastitm.testing import assert_close

IMGS = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
TEXTS = ["a red circle", "a cat"]


@pytest.fixture(scope="module")
def lcm():
    return testing.tiny_model(0, time_cond_proj_dim=16)


def _by_hand(model, w):
    """Diffusion Classifier's per-timestep scores computed here: the UNet called with the embedding
    diffusers' LCM pipeline makes for guidance scale w (get_guidance_scale_embedding(w - 1))."""
    from diffusers import LatentConsistencyModelPipeline

    plan = fastitm.make_plan(model, 3, seed=0)
    z = encode_images(model, prepare_images(IMGS, model.resolution, "squash"), plan)
    emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor([w - 1.0]), embedding_dim=16)
    hidden = model.text_encoder(clip_ids(model.tokenizer, TEXTS))[0]
    out = torch.zeros(2, 2, 3)
    with torch.no_grad():
        for i in range(2):
            for j in range(2):
                for k in range(3):
                    t = plan.timesteps[k : k + 1]
                    noise = plan.noise[k : k + 1]
                    x = noisy_latents(model, z[i : i + 1], noise, t)
                    pred = model.unet(x, t, encoder_hidden_states=hidden[j : j + 1], timestep_cond=emb).sample
                    out[i, j, k] = -((pred - noise) ** 2).mean()
    return out


def test_lcm_unet_takes_the_guidance_embedding_and_records_it(lcm):
    got = fastitm.score(IMGS, TEXTS, model=lcm, method="diffusion_classifier", timesteps=3, seed=0)
    assert_close(got.per_timestep, _by_hand(lcm, 8.5), rtol=1e-5, atol=1e-6)
    assert lcm.describe()["lcm_guidance_scale"] == 8.5
    lcm.guidance_scale = 2.0
    try:
        other = fastitm.score(IMGS, TEXTS, model=lcm, method="diffusion_classifier", timesteps=3, seed=0)
        assert_close(other.per_timestep, _by_hand(lcm, 2.0), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(other.matrix, got.matrix) and lcm.describe()["lcm_guidance_scale"] == 2.0
    finally:
        lcm.guidance_scale = None
    assert "lcm_guidance_scale" not in testing.tiny_model(0).describe()


@pytest.mark.parametrize("method", ["diffusion_itm", "diffusion_classifier", "discffusion"])
def test_lcm_scores_with_every_method_as_the_reference(lcm, method):
    fast = fastitm.score(IMGS, TEXTS, model=lcm, method=method, timesteps=2, seed=1)
    ref = fastitm.reference.score(IMGS, TEXTS, model=lcm, method=method, timesteps=2, seed=1)
    assert_close(fast.matrix, ref.matrix, rtol=1e-5, atol=2e-5, name=method)


def _diffusers_lora(folder):
    """A LoRA for the tiny SD model, saved by diffusers' save_lora_weights, and the adapted UNet it holds."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    adapted = testing.tiny_model(0)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        adapted.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                            init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(adapted.unet))
    return adapted


def test_diffusers_format_lora_loads_onto_a_plain_model(tiny_dir, tmp_path):
    folder = tmp_path / "lcm-lora"
    adapted = _diffusers_lora(folder)
    want = fastitm.score(IMGS, TEXTS, model=adapted, timesteps=2, seed=0).matrix  # the adapter, unmerged
    for lora in (folder, folder / "pytorch_lora_weights.safetensors"):
        model = fastitm.load_model(tiny_dir, lora=lora)
        assert model.source.endswith(f"lora:{folder / 'pytorch_lora_weights.safetensors'}")
        assert_close(fastitm.score(IMGS, TEXTS, model=model, timesteps=2, seed=0).matrix, want, rtol=1e-5, atol=2e-5)
    plain = fastitm.score(IMGS, TEXTS, model=fastitm.load_model(tiny_dir), timesteps=2, seed=0).matrix
    assert not torch.allclose(plain, want)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a LoRA file diffusers can read"):
        fastitm.load_model(tiny_dir, lora=bad)


def test_lcm_folder_round_trip(lcm, tmp_path):
    lcm.save(tmp_path / "lcm")
    loaded = fastitm.load_model(tmp_path / "lcm")
    assert loaded.unet.config.time_cond_proj_dim == 16
    a = fastitm.score(IMGS, TEXTS, model=lcm, timesteps=2, seed=0).matrix
    assert_close(fastitm.score(IMGS, TEXTS, model=loaded, timesteps=2, seed=0).matrix, a, rtol=1e-5, atol=2e-5)
