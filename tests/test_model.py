"""Loading models from disk: the happy path and every missing piece named."""

import json
import shutil
import time
import warnings

import pytest
import torch

import fastitm
from fastitm.models.model import ModelError


def test_tiny_model_builds_fast_and_is_seeded():
    fastitm.testing.tiny_model(seed=0)  # first call pays for the diffusers imports
    # CPU seconds of this process, not wall time: `make test` runs other test files beside this one
    # (a 0.08 s build once took 1.02 s of wall time there, waiting for the cores)
    t0 = time.process_time()
    a = fastitm.testing.tiny_model(seed=0)
    assert time.process_time() - t0 < 1.0
    b = fastitm.testing.tiny_model(seed=0)
    c = fastitm.testing.tiny_model(seed=1)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.unet.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert a.latent_shape == (4, 8, 8) and a.resolution == 16
    assert a.tokenizer.model_max_length == 77


def test_load_roundtrip(tiny, tiny_dir):
    m = fastitm.load_model(tiny_dir)
    assert m.latent_shape == tiny.latent_shape and m.resolution == tiny.resolution
    for p, q in zip(tiny.unet.parameters(), m.unet.parameters(), strict=True):
        assert torch.equal(p, q)
    ids = tiny.tokenizer(["a red dog"]).input_ids
    assert m.tokenizer(["a red dog"]).input_ids == ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a CPU without native bf16 says so (tests/test_speed.py)
        h = fastitm.load_model(tiny_dir, dtype="bf16")
    assert h.dtype == torch.bfloat16 and h.text_encoder.dtype == torch.bfloat16


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        fastitm.load_model(tmp_path / "nothing")


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_missing_component(tiny_dir, tmp_path, component):
    path = copy_model(tiny_dir, tmp_path / "m")
    shutil.rmtree(path / component)
    with pytest.raises(ModelError, match=f"missing: {component}/"):
        fastitm.load_model(path)


def test_missing_weights_and_config(tiny_dir, tmp_path):
    path = copy_model(tiny_dir, tmp_path / "m")
    for f in (path / "unet").glob("*.safetensors"):
        f.unlink()
    (path / "vae" / "config.json").unlink()
    with pytest.raises(ModelError, match=r"vae/config.json.*unet/ weights|unet/ weights.*vae/config.json"):
        fastitm.load_model(path)


def test_other_architecture(tiny_dir, tmp_path):
    path = copy_model(tiny_dir, tmp_path / "m")
    cfg = json.loads((path / "unet" / "config.json").read_text())
    cfg["_class_name"] = "UNet2DModel"
    (path / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="UNet2DModel"):
        fastitm.load_model(path)


def test_mismatched_components(tiny):
    other = fastitm.testing.tiny_model(seed=0, cross_attention_dim=48)
    with pytest.raises(ModelError, match="cross_attention_dim=32 does not match"):
        fastitm.Model(tiny.unet, tiny.vae, other.text_encoder, tiny.tokenizer, tiny.scheduler)
    with pytest.raises(ModelError, match="expected AutoencoderKL"):
        fastitm.Model(tiny.unet, tiny.unet, tiny.text_encoder, tiny.tokenizer, tiny.scheduler)


def test_build_without_embedded_model_says_so(monkeypatch, tmp_path, capsys):
    """A build stripped of its assets: load_model() names the way out; the demo falls back to the
    random tiny model and says so."""
    import fastitm.demo
    from fastitm.demo import run_demo

    # where load_model and the demo look it up (each module's own name, so the patch ends with the test)
    monkeypatch.setattr(fastitm.models.model, "embedded_model_path", lambda: None)
    monkeypatch.setattr(fastitm.demo, "embedded_model_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="tiny_model"):
        fastitm.load_model()
    assert run_demo(out_dir=str(tmp_path), timesteps=1, n=8) == 0
    assert "RANDOM-WEIGHT" in capsys.readouterr().out


def test_sd21_base_architecture_matches_published_sizes():
    """The GPU benchmarks' model has SD 2.1-base's architecture: parameter counts of the published
    checkpoint's UNet, VAE and OpenCLIP-H text encoder, 512 px images and 4x64x64 latents."""
    m = fastitm.testing.sd21_base_architecture(device="meta")  # the same construction, without weights
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert (count(m.unet), count(m.vae), count(m.text_encoder)) == (865_910_724, 83_653_863, 340_387_840)
    assert m.latent_shape == (4, 64, 64) and m.resolution == 512
    assert {a.heads for n, a in m.unet.named_modules() if n.endswith("attn2")} == {5, 10, 20}
