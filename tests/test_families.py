"""Model families: SD 1.x/2.x (epsilon and v), SDXL and SD 3 (flow matching).

Each family's tiny random architecture is scored by the engine and by the reference on the same
plan; its text conditioning is checked against the diffusers pipeline's own ``encode_prompt``; one
score per family is rebuilt by hand from direct diffusers calls; the full-size architectures have
the published parameter counts; saved folders load through the CLI.
"""

import json

import pytest
import torch

import fastitm
import fastitm.cli
import fastitm.finetune
from fastitm import testing
from fastitm.models.families import ModelError, detect
from fastitm.models.families.architectures import build_denoiser, parameter_count
from fastitm.testing import assert_close

TEXTS = ["a red dog", "a blue circle left of a cat", "green", "the small yellow square above a triangle"]


def _images(n=3, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


BUILDERS = {
    "sd-eps": lambda: testing.tiny_model(seed=3),
    "sd-v": lambda: testing.tiny_model(seed=3, prediction_type="v_prediction"),
    "sdxl": lambda: testing.tiny_sdxl_model(seed=3),
    "sdxl-encoded-empty": lambda: testing.tiny_sdxl_model(seed=3, force_zeros_for_empty_prompt=False),
    "sd3": lambda: testing.tiny_sd3_model(seed=3),
    "sd3-no-t5": lambda: testing.tiny_sd3_model(seed=3, t5=False),
}
_CACHE: dict = {}


def model_of(name):
    if name not in _CACHE:
        _CACHE[name] = BUILDERS[name]()
    return _CACHE[name]


def _wanted(name, method, opts):
    if name.startswith("sd3") and method == "discffusion":
        return False  # refused (a test below)
    if name == "sd-eps":  # tests/test_engine.py covers SD epsilon models method by method
        return method == "diffusion_itm"
    if name == "sdxl-encoded-empty":  # only the empty prompt differs: the methods that use it
        return method == "diffusion_itm" or opts.get("denoise")
    return True


CASES = [(name, method, opts) for name in BUILDERS for method, opts in (
    ("diffusion_itm", {}), ("diffusion_classifier", {}), ("diffusion_classifier", {"elimination": [(2, 2)]}),
    ("discffusion", {"denoise": True}), ("discffusion", {"preset": "published"}),
) if _wanted(name, method, opts)]


# The backends take turns (each family meets both): the ops themselves are checked backend by backend
# in tests/test_ops*.py and on SD method by method in tests/test_engine.py; here the family's wiring.
FAMILY_CASES = [(*case, ("native", "reference")[n % 2]) for n, case in enumerate(CASES)]


@pytest.mark.parametrize("name,method,opts,backend", FAMILY_CASES,
                         ids=[f"{b}-{n}-{m}-{'-'.join(o)}" for n, m, o, b in FAMILY_CASES])
def test_engine_equals_reference_for_every_family(name, method, opts, backend):
    model = model_of(name)
    imgs = _images()
    res = fastitm.score(imgs, TEXTS, model=model, method=method, timesteps=4, seed=5, batch_size=5, backend=backend,
                        **opts)
    ref = fastitm.reference.score(imgs, TEXTS, model=model, method=method, plan=res.plan, **opts)
    assert res.family == ref.family == model.family and res.plan.family == model.family
    assert torch.equal(res.matrix.isinf(), ref.matrix.isinf())
    fin = ref.matrix.isfinite()
    assert fin.sum() >= 6
    # diffusion_itm subtracts two L2 errors of size ~10: the tolerance is relative to those terms.
    scale = 20.0 if method == "diffusion_itm" else 1.0
    assert_close(res.matrix[fin], ref.matrix[fin], rtol=1e-5, atol=1e-6 * scale, name=f"{name} {method}")
    # the scores are not all alike (a family wired wrong often makes the text irrelevant)
    assert ref.matrix[fin].std() > 1e-6


def test_sdxl_fused_attention_through_triton(triton_interpret):
    model = model_of("sdxl")
    imgs = _images(2)
    res = fastitm.score(imgs, TEXTS[:3], model=model, method="discffusion", timesteps=2, seed=1, backend="triton")
    ref = fastitm.reference.score(imgs, TEXTS[:3], model=model, method="discffusion", plan=res.plan)
    assert res.backend == "triton"
    assert_close(res.matrix, ref.matrix, rtol=1e-5, atol=1e-5)


# -- conditioning, against the diffusers pipelines themselves ------------------------------------------------

def test_sdxl_conditioning_is_the_pipelines(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    for zeros in (True, False):
        model = testing.tiny_sdxl_model(seed=1, force_zeros_for_empty_prompt=zeros)
        pipe = StableDiffusionXLPipeline(vae=model.vae, text_encoder=model.text_encoder,
                                         text_encoder_2=model.part("text_encoder_2"), tokenizer=model.tokenizer,
                                         tokenizer_2=model.part("tokenizer_2"), unet=model.unet,
                                         scheduler=model.scheduler, force_zeros_for_empty_prompt=zeros)
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(TEXTS, device="cpu", do_classifier_free_guidance=True)
        cond = model.spec.encode(model, TEXTS)
        empty = model.spec.encode_empty(model)
        assert_close(cond["hidden"], emb, rtol=0, atol=0, name="hidden")
        assert_close(cond["pooled"], pooled, rtol=0, atol=0, name="pooled")
        # the pipeline encodes one "" per prompt (a batch of 4, we encode 1): rounding may differ
        assert_close(empty["hidden"], neg[:1], rtol=1e-6, atol=1e-6, name="empty hidden")
        assert_close(empty["pooled"], neg_pooled[:1], rtol=1e-6, atol=1e-6, name="empty pooled")
        assert bool((empty["hidden"] == 0).all()) == zeros
        r = model.resolution
        ids = pipe._get_add_time_ids((r, r), (0, 0), (r, r), dtype=torch.float32,
                                     text_encoder_projection_dim=model.part("text_encoder_2").config.projection_dim)
        assert_close(cond["time_ids"], ids.expand(len(TEXTS), 6), rtol=0, atol=0, name="time ids")


@pytest.mark.parametrize("t5", [True, False])
def test_sd3_conditioning_is_the_pipelines(t5):
    from diffusers import StableDiffusion3Pipeline

    model = testing.tiny_sd3_model(seed=1, t5=t5)
    pipe = StableDiffusion3Pipeline(transformer=model.unet, scheduler=model.scheduler, vae=model.vae,
                                    text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                    text_encoder_2=model.part("text_encoder_2"), tokenizer_2=model.part("tokenizer_2"),
                                    text_encoder_3=model.part("text_encoder_3"), tokenizer_3=model.part("tokenizer_3"))
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(TEXTS, None, None, device="cpu", do_classifier_free_guidance=True)
    cond = model.spec.encode(model, TEXTS)
    empty = model.spec.encode_empty(model)
    assert cond["hidden"].shape == (len(TEXTS), 77 + 256, 64)
    assert_close(cond["hidden"], emb, rtol=0, atol=0, name="hidden")
    assert_close(cond["pooled"], pooled, rtol=0, atol=0, name="pooled")
    assert_close(empty["hidden"], neg[:1], rtol=1e-6, atol=1e-6, name="empty hidden")
    assert_close(empty["pooled"], neg_pooled[:1], rtol=1e-6, atol=1e-6, name="empty pooled")


def test_flow_noising_is_the_schedulers_at_unshifted_sigma():
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = model_of("sd3")
    z, eps = torch.randn(3, 8, 8, 8), torch.randn(3, 8, 8, 8)
    t = torch.tensor([100, 500, 900])
    x = fastitm.engine.common.noisy_latents(model, z, eps, t)
    # With shift 1 the scheduler's training timesteps are 1..1000 with sigma = t / 1000.
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    for r in range(3):
        want = sched.scale_noise(z[r : r + 1], t[r : r + 1].float(), eps[r : r + 1])
        assert_close(x[r : r + 1], want, rtol=1e-6, atol=1e-6, name=f"t={int(t[r])}")
    assert_close(fastitm.engine.common.target(model, z, eps, t), eps - z, rtol=0, atol=0)


# -- one score rebuilt by hand from diffusers calls -------------------------------------------------------------

def _latent(model, img):
    dist = model.vae.encode(img * 2 - 1).latent_dist
    shift = model.vae.config.shift_factor or 0.0
    return (dist.mean - shift) * model.vae.config.scaling_factor


@torch.no_grad()
def test_sd3_diffusion_itm_by_hand():
    from diffusers import StableDiffusion3Pipeline

    model = model_of("sd3")
    img = _images(1, seed=4)
    res = fastitm.reference.score(img, TEXTS[:2], model=model, method="diffusion_itm", timesteps=3, seed=2)
    pipe = StableDiffusion3Pipeline(transformer=model.unet, scheduler=model.scheduler, vae=model.vae,
                                    text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                    text_encoder_2=model.part("text_encoder_2"), tokenizer_2=model.part("tokenizer_2"),
                                    text_encoder_3=model.part("text_encoder_3"), tokenizer_3=model.part("tokenizer_3"))
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(TEXTS[:2], None, None, device="cpu")
    z = _latent(model, img)
    for k, t in enumerate(res.plan.timesteps.tolist()):
        sigma = t / 1000
        eps = res.plan.noise[k : k + 1]
        x = (1 - sigma) * z + sigma * eps
        ts = torch.tensor([float(t)])
        u = model.unet(hidden_states=x, timestep=ts, encoder_hidden_states=neg[:1], pooled_projections=neg_pooled[:1]).sample
        e_u = (u - (eps - z)).norm()
        for j in range(2):
            c = model.unet(hidden_states=x, timestep=ts, encoder_hidden_states=emb[j : j + 1],
                           pooled_projections=pooled[j : j + 1]).sample
            want = -((c - (eps - z)).norm() - e_u)
            # a difference of two L2 errors of size ~10: tolerance relative to those
            assert_close(res.per_timestep[0, j, k], want, rtol=1e-5, atol=2e-5, name=f"text {j} t={t}")


@torch.no_grad()
def test_sdxl_diffusion_classifier_by_hand():
    model = model_of("sdxl")
    img = _images(1, seed=6)
    res = fastitm.reference.score(img, TEXTS[:2], model=model, method="diffusion_classifier", timesteps=3, seed=2)
    z = _latent(model, img)
    te1, te2 = model.text_encoder, model.part("text_encoder_2")
    for j in range(2):
        ids1 = model.tokenizer([TEXTS[j]], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        ids2 = model.part("tokenizer_2")([TEXTS[j]], padding="max_length", max_length=77, truncation=True,
                                         return_tensors="pt").input_ids
        o1, o2 = te1(ids1, output_hidden_states=True), te2(ids2, output_hidden_states=True)
        hidden = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
        added = {"text_embeds": o2.text_embeds, "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])}
        for k, t in enumerate(res.plan.timesteps.tolist()):
            abar = model.scheduler.alphas_cumprod[t]
            eps = res.plan.noise[k : k + 1]
            x = abar.sqrt() * z + (1 - abar).sqrt() * eps
            pred = model.unet(x, torch.tensor([t]), encoder_hidden_states=hidden, added_cond_kwargs=added).sample
            assert_close(res.per_timestep[0, j, k], -(pred - eps).pow(2).mean(), rtol=1e-5, atol=1e-7,
                         name=f"text {j} t={t}")


def test_v_prediction_target_is_the_velocity():
    model = model_of("sd-v")
    z, eps, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([50, 700])
    abar = model.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert_close(fastitm.engine.common.target(model, z, eps, t), abar.sqrt() * eps - (1 - abar).sqrt() * z, rtol=1e-5,
                 atol=1e-6)
    assert not model.spec.target_is_noise(model) and model_of("sd-eps").spec.target_is_noise(model_of("sd-eps"))


# -- full-size architectures ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,count", [("sd15", 859_520_964), ("sd21", 865_910_724), ("sd21_base", 865_910_724),
                                        ("sdxl", 2_567_463_684)])
def test_published_unet_parameter_counts(name, count):
    net = build_denoiser(name)
    assert next(net.parameters()).device.type == "meta"
    assert parameter_count(net) == count


def test_sd3_medium_transformer_parameter_count():
    net = build_denoiser("sd3_medium")
    # Stability AI's model card: "2 billion parameters"; the released transformer has 2.028 B.
    assert abs(parameter_count(net) - 2.028e9) < 0.001e9
    assert net.config.joint_attention_dim == 4096 and len(net.transformer_blocks) == 24


def test_sdxl_full_size_unet_takes_sdxl_conditioning():
    # The SDXL family's checks accept the released SDXL UNet config with its encoders' widths.
    net = build_denoiser("sdxl")
    assert net.config.cross_attention_dim == 768 + 1280
    assert net.add_embedding.linear_1.in_features == 6 * 256 + 1280


# -- folders, detection, CLI ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name in ("sd-v", "sdxl", "sd3", "sd3-no-t5"):
        out[name] = model_of(name).save(root / name)
    return out


@pytest.mark.parametrize("name", ["sd-v", "sdxl", "sd3", "sd3-no-t5"])
def test_saved_folder_loads_and_scores_the_same(saved, name, tmp_path, capsys):
    from PIL import Image

    model = fastitm.load_model(saved[name])
    assert model.family == model_of(name).family and model.prediction == model_of(name).prediction
    paths = []
    for i, img in enumerate(_images(2, seed=9)):
        p = tmp_path / f"{i}.png"
        Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy()).save(p)
        paths.append(str(p))
    out = tmp_path / "res.json"
    rc = fastitm.cli.main(["score", "--model", str(saved[name]), "--images", *paths, "--texts", *TEXTS[:3],
                           "--timesteps", "3", "--no-progress", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert model.spec.label in printed
    data = json.loads(out.read_text())
    assert data["family"] == model.family and data["plan"]["family"] == model.family
    direct = fastitm.score(paths, TEXTS[:3], model=model_of(name), timesteps=3, progress=False)
    # the loaded model's convolutions are channels-last on the CPU, the built one's are not: the same
    # values summed in another order, and a DiffusionITM score is a difference of errors of about 1
    assert_close(torch.tensor(data["matrix"]), direct.matrix, rtol=1e-5, atol=1e-5)


def test_info_describes_a_folder_without_loading_weights(saved, capsys):
    rc = fastitm.cli.main(["info", "--model", str(saved["sd3"]), "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    model = model_of("sd3")
    assert d["family"] == "sd3" and d["prediction"] == "flow" and d["methods"] == ["diffusion_itm", "diffusion_classifier"]
    assert d["components"]["transformer"] == "SD3Transformer2DModel"
    assert d["parameters"]["transformer"] == parameter_count(model.unet)
    assert d["parameters"]["text_encoder_3"] == parameter_count(model.part("text_encoder_3"))
    rc = fastitm.cli.main(["info", "--model", str(saved["sdxl"])])
    text = capsys.readouterr().out
    assert rc == 0 and "family: sdxl" in text and "text_encoder_2" in text and "discffusion" in text


def test_unknown_pipeline_is_named(saved, tmp_path):
    import shutil

    path = tmp_path / "m"
    shutil.copytree(saved["sdxl"], path)
    index = json.loads((path / "model_index.json").read_text())
    index["_class_name"] = "FluxPipeline"
    (path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match=r"FluxPipeline.*StableDiffusionXLPipeline.*StableDiffusion3Pipeline"):
        fastitm.load_model(path)


def test_sdxl_folder_missing_second_encoder(saved, tmp_path):
    import shutil

    path = tmp_path / "m"
    shutil.copytree(saved["sdxl"], path)
    shutil.rmtree(path / "text_encoder_2")
    with pytest.raises(ModelError, match=r"SDXL.*text_encoder_2/ \(folder missing\)"):
        fastitm.load_model(path)


def test_family_from_components_without_model_index(saved, tmp_path):
    import shutil

    for name, family in (("sd3", "sd3"), ("sdxl", "sdxl"), ("sd-v", "sd")):
        path = tmp_path / name
        shutil.copytree(saved[name], path)
        (path / "model_index.json").unlink()
        assert detect(path)[0].name == family


def test_discffusion_on_sd3_is_a_clear_error(saved):
    with pytest.raises(ValueError, match="discffusion.*SD 3.*joint attention"):
        fastitm.score(_images(1), TEXTS[:2], model=model_of("sd3"), method="discffusion", timesteps=2)
    # the CLI says so before reading any weight
    with pytest.raises(ValueError, match="not supported on SD 3"):
        fastitm.cli._load(str(saved["sd3"]), "fp32", "cpu", "discffusion")


def test_plan_of_one_family_is_refused_by_another():
    sd, sdxl = model_of("sd-eps"), model_of("sdxl")
    assert sd.latent_shape == sdxl.latent_shape  # only the family tells the plans apart
    plan = fastitm.make_plan(sd, 3, seed=0)
    assert plan.family == "sd" and plan.describe()["family"] == "sd"
    with pytest.raises(ValueError, match="made for a 'sd' model.*'sdxl'"):
        fastitm.score(_images(1), TEXTS[:2], model=sdxl, plan=plan)


def test_plan_family_survives_save_and_load(tmp_path):
    plan = fastitm.make_plan(model_of("sd3"), 4, seed=1)
    plan.save(tmp_path / "p.pt")
    back = fastitm.Plan.load(tmp_path / "p.pt")
    assert back.family == "sd3" and torch.equal(back.noise, plan.noise)


def test_checkpoint_of_one_family_is_refused_by_another(tmp_path):
    ckpt = tmp_path / "run.pt"
    imgs = _images(1)
    fastitm.score(imgs, TEXTS[:2], model=model_of("sd-eps"), timesteps=2, checkpoint=ckpt)
    with pytest.raises(fastitm.engine.CheckpointError, match="belongs to another run"):
        fastitm.score(imgs, TEXTS[:2], model=model_of("sdxl"), timesteps=2, checkpoint=ckpt)


def test_sdxl_vae_stays_fp32_in_fp16(saved):
    model = fastitm.load_model(saved["sdxl"], dtype="fp16")
    assert model.dtype == torch.float16 and model.vae.dtype == torch.float32
    mean, std = fastitm.engine.common.encode_posterior(model, _images(1) * 2 - 1)
    assert mean.dtype == torch.float16 and torch.isfinite(mean).all()


def test_finetune_refuses_other_families(tmp_path):
    with pytest.raises(ValueError, match="SD 1.x/2.x.*SDXL"):
        fastitm.finetune.finetune("hardneg", "synthetic", out=tmp_path / "a", model=model_of("sdxl"), steps=1)


def test_folder_with_only_fp16_variant_weights_loads(saved, tmp_path):
    """Hub downloads of SDXL / SD 3 often hold only ``*.fp16.safetensors``: they load as they are."""
    import shutil

    path = tmp_path / "m"
    shutil.copytree(saved["sdxl"], path)
    model = model_of("sdxl")
    for name, net in (("unet", model.unet), ("text_encoder_2", model.part("text_encoder_2"))):
        for f in (path / name).glob("*.safetensors"):
            f.unlink()
        net.save_pretrained(path / name, variant="fp16")
        assert any(".fp16." in f.name for f in (path / name).iterdir())
    loaded = fastitm.load_model(path)
    for a, b in zip(loaded.unet.parameters(), model.unet.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(loaded.part("text_encoder_2").parameters(), model.part("text_encoder_2").parameters(), strict=True):
        assert torch.equal(a, b)
