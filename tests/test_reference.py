"""The reference scorer against independent hand computations, one pair and one timestep at a time."""

import pytest
import torch

import fastitm
from fastitm.testing import assert_close

TEXTS = ["a red circle", "a blue square left of a dog", "a cat"]


def images(n=2, seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def hand_inputs(model, img, text, t, seed):
    """Everything by direct diffusers calls: the latent, the noised latent, embeddings."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, *model.latent_shape), generator=gen)
    with torch.no_grad():
        z = model.vae.encode(img[None] * 2 - 1).latent_dist.mean * model.vae.config.scaling_factor
        tt = torch.tensor([t])
        x = model.scheduler.add_noise(z, noise, tt)
        tok = model.tokenizer
        def emb(s):
            ids = tok([s], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            return model.text_encoder(ids)[0]
        return noise, x, tt, emb(text), emb("")


def one_step_plan(model, t, seed):
    return fastitm.make_plan(model, [t], seed=seed)


@pytest.mark.parametrize("t", [10, 487])
@pytest.mark.parametrize("err,normalize", [("l2", True), ("l2", False), ("mse", True)])
def test_diffusion_itm_by_hand(tiny, t, err, normalize):
    img = images(1)[0]
    noise, x, tt, cond, empty = hand_inputs(tiny, img, TEXTS[1], t, seed=7)
    with torch.no_grad():
        pc = tiny.unet(x, tt, encoder_hidden_states=cond).sample
        pu = tiny.unet(x, tt, encoder_hidden_states=empty).sample
    if err == "l2":
        e, u = torch.sqrt(((pc - noise) ** 2).sum()), torch.sqrt(((pu - noise) ** 2).sum())
    else:
        e, u = ((pc - noise) ** 2).mean(), ((pu - noise) ** 2).mean()
    expected = -(e - u) if normalize else -e
    res = fastitm.reference.score(img[None], [TEXTS[1]], model=tiny, plan=one_step_plan(tiny, t, 7),
                                  method="diffusion_itm", err=err, normalize=normalize)
    # e - u cancels: the tolerance is relative to the terms, not to their difference.
    assert_close(res.matrix[0, 0], expected, rtol=1e-5, atol=1e-6 * float(e.abs() + u.abs()))


def test_diffusion_classifier_by_hand(tiny):
    img = images(1)[0]
    noise, x, tt, cond, _ = hand_inputs(tiny, img, TEXTS[0], 300, seed=3)
    with torch.no_grad():
        pc = tiny.unet(x, tt, encoder_hidden_states=cond).sample
    expected = -((pc - noise) ** 2).mean()
    res = fastitm.reference.score(img[None], [TEXTS[0]], model=tiny, plan=one_step_plan(tiny, 300, 3),
                                  method="diffusion_classifier")
    assert_close(res.matrix[0, 0], expected, rtol=1e-5, atol=1e-7)


def _capture_qk(unet, names):
    """Forward hooks on each layer's to_q / to_k Linear: the projected queries and keys."""
    store, handles = {}, []
    for name, mod in unet.named_modules():
        if name in names:
            for proj in ("to_q", "to_k"):
                def hook(m, a, out, key=(name, proj)):
                    store[key] = out.detach()
                handles.append(getattr(mod, proj).register_forward_hook(hook))
    return store, handles


@pytest.mark.parametrize("pool,lam,layers,denoise", [
    ("logits", 1.0, "all", False),
    ("probs", 3.0, "all", False),
    ("logits", 1.0, "last", True),
])
def test_discffusion_by_hand(tiny, pool, lam, layers, denoise):
    img = images(1, seed=5)[0]
    t = 250
    noise, x, tt, cond, empty = hand_inputs(tiny, img, TEXTS[2], t, seed=11)
    all_attn2 = [n for n, _ in tiny.unet.named_modules() if n.endswith("attn2")]
    if layers == "all":
        chosen = all_attn2
    else:  # last cross-attention layer in each down/up block and the mid block
        groups = {}
        for n in all_attn2:
            p = n.split(".")
            groups[".".join(p[:2]) if p[0] != "mid_block" else "mid"] = n
        chosen = list(groups.values())
    assert len(chosen) >= 3
    store, handles = _capture_qk(tiny.unet, set(chosen))
    with torch.no_grad():
        pc = tiny.unet(x, tt, encoder_hidden_states=cond).sample
        for h in handles:
            h.remove()
        pu = tiny.unet(x, tt, encoder_hidden_states=empty).sample
    mods = dict(tiny.unet.named_modules())
    per_layer = []
    for n in chosen:
        q, k = store[(n, "to_q")], store[(n, "to_k")]
        heads = mods[n].heads
        d = q.shape[-1] // heads
        q = q.reshape(1, -1, heads, d).permute(0, 2, 1, 3)
        k = k.reshape(1, -1, heads, d).permute(0, 2, 1, 3)
        assert k.shape[2] == 77
        s = q @ k.transpose(-1, -2) / d ** 0.5
        if pool == "probs":
            s = lam * torch.softmax(s, dim=-1)
        per_layer.append(torch.logsumexp(s, dim=-1).mean())
    expected = torch.stack(per_layer).mean()
    if denoise:
        e, u = torch.linalg.vector_norm(pc - noise), torch.linalg.vector_norm(pu - noise)
        expected = expected + (u - e)
    res = fastitm.reference.score(img[None], [TEXTS[2]], model=tiny, plan=one_step_plan(tiny, t, 11),
                                  method="discffusion", pool=pool, lam=lam, layers=layers, denoise=denoise)
    assert_close(res.matrix[0, 0], expected, rtol=1e-5, atol=1e-6)


def test_mean_over_timesteps_and_per_timestep(tiny):
    imgs = images(2)
    res = fastitm.reference.score(imgs, TEXTS[:2], model=tiny, timesteps=3, seed=2)
    assert res.per_timestep.shape == (2, 2, 3)
    for k, t in enumerate(res.plan.timesteps.tolist()):
        one = fastitm.make_plan(tiny, [t], seed=0)
        one.noise = res.plan.noise[k : k + 1].clone()
        single = fastitm.reference.score(imgs, TEXTS[:2], model=tiny, plan=one)
        assert_close(single.matrix, res.per_timestep[:, :, k], rtol=1e-6, atol=1e-8)
    assert_close(res.matrix, res.per_timestep.mean(2), rtol=1e-6, atol=0)


def test_same_seed_same_matrix_and_plan_reproduces(tiny):
    imgs = images(2)
    a = fastitm.reference.score(imgs, TEXTS, model=tiny, timesteps=3, seed=4)
    b = fastitm.reference.score(imgs, TEXTS, model=tiny, timesteps=3, seed=4)
    c = fastitm.reference.score(imgs, TEXTS, model=tiny, plan=a.plan)
    d = fastitm.reference.score(imgs, TEXTS, model=tiny, timesteps=3, seed=5)
    assert torch.equal(a.matrix, b.matrix)
    assert torch.equal(a.matrix, c.matrix)
    assert not torch.equal(a.matrix, d.matrix)


def test_plan_saved_to_disk_reproduces(tiny, tmp_path):
    imgs = images(1)
    a = fastitm.reference.score(imgs, TEXTS[:2], model=tiny, timesteps=2, seed=9, scheme="stratified")
    a.plan.save(tmp_path / "plan.pt")
    b = fastitm.reference.score(imgs, TEXTS[:2], model=tiny, plan=fastitm.Plan.load(tmp_path / "plan.pt"))
    assert torch.equal(a.matrix, b.matrix)


def test_permuting_texts_permutes_columns_and_images_rows(tiny):
    imgs = images(3, seed=1)
    res = fastitm.reference.score(imgs, TEXTS, model=tiny, timesteps=2, seed=0)
    perm = [2, 0, 1]
    by_text = fastitm.reference.score(imgs, [TEXTS[p] for p in perm], model=tiny, plan=res.plan)
    assert_close(by_text.matrix, res.matrix[:, perm], rtol=1e-6, atol=1e-8)
    by_image = fastitm.reference.score(imgs[perm], TEXTS, model=tiny, plan=res.plan)
    assert_close(by_image.matrix, res.matrix[perm], rtol=1e-6, atol=1e-8)


def test_saved_model_scores_identically(tiny, tiny_dir):
    # the weights' round trip, bit for bit: without the CPU's default channels-last layout, whose
    # convolutions round differently (tests/test_speed.py checks that lever to a tolerance)
    loaded = fastitm.load_model(tiny_dir, channels_last=False)
    imgs = images(2)
    for method in fastitm.METHODS:
        a = fastitm.reference.score(imgs, TEXTS[:2], model=tiny, method=method, timesteps=2, seed=1)
        b = fastitm.reference.score(imgs, TEXTS[:2], model=loaded, method=method, plan=a.plan)
        assert torch.equal(a.matrix, b.matrix), method


def test_sampled_latent_by_hand(tiny):
    """latent="sample": image i's posterior sample comes from a generator seeded seed + 1 + i."""
    imgs = images(2)
    seed, t = 3, 600
    plan = fastitm.make_plan(tiny, [t], seed=seed, latent="sample")
    with torch.no_grad():
        dist = tiny.vae.encode(imgs[1:2] * 2 - 1).latent_dist
        eps = torch.randn(tiny.latent_shape, generator=torch.Generator().manual_seed(seed + 1 + 1))
        z = (dist.mean + dist.std * eps[None]) * tiny.vae.config.scaling_factor
        x = tiny.scheduler.add_noise(z, plan.noise, torch.tensor([t]))
        ids = tiny.tokenizer([TEXTS[0]], padding="max_length", max_length=77, return_tensors="pt").input_ids
        pc = tiny.unet(x, torch.tensor([t]), encoder_hidden_states=tiny.text_encoder(ids)[0]).sample
    expected = -((pc - plan.noise) ** 2).mean()
    res = fastitm.reference.score(imgs, TEXTS[:1], model=tiny, plan=plan, method="diffusion_classifier")
    assert_close(res.matrix[1, 0], expected, rtol=1e-5, atol=1e-7)
    mean = fastitm.reference.score(imgs, TEXTS[:1], model=tiny, method="diffusion_classifier",
                                   plan=fastitm.make_plan(tiny, [t], seed=seed))
    assert (res.matrix - mean.matrix).abs().min() > 0


def test_v_prediction_target_is_velocity(tiny):
    """A v-prediction checkpoint is scored against the velocity, not the noise."""
    import copy

    from diffusers import DDPMScheduler

    vmodel = copy.copy(tiny)
    vmodel.scheduler = DDPMScheduler.from_config(tiny.scheduler.config, prediction_type="v_prediction")
    img = images(1)[0]
    t = 400
    noise, x, tt, cond, _ = hand_inputs(vmodel, img, TEXTS[0], t, seed=2)
    with torch.no_grad():
        z = vmodel.vae.encode(img[None] * 2 - 1).latent_dist.mean * vmodel.vae.config.scaling_factor
        pc = vmodel.unet(x, tt, encoder_hidden_states=cond).sample
    ab = vmodel.scheduler.alphas_cumprod[t]
    v = ab.sqrt() * noise - (1 - ab).sqrt() * z
    expected = -((pc - v) ** 2).mean()
    res = fastitm.reference.score(img[None], [TEXTS[0]], model=vmodel, plan=one_step_plan(vmodel, t, 2),
                                  method="diffusion_classifier")
    assert_close(res.matrix[0, 0], expected, rtol=1e-5, atol=1e-7)
