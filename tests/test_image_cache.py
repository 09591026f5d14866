"""fastitm.ImageCache: an image scored again reuses its latent and unconditional rows, with the
scores a call without the cache gives, and the rows counted."""

import json

import pytest
import torch

import fastitm
from fastitm.cli import main
from fastitm.testing import assert_close

T = 4


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(7)
    return torch.rand(3, 3, 64, 64, generator=g)


def same(got, want):
    """The cache's rows are the recomputed rows' values to fp32 rounding: the denoiser may sum in
    another order in a batch of other rows (a DiffusionITM score is a difference of errors of about 1,
    so its rounding is absolute, not relative to the score)."""
    assert_close(got.matrix, want.matrix, rtol=1e-5, atol=1e-5)
    assert_close(got.per_timestep, want.per_timestep, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,kw", [("diffusion_itm", {}), ("discffusion", {"preset": "published", "latent": "mean"}),
                                       ("diffusion_classifier", {})])
def test_a_second_call_reuses_the_images_it_has_seen(tiny, images, method, kw):
    x0, x1, x2 = images
    cache = fastitm.ImageCache()
    first = fastitm.score(torch.stack([x0, x1]), ["a red square", "a blue circle"], model=tiny, method=method,
                          timesteps=T, image_cache=cache, **kw)
    texts = ["a green triangle", "two red squares", "a blue circle"]
    got = fastitm.score(torch.stack([x1, x2]), texts, model=tiny, method=method, plan=first.plan, image_cache=cache,
                        **kw)
    want = fastitm.score(torch.stack([x1, x2]), texts, model=tiny, method=method, plan=first.plan, **kw)
    same(got, want)
    uncond = want.stats["text_encodes"] == len(texts) + 1  # the method runs an empty-prompt row
    assert uncond == (method != "diffusion_classifier")  # Discffusion's published terms mix in the empty prompt's
    assert first.stats["vae_images"] == 2 and first.stats.get("unet_rows_reused", 0) == 0
    assert got.stats["vae_images"] == 1 and want.stats["vae_images"] == 2  # x1's latent came from the cache
    assert got.stats["image_cache"] == "on" and len(cache) == 3
    rows = 2 * (len(texts) + uncond) * T
    assert want.stats["unet_rows"] == rows
    assert got.stats["unet_rows"] == rows - uncond * T  # x1's empty-prompt rows were not recomputed
    assert got.stats.get("unet_rows_reused", 0) == uncond * T


@pytest.mark.parametrize("method", ["diffusion_itm", "diffusion_classifier"])
def test_an_image_repeated_within_a_call_runs_once(tiny, images, method):
    x0, x1, _ = images
    texts = ["a red square", "a blue circle"]
    pairs = torch.tensor([[True, True], [True, False], [False, True]])  # the repeat asks for another text
    kw = dict(model=tiny, method=method, timesteps=T, pairs=pairs, batch_size=4)
    got = fastitm.score(torch.stack([x0, x1, x0]), texts, image_cache=fastitm.ImageCache(), **kw)
    want = fastitm.score(torch.stack([x0, x1, x0]), texts, **kw)
    same(got, want)
    uncond = method == "diffusion_itm"
    assert got.stats["vae_images"] == 2 and want.stats["vae_images"] == 3
    assert want.stats["unet_rows"] == (4 + 3 * uncond) * T
    # x0 first, then x1, then the repeat: x0's empty-prompt rows ran in batches before the repeat's
    assert got.stats["unet_rows"] == want.stats["unet_rows"] - uncond * T
    assert got.stats.get("unet_rows_reused", 0) == uncond * T
    # in one batch with x0's own rows, the repeat's cannot wait for them: they run again
    one = fastitm.score(torch.stack([x0, x1, x0]), texts, image_cache=fastitm.ImageCache(), **{**kw, "batch_size": 32})
    same(one, want)
    assert one.stats["unet_rows"] == want.stats["unet_rows"] and one.stats["vae_images"] == 2


def test_racing_with_the_cache_decides_as_without_and_counts_only_its_own_rows(tiny, images):
    x0, x1, x2 = images
    texts = ["a red square", "a blue circle", "a green triangle", "two squares"]
    # image x1's race must stop before the plan's end: futility does it on this tiny model's near ties
    opts = {"alpha": 0.3, "min_timesteps": 2, "round_size": 2, "futility": 0.5, "settled": 0.0}
    cache = fastitm.ImageCache()
    plan = fastitm.score(torch.stack([x0, x1]), texts[:2], model=tiny, timesteps=8, image_cache=cache).plan
    got = fastitm.score(torch.stack([x1, x2]), texts, model=tiny, plan=plan, adaptive=opts, image_cache=cache)
    want = fastitm.score(torch.stack([x1, x2]), texts, model=tiny, plan=plan, adaptive=opts)
    assert torch.equal(torch.isinf(got.matrix), torch.isinf(want.matrix))  # the same texts dropped
    same(got, want)
    r_got, r_want = got.stats["racing"], want.stats["racing"]
    # x1's empty-prompt rows came from the cache: its rows are its text rows alone; x2 unchanged
    assert r_got["rows_per_image"][0] == r_want["rows_per_image"][0] - r_want["timesteps_per_image"][0]
    assert r_got["rows_per_image"][1] == r_want["rows_per_image"][1]
    assert r_got["timesteps_per_image"] == r_want["timesteps_per_image"]
    assert r_got["plan_end"] == r_want["plan_end"]
    assert got.stats["unet_rows"] == want.stats["unet_rows"] - r_want["timesteps_per_image"][0]
    # the cache holds x1's 8 timesteps; reused counts only those its race reached
    assert got.stats["unet_rows_reused"] == r_want["timesteps_per_image"][0] < 8
    assert got.stats["unet_rows_saved"] == want.stats["unet_rows_saved"]


def test_racing_copies_a_repeats_rows_round_by_round(tiny, images):
    x0, x1, _ = images
    texts = ["a red square", "a blue circle", "a green triangle", "two squares"]
    pairs = torch.tensor([[True, True, False, False], [True] * 4, [False, False, True, True]])
    kw = dict(model=tiny, timesteps=8, pairs=pairs, batch_size=4, adaptive={"alpha": 0.3, "min_timesteps": 2,
                                                                           "round_size": 2})
    got = fastitm.score(torch.stack([x0, x1, x0]), texts, image_cache=fastitm.ImageCache(), **kw)
    want = fastitm.score(torch.stack([x0, x1, x0]), texts, **kw)
    assert torch.equal(torch.isinf(got.matrix), torch.isinf(want.matrix))
    same(got, want)
    reused = got.stats["unet_rows_reused"]
    # each round, x0 runs before its repeat: the repeat copies x0's empty-prompt rows while x0 still races
    assert 2 <= reused <= min(want.stats["racing"]["timesteps_per_image"][0::2])
    assert got.stats["unet_rows"] == want.stats["unet_rows"] - reused
    assert got.stats["racing"]["rows_per_image"] == [*want.stats["racing"]["rows_per_image"][:2],
                                                     want.stats["racing"]["rows_per_image"][2] - reused]


def test_the_cache_refuses_another_plan_method_or_changed_weights(tiny, images):
    cache = fastitm.ImageCache()
    fastitm.score(images[:1], ["a", "b"], model=tiny, timesteps=2, image_cache=cache)
    with pytest.raises(ValueError, match="another method, method options or plan"):
        fastitm.score(images[:1], ["a", "b"], model=tiny, timesteps=3, image_cache=cache)
    with pytest.raises(ValueError, match="another method, method options or plan"):
        fastitm.score(images[:1], ["a", "b"], model=tiny, timesteps=2, method="discffusion", image_cache=cache)
    twin = fastitm.testing.tiny_model(seed=0)  # the same weights in another model: its own rows
    with pytest.raises(ValueError, match="another model"):
        fastitm.score(images[:1], ["a", "b"], model=twin, timesteps=2, image_cache=cache)
    p = next(tiny.unet.parameters())
    with torch.no_grad():
        p.mul_(1.0)  # the same values, but written in place: a training step looks like this
    with pytest.raises(ValueError, match="another model .*clear"):
        fastitm.score(images[:1], ["a", "b"], model=tiny, timesteps=2, image_cache=cache)
    cache.clear()
    assert len(cache) == 0
    res = fastitm.score(images[:1], ["a", "b"], model=tiny, timesteps=2, image_cache=cache)
    assert res.stats["vae_images"] == 1 and len(cache) == 1
    with pytest.raises(TypeError, match="fastitm.ImageCache"):
        fastitm.score(images[:1], ["a", "b"], model=tiny, timesteps=2, image_cache={})


def test_sampled_latents_do_not_use_the_cache(tiny, images):
    cache = fastitm.ImageCache()
    kw = dict(model=tiny, timesteps=2, latent="sample", image_cache=cache)
    fastitm.score(images[:2], ["a", "b"], **kw)
    res = fastitm.score(images[:2], ["a", "b"], **kw)
    assert res.stats["image_cache"].startswith("latent='sample'") and res.stats["vae_images"] == 2
    assert "unet_rows_reused" not in res.stats and len(cache) == 0


def test_the_least_recently_used_image_goes_first(tiny, images):
    cache = fastitm.ImageCache(max_images=2)
    plan = fastitm.make_plan(tiny, 2, seed=0)
    for idx in ([0, 1], [0], [2]):  # image 0 used again after 1: image 1 is the one to go
        fastitm.score(images[idx], ["a", "b"], model=tiny, plan=plan, image_cache=cache)
    res = fastitm.score(images[[0, 2]], ["a", "b"], model=tiny, plan=plan, image_cache=cache)
    assert res.stats["vae_images"] == 0 and len(cache) == 2
    res = fastitm.score(images[[1]], ["a", "b"], model=tiny, plan=plan, image_cache=cache)
    assert res.stats["vae_images"] == 1
    with pytest.raises(ValueError, match="max_images"):
        fastitm.ImageCache(max_images=0)


def test_an_evaluation_runs_each_images_rows_once(tiny, tmp_path):
    """Image-choice items sharing candidates, as in Flickr30k image retrieval: with the cache each image
    goes through the VAE once and its unconditional rows run once, with the same scores."""
    ex = fastitm.data.make_dataset(5, "heldout", seed=3, size=16)
    for n, e in enumerate(ex):
        e.image.save(tmp_path / f"{n}.png")
    cands = [[0, 1, 2], [1, 2, 3], [2, 3, 4], [4, 0, 1]]  # 12 candidates, 5 distinct images
    f = tmp_path / "set.jsonl"
    f.write_text("".join(json.dumps({"images": [f"{i}.png" for i in c], "text": ex[c[0]].caption, "label": 0}) + "\n"
                         for c in cands))
    kw = dict(model=tiny, timesteps=T, batch_size=2, stream=1, progress=False)  # an engine call per item
    plain = fastitm.evaluate.run("jsonl", f, **kw)
    cached = fastitm.evaluate.run("jsonl", f, image_cache=True, **kw)
    # one call, repeats in it; batches of 8 rows, one image each: every first occurrence runs before the repeats
    one_call = fastitm.evaluate.run("jsonl", f, image_cache=True, **{**kw, "batch_size": 8, "stream": 16})
    assert plain.stats["engine_calls"] == 4 and one_call.stats["engine_calls"] == 1
    for a, b, c in zip(cached.items, plain.items, one_call.items, strict=True):
        assert a["scores"] == pytest.approx(b["scores"], rel=1e-5, abs=1e-5)
        assert c["scores"] == pytest.approx(b["scores"], rel=1e-5, abs=1e-5)
    assert one_call.stats["vae_images"] == 5 and one_call.stats["unet_rows_reused"] == (12 - 5) * T
    assert plain.stats["vae_images"] == 12 and plain.stats["unet_rows"] == 12 * 2 * T  # candidate x (text, empty)
    assert cached.stats["vae_images"] == 5
    assert cached.stats["unet_rows_reused"] == (12 - 5) * T
    assert cached.stats["unet_rows"] == plain.stats["unet_rows"] - (12 - 5) * T
    assert f"{7 * T} unconditional rows reused, 5 images through the VAE" in cached.to_markdown()
    # without the cache, the report counts the repeats and points at the option
    assert plain.stats["repeated_images"] == 7 and "7 candidate images repeat" in plain.to_markdown()
    assert "--image-cache" in plain.to_markdown() and "--image-cache" not in cached.to_markdown()
    out = tmp_path / "rep"  # the same from the command line
    assert main(["eval", "jsonl", "--data", str(f), "--model", "tiny", "--timesteps", str(T), "--batch-size", "2",
                 "--stream", "1", "--image-cache", "--out", str(out), "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["stats"]["image_cache"] and rep["stats"]["unet_rows_reused"] == 7 * T
    assert [r["scores"] for r in rep["items"]] == [r["scores"] for r in cached.items]


@pytest.mark.parametrize("extra, named", [
    (["--preset", "published"], "latent='sample_per_timestep' (the published preset's)"),
    (["--latent", "sample"], "latent='sample')"),
])
def test_eval_image_cache_with_sampled_latents_is_refused(tmp_path, capsys, extra, named):
    f = tmp_path / "set.jsonl"
    f.write_text(json.dumps({"image": "none.png", "texts": ["a", "b"], "label": 0}))
    assert main(["eval", "jsonl", "--data", str(f), "--model", "tiny", "--image-cache", "--out", str(tmp_path / "o"),
                 "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert "image_cache shares posterior-mean latents only" in err and named in err, err
