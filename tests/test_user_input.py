"""What a new user meets: odd but valid inputs that must work, and bad ones that must fail at once with a
message naming the problem (API and command line)."""

import json
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import fastitm
from fastitm.cli import main
from fastitm.core.inputs import prepare_images
from fastitm.testing import assert_close


def test_sixteen_bit_png_keeps_its_values(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (64, 1))
    p = tmp_path / "gray16.png"
    Image.fromarray(ramp).save(p)
    with Image.open(p) as img:
        assert img.mode.startswith("I")  # PIL holds it as a 16/32-bit integer image
    px = prepare_images([p], 64)[0]  # [-1, 1]
    want = torch.from_numpy(ramp.astype(np.float32) / 65535.0) * 2 - 1
    assert_close(px, want.expand(3, 64, 64), rtol=0, atol=1e-6)
    assert abs(float(px.mean())) < 1e-3  # a 0-1 ramp has mean 0.5, not washed out to white


def test_numpy_arrays_work_like_pil_images_and_tensors():
    g = np.random.default_rng(0)
    u8 = g.integers(0, 256, size=(12, 20, 3), dtype=np.uint8)
    assert torch.equal(prepare_images([u8], 16, "squash_pil"), prepare_images([Image.fromarray(u8)], 16, "squash_pil"))
    assert torch.equal(prepare_images(u8, 16), prepare_images([Image.fromarray(u8)], 16))
    f = g.random((16, 16, 3), dtype=np.float32)
    assert torch.equal(prepare_images([f], 16), torch.from_numpy(f).permute(2, 0, 1)[None] * 2 - 1)
    batch = np.stack([f, f])
    assert prepare_images(batch, 16).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"channels first\?"):
        prepare_images([np.zeros((3, 16, 16), np.float32)], 16)
    with pytest.raises(ValueError, match=r"values in \[2, 2\]; expected \[0, 1\]"):
        prepare_images([np.full((4, 4, 3), 2.0, np.float32)], 16)
    with pytest.raises(TypeError, match="dtype int64"):
        prepare_images([np.zeros((4, 4, 3), np.int64)], 16)


@pytest.mark.parametrize("count", [np.int64(4), torch.tensor(4), np.int32(4)])
def test_integer_like_counts_are_counts(tiny, count):
    assert fastitm.make_plan(tiny, count).timesteps.tolist() == list(range(10, 990, 250))


@pytest.mark.parametrize("kw,exc,match", [
    ({"seed": 2**64}, ValueError, r"seed must lie in \[0, 2\*\*62\]"),
    ({"seed": "abc"}, TypeError, "seed must be an int, got str 'abc'"),
    ({"seed": 1.7}, TypeError, "seed must be an int, got float 1.7"),
    ({"timesteps": ["a"]}, TypeError, "entry 0 is str 'a'"),
    ({"timesteps": [[10, 20], [30, 40]]}, ValueError, "flat list"),
    ({"timesteps": 2.5}, TypeError, "int count or a list of ints, got float 2.5"),
    ({"timesteps": torch.tensor([[1, 2]])}, ValueError, "flat list"),
    ({"method": "discffusion", "lam": 1e39, "pool": "probs"}, ValueError, "'lam' .* at most 1e\\+30"),
    ({"method": "discffusion", "lam": float("inf")}, ValueError, "positive finite"),
    ({"noise": "fresh"}, ValueError, "unknown noise mode"),
    ({"latent": "sampled"}, ValueError, "unknown latent mode"),
])
def test_bad_arguments_are_named(tiny, kw, exc, match):
    with pytest.raises(exc, match=match):
        fastitm.score(torch.rand(1, 3, 16, 16), ["a"], model=tiny, **kw)


def test_image_messages(tmp_path, tiny):
    with pytest.raises(ValueError, match="is a folder, not an image file"):
        fastitm.score([tmp_path], ["a"], model=tiny)
    with pytest.raises(FileNotFoundError, match="image file not found"):
        fastitm.score([tmp_path / "nope.png"], ["a"], model=tiny)
    with pytest.raises(ValueError, match="meta device"):
        fastitm.score(torch.empty(1, 3, 16, 16, device="meta"), ["a"], model=tiny)


def test_bad_arguments_fail_before_the_embedded_model_loads(monkeypatch):
    import fastitm.engine.common

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(fastitm.engine.common, "load_model", no_loading)  # where score's check loads it
    img = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="the text list is empty"):
        fastitm.score(img, [])
    with pytest.raises(ValueError, match="unknown method"):
        fastitm.score(img, ["a"], method="clip")
    with pytest.raises(ValueError, match="unknown backend"):
        fastitm.score(img, ["a"], backend="gpu")
    with pytest.raises(FileNotFoundError, match="not found"):
        fastitm.score(["missing.png"], ["a"])
    with pytest.raises(TypeError, match="seed"):
        fastitm.score(img, ["a"], seed="x")


def test_nan_scores_are_never_silent(tiny):
    import copy

    broken = copy.deepcopy(tiny)
    with torch.no_grad():
        broken.unet.conv_out.bias[0] = float("nan")
    with pytest.warns(RuntimeWarning, match="2 of 2 scores are NaN"):
        res = fastitm.score(torch.rand(1, 3, 16, 16), ["a", "b"], model=broken, method="diffusion_classifier",
                            timesteps=1)
    assert res.matrix.isnan().all()


def test_checkpoint_of_a_changed_model_is_refused(tiny, tmp_path):
    """A merged LoRA or a fine-tuned layer changes a few attention weights: the old checkpoint must
    not answer for the new model."""
    import copy

    imgs = torch.rand(1, 3, 16, 16)
    ckpt = tmp_path / "run.pt"
    fastitm.score(imgs, ["a", "b"], model=tiny, timesteps=1, checkpoint=str(ckpt))
    tuned = copy.deepcopy(tiny)
    name, weight = [(n, p) for n, p in tuned.unet.named_parameters() if "attn2.to_k" in n][1]
    with torch.no_grad():
        weight[-1, -1] += 1e-3  # one element, away from any sampled prefix
    with pytest.raises(ValueError, match="belongs to another run"):
        fastitm.score(imgs, ["a", "b"], model=tuned, timesteps=1, checkpoint=str(ckpt))
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.lock"))


def test_checkpoint_messages(tiny, tmp_path):
    imgs = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="is a folder; give a file path") as info:
        fastitm.score(imgs, ["a"], model=tiny, timesteps=1, checkpoint=str(tmp_path))
    assert "delete" not in str(info.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x04 not a checkpoint at all")
    with pytest.raises(ValueError, match="is not a fastitm checkpoint") as info:
        fastitm.score(imgs, ["a"], model=tiny, timesteps=1, checkpoint=str(garbage))
    assert "weights_only" not in str(info.value)
    keyless = tmp_path / "keyless.pt"
    torch.save({"per_t": torch.zeros(1)}, keyless)
    with pytest.raises(ValueError, match="missing .*fingerprint"):
        fastitm.score(imgs, ["a"], model=tiny, timesteps=1, checkpoint=str(keyless))


def test_a_checkpoint_in_use_is_refused_naming_the_holder(tiny, tmp_path):
    import os

    from fastitm.engine import CheckpointError, checkpoint_lock

    ckpt = tmp_path / "shared.pt"
    with checkpoint_lock(ckpt):  # another run holds it (a lock is per open file, so this stands in)
        with pytest.raises(CheckpointError, match=f"in use by another run \\(process {os.getpid()}\\)"):
            fastitm.score(torch.rand(1, 3, 16, 16), ["a"], model=tiny, timesteps=1, checkpoint=str(ckpt))
    res = fastitm.score(torch.rand(1, 3, 16, 16), ["a"], model=tiny, timesteps=1, checkpoint=str(ckpt))
    assert ckpt.exists() and res.stats["unet_rows"] == 2


def test_first_ctrl_c_is_acknowledged(tiny, capfd):
    from fastitm.engine import Interrupted

    seen = [0]

    def hook(module, args):
        seen[0] += 1
        if seen[0] == 1:
            signal.raise_signal(signal.SIGINT)

    h = tiny.unet.register_forward_pre_hook(hook)
    try:
        with pytest.raises(Interrupted):
            fastitm.score(torch.rand(1, 3, 16, 16), ["a", "b"], model=tiny, timesteps=4, batch_size=2)
    finally:
        h.remove()
    assert "stopping after the batch in flight" in capfd.readouterr().err


# ---- the command line ----------------------------------------------------------------------------

@pytest.fixture
def png(tmp_path):
    p = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(1).random((16, 16, 3)) * 255).astype(np.uint8)).save(p)
    return p


def run_cli(tiny_dir, png, *args):
    return main(["score", "--model", str(tiny_dir), "--images", str(png), "--texts", "a dog", "a cat",
                 "--timesteps", "1", "--no-progress", *args])


def test_cli_records_the_backend_that_ran_and_the_preset(tiny_dir, png, tmp_path):
    out = tmp_path / "o.json"
    assert run_cli(tiny_dir, png, "--json", str(out), "--preset", "published", "--method", "discffusion") == 0
    data = json.loads(out.read_text())
    assert data["backend"] in ("native", "reference") and data["preset"] == "published"
    assert data["options"]["layers"] == "published" and data["choices"]["resize"] == "squash_pil"


@pytest.mark.parametrize("args,message", [
    (["--device", "gpu0"], "unknown device 'gpu0'"),
    (["--json", "/nonexistent-folder/out.json"], "--json: folder /nonexistent-folder does not exist"),
    (["--option", "lam=inf", "--method", "discffusion"], "positive finite"),
    (["--seed", "-1"], "seed must lie"),
    (["--preset", "published", "--option", "order=fastest", "--method", "diffusion_classifier"], "'order'"),
])
def test_cli_errors_exit_2_with_a_message(tiny_dir, png, capsys, args, message):
    assert run_cli(tiny_dir, png, *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_cuda_without_cuda(tiny_dir, png, capsys):
    assert run_cli(tiny_dir, png, "--device", "cuda") == 2
    assert "use --device cpu" in capsys.readouterr().err


def test_cli_triton_without_a_gpu_or_interpreter(tiny_dir, png, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("Triton runs here")
    assert run_cli(tiny_dir, png, "--backend", "triton") == 2
    assert "backend 'triton' cannot run on cpu" in capsys.readouterr().err


def test_cli_decompression_bomb_and_checkpoint_without_keys(tiny_dir, png, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 16x16 image stands in for a 14000x14000 one
    assert run_cli(tiny_dir, png) == 2
    assert "too large to decode safely" in capsys.readouterr().err
    monkeypatch.undo()
    bad = tmp_path / "ck.pt"
    torch.save({"version": 2}, bad)
    assert run_cli(tiny_dir, png, "--checkpoint", str(bad)) == 2
    assert "is not a fastitm checkpoint (missing" in capsys.readouterr().err


def test_cli_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for phrase in ("number of timesteps", "seed of the noise", "diffusion_itm (Krojer et al.", "'published': every choice",
                   "timestep layout", "posterior mean", "shared (one noise tensor", "torchvision's Resize"):
        assert phrase in text, phrase
