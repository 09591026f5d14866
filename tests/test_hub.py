"""Models by Hugging Face hub id, offline: a tiny model laid out in the hub cache's layout
(models--org--name/snapshots/<commit>/, refs/main) loads by id and scores as the folder does; an id
that is neither a folder nor cached names the cache and how to download; a folder wins over an id.
And loaded pipeline objects, whose modules are shared."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fastitm
from fastitm.cli import main

REPO, COMMIT = "fastitm-test/tiny-sd", "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def cache(tiny_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    root = tmp_path / "hub"
    repo = root / f"models--{REPO.replace('/', '--')}"
    shutil.copytree(tiny_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))  # as HF_HOME / HF_HUB_CACHE would set it
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1: no network is tried
    return root


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_every_family_loads_by_id(family, tmp_path, monkeypatch):
    """SDXL and SD 3 folders laid out in the cache load by id too, their family recognised."""
    from huggingface_hub import constants

    build = {"sdxl": fastitm.testing.tiny_sdxl_model, "sd3": fastitm.testing.tiny_sd3_model}[family]
    root, repo = tmp_path / "hub", f"fastitm-test/tiny-{family}"
    snap = root / f"models--{repo.replace('/', '--')}" / "snapshots" / COMMIT
    build(seed=0).save(snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    m = fastitm.load_model(repo, local_files_only=True)
    assert m.family == family and m.source == repo


def test_a_cached_id_loads_and_scores_as_its_folder(cache, tiny_dir, capsys):
    by_id = fastitm.load_model(REPO)
    assert by_id.source == REPO and by_id.family == "sd"
    imgs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    texts = ["a red circle", "a cat"]
    got = fastitm.score(imgs, texts, model=by_id, timesteps=2, seed=0).matrix
    want = fastitm.score(imgs, texts, model=fastitm.load_model(tiny_dir), timesteps=2, seed=0).matrix
    assert torch.equal(got, want)
    assert fastitm.load_model(REPO, cache_dir=cache, revision=COMMIT).source == f"{REPO}@{COMMIT}"
    assert main(["info", "--model", REPO, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "sd"


def test_an_id_not_cached_names_the_cache_and_the_way_out(cache):
    with pytest.raises(FileNotFoundError, match=rf"org/missing: not a folder, and not in the Hugging Face cache "
                                               rf"\({cache}\); offline .*`hf download org/missing`"):
        fastitm.load_model("org/missing")
    with pytest.raises(FileNotFoundError, match="has no revision|not in the Hugging Face cache"):
        fastitm.load_model(REPO, revision="v9")


def test_a_folder_named_like_an_id_is_the_folder(cache, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_dir, tmp_path / REPO)
    from fastitm.models.hub import resolve

    assert resolve(REPO) == Path(REPO)  # the folder under the working directory, not the cached snapshot
    assert fastitm.load_model(REPO).source == REPO


def test_a_pipeline_object_scores_as_its_folder(tiny_dir):
    """A loaded StableDiffusionPipeline (and an SDXL one) built from tiny components: load_model takes it,
    shares its modules (no copy), and scores as the same components loaded from their folder."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = fastitm.load_model(tiny_dir)
    pipe = StableDiffusionPipeline(vae=folder.vae, text_encoder=folder.text_encoder, tokenizer=folder.tokenizer,
                                   unet=folder.unet, scheduler=folder.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    model = fastitm.load_model(pipe)
    assert model.unet is pipe.unet and model.family == "sd" and model.source.startswith("StableDiffusionPipeline")
    imgs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    texts = ["a red circle", "a cat", "green"]
    got = fastitm.score(imgs, texts, model=model, timesteps=2, seed=0).matrix
    assert torch.equal(got, fastitm.score(imgs, texts, model=fastitm.load_model(tiny_dir), timesteps=2, seed=0).matrix)
    xl = fastitm.testing.tiny_sdxl_model(seed=1)
    pipe_xl = StableDiffusionXLPipeline(vae=xl.vae, text_encoder=xl.text_encoder,
                                        text_encoder_2=xl.part("text_encoder_2"), tokenizer=xl.tokenizer,
                                        tokenizer_2=xl.part("tokenizer_2"), unet=xl.unet, scheduler=xl.scheduler)
    m = fastitm.load_model(pipe_xl)
    assert m.family == "sdxl" and m.part("text_encoder_2") is xl.part("text_encoder_2")
    got = fastitm.score(imgs, texts, model=m, timesteps=2, seed=0).matrix
    assert torch.equal(got, fastitm.score(imgs, texts, model=xl, timesteps=2, seed=0).matrix)

    class NotAPipeline:
        components = {}

    with pytest.raises(fastitm.models.model.ModelError, match="a NotAPipeline is not a pipeline fastitm scores"):
        fastitm.load_model(NotAPipeline())


@pytest.mark.parametrize("error, match", [
    ("GatedRepoError", r"org/gated is a gated repository: accept its terms on https://huggingface.co/org/gated and "
                       r"log in \(`hf auth login`, or set HF_TOKEN\)"),
    ("RepositoryNotFoundError", r"org/gated: no such model folder, and no such repository .*private: log in"),
])
def test_hub_refusals_say_what_to_do(error, match, monkeypatch):
    # What the hub answers for a gated or unknown repository (no network here: the download raises as
    # huggingface_hub does on a 401 or 404), and what the user is told.
    import huggingface_hub
    from huggingface_hub import errors

    def refuse(*a, **k):
        raise getattr(errors, error)("401 Client Error", response=SimpleNamespace(headers={}, request=None))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises((PermissionError, FileNotFoundError), match=match):
        fastitm.load_model("org/gated")


def test_a_pipeline_is_left_as_it_was(tmp_path):
    """load_model(pipe, lora=...) puts the adapter on a copy of the denoiser (the caller's UNet keeps its
    layers and weights) and scores as the folder with the adapter; another dtype or device is refused,
    naming what to do, instead of casting the caller's modules."""
    from importlib.resources import files

    from diffusers import StableDiffusionPipeline

    base = fastitm.load_model()
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=base.unet, scheduler=base.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    modules = [type(m).__name__ for m in pipe.unet.modules()]
    adapter = files("fastitm") / "assets" / "adapters" / "hardneg"
    tuned = fastitm.load_model(pipe, lora=adapter)
    assert tuned.unet is not pipe.unet and tuned.vae is pipe.vae
    assert [type(m).__name__ for m in pipe.unet.modules()] == modules  # no LoRA layers on the caller's UNet
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    imgs = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    texts = ["a red circle", "a blue square"]
    got = fastitm.score(imgs, texts, model=tuned, timesteps=2, seed=0).matrix
    want = fastitm.score(imgs, texts, model=fastitm.load_model(lora=adapter), timesteps=2, seed=0).matrix
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    plain = fastitm.score(imgs, texts, model=fastitm.load_model(pipe), timesteps=2, seed=0).matrix
    assert not torch.allclose(plain, got)  # the adapter did change the scores, and only the copy's
    with pytest.raises(fastitm.models.model.ModelError, match=r"would cast or move the pipeline's own modules .*pipe\.to\("):
        fastitm.load_model(pipe, dtype="bf16")
    assert pipe.unet.dtype == torch.float32


def test_pipelines_built_on_our_models_find_no_outdated_scheduler():
    """The embedded and tiny models' schedulers carry SD's own clip_sample=False and steps_offset=1, so a
    diffusers pipeline built on them has nothing to warn about; the diffusers defaults (the configs
    before) do make it warn, so the check can fail."""
    import warnings

    from diffusers import DDPMScheduler, StableDiffusionPipeline

    def build(m, scheduler):
        return StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)

    for m in (fastitm.load_model(), fastitm.testing.tiny_model(seed=0)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            build(m, m.scheduler)
    with pytest.warns(FutureWarning, match="steps_offset"):
        build(m, DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                               beta_schedule="scaled_linear"))
