"""Every bad input fails before any model work, with a message naming the problem."""

import pytest
import torch
from PIL import Image

import fastitm
from fastitm.core.inputs import prepare_images


def img_tensor(n=1, size=16):
    return torch.rand(n, 3, size, size)


@pytest.mark.parametrize("images,texts,kw,exc,match", [
    ([], ["a"], {}, ValueError, "image list is empty"),
    (None, [], {}, ValueError, "text list is empty"),
    (None, ["a", 3], {}, TypeError, "text 1 is a int"),
    (torch.rand(3, 16, 16), ["a"], {}, ValueError, "rank 3"),
    (torch.rand(1, 4, 16, 16), ["a"], {}, ValueError, "3 \\(RGB\\) channels"),
    (torch.rand(1, 3, 16, 16) * 2, ["a"], {}, ValueError, "expected \\[0, 1\\]"),
    (torch.rand(1, 3, 16, 16) - 0.5, ["a"], {}, ValueError, "expected \\[0, 1\\]"),
    ((torch.rand(1, 3, 16, 16) * 255).to(torch.uint8), ["a"], {}, TypeError, "divide by 255"),
    (torch.full((1, 3, 16, 16), float("nan")), ["a"], {}, ValueError, "NaN"),
    ([42], ["a"], {}, TypeError, "image 0 is a int"),
    (["https://example.com/a.png"], ["a"], {}, ValueError, "image 0: https://example.com/a.png is a URL; fastitm "
                                                           "does not fetch images"),
    (None, ["a"], {"method": "clip"}, ValueError, "unknown method 'clip'"),
    (None, ["a"], {"temperature": 2}, ValueError, "unknown option\\(s\\) \\['temperature'\\]"),
    (None, ["a"], {"method": "diffusion_classifier", "normalize": True}, ValueError, "its options are \\[.elimination., .order.\\]"),
    (None, ["a"], {"err": "l1"}, ValueError, "option 'err'"),
    (None, ["a"], {"normalize": "yes"}, TypeError, "True or False"),
    (None, ["a"], {"method": "discffusion", "lam": -1.0}, ValueError, "positive"),
    (None, ["a"], {"timesteps": 0}, ValueError, "at least 1"),
    (None, ["a"], {"timesteps": -3}, ValueError, "at least 1"),
    (None, ["a"], {"timesteps": 5000}, ValueError, "exceeds"),
    (None, ["a"], {"timesteps": [10, 1000]}, ValueError, "outside the schedule's range"),
    (None, ["a"], {"timesteps": [-1]}, ValueError, r"timesteps \[-1\] are negative; a timestep lies in \[0, .*0-999"),
    (None, ["a"], {"timesteps": []}, ValueError, "empty"),
    (None, ["a"], {"timesteps": [0.5]}, TypeError, "must be ints; entry 0 is float 0.5"),
    (None, ["a"], {"scheme": "cosine"}, ValueError, "unknown timestep scheme"),
    (None, ["a"], {"latent": "mode"}, ValueError, "unknown latent mode"),
    (None, ["a"], {"resize": "pad"}, ValueError, "unknown resize mode"),
    (None, ["a"], {"backend": "cuda"}, ValueError, "unknown backend"),
])
def test_bad_input(tiny, images, texts, kw, exc, match):
    images = img_tensor() if images is None else images
    with pytest.raises(exc, match=match):
        fastitm.score(images, texts, model=tiny, **kw)
    with pytest.raises(exc, match=match):
        fastitm.reference.score(images, texts, model=tiny, **kw)


def test_missing_and_unreadable_files(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="image file not found"):
        fastitm.score([tmp_path / "nope.png"], ["a"], model=tiny)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        fastitm.score([bad], ["a"], model=tiny)


def test_plan_conflicts_and_mismatch(tiny):
    plan = fastitm.make_plan(tiny, 2, seed=0)
    with pytest.raises(ValueError, match="either plan= or timesteps="):
        fastitm.score(img_tensor(), ["a"], model=tiny, plan=plan, timesteps=3)
    other = fastitm.testing.tiny_model(seed=0, sample_size=4)
    with pytest.raises(ValueError, match="latents of shape"):
        fastitm.score(img_tensor(), ["a"], model=other, plan=plan)
    with pytest.raises(TypeError, match="fastitm Model"):
        fastitm.score(img_tensor(), ["a"], model="not a model")


def test_paths_pil_and_tensors_agree(tiny, tmp_path):
    t = torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8)
    pil = Image.fromarray(t.numpy())
    pil.save(tmp_path / "x.png")
    as_tensor = t.permute(2, 0, 1).float() / 255
    a = prepare_images([pil], 16)
    b = prepare_images([tmp_path / "x.png"], 16)
    c = prepare_images(as_tensor[None], 16)
    d = prepare_images([str(tmp_path / "x.png")], 16)
    assert torch.equal(a, b) and torch.equal(a, d)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-6)
    assert a.shape == (1, 3, 16, 16) and a.min() >= -1 and a.max() <= 1


def test_resize_modes():
    # A wide image: squash keeps the whole content, center_crop keeps the middle square.
    x = torch.zeros(3, 20, 40)
    x[:, :, :10] = 1.0  # the left quarter is white
    sq = prepare_images(x[None], 16, "squash")
    cc = prepare_images(x[None], 16, "center_crop")
    assert sq.shape == cc.shape == (1, 3, 16, 16)
    assert sq[0, :, :, 0].mean() > 0.9  # left edge white after squashing
    assert cc[0, :, :, 0].mean() < -0.9  # cropped away
    same = prepare_images(torch.rand(1, 3, 16, 16), 16)
    assert same.shape == (1, 3, 16, 16)


def test_long_caption_warning_points_at_the_callers_line(tiny):
    with pytest.warns(UserWarning, match=r"texts \[1\] exceed the text encoder's \d+ tokens") as rec:
        fastitm.score(torch.rand(1, 3, 16, 16), ["a cat", "word " * 100], model=tiny, timesteps=1)
    assert [r.filename for r in rec if "exceed" in str(r.message)] == [__file__]  # not fastitm's internals
