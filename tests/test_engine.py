"""The engine (fastitm.score) against the reference scorer, given the same plan."""

import pytest
import torch

import fastitm
from fastitm.ops import native_status
from fastitm.testing import assert_close

TEXTS = ["a red circle", "a blue square left of a dog", "a cat", "green", "a yellow triangle above a circle"]
CONFIGS = [
    ("diffusion_itm", {}),
    ("diffusion_itm", {"err": "mse"}),
    ("diffusion_itm", {"normalize": False}),
    ("diffusion_classifier", {}),
    ("discffusion", {}),
    ("discffusion", {"pool": "probs", "lam": 2.0, "layers": "last", "denoise": True}),
]
CPU_BACKENDS = ["reference", pytest.param("native", marks=pytest.mark.skipif(native_status() is not None,
                                                                            reason=str(native_status())))]


def compare(res, ref):
    # Normalized scores subtract two errors of similar size: tolerance relative to those terms.
    scale = 1.0 if res.method != "diffusion_itm" or not res.options.get("normalize") else 20.0
    assert_close(res.matrix, ref.matrix, rtol=1e-5, atol=1e-6 * scale, name=f"{res.method} {res.options}")
    assert_close(res.per_timestep, ref.per_timestep, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("method,opts", CONFIGS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("N,M,batch_size", [(1, 1, 8), (3, 5, 7), (2, 4, 3)])
def test_parity_with_reference(tiny, method, opts, backend, N, M, batch_size):
    imgs = torch.rand(N, 3, 16, 16, generator=torch.Generator().manual_seed(N))
    res = fastitm.score(imgs, TEXTS[:M], model=tiny, method=method, timesteps=3, seed=5, backend=backend,
                        batch_size=batch_size, **opts)
    ref = fastitm.reference.score(imgs, TEXTS[:M], model=tiny, method=method, plan=res.plan, **opts)
    compare(res, ref)


@pytest.mark.parametrize("method,opts", [CONFIGS[0], CONFIGS[5]])
def test_whole_scorer_through_triton(triton_interpret, tiny, method, opts):
    imgs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    res = fastitm.score(imgs, TEXTS[:3], model=tiny, method=method, timesteps=2, seed=1, backend="triton",
                        batch_size=5, **opts)
    ref = fastitm.reference.score(imgs, TEXTS[:3], model=tiny, method=method, plan=res.plan, **opts)
    compare(res, ref)


def test_rankings_agree(tiny):
    imgs = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    res = fastitm.score(imgs, TEXTS, model=tiny, timesteps=4, seed=0)
    ref = fastitm.reference.score(imgs, TEXTS, model=tiny, plan=res.plan)
    gaps = (ref.matrix[:, :, None] - ref.matrix[:, None, :]).abs()
    agree = (res.matrix[:, :, None] > res.matrix[:, None, :]) == (ref.matrix[:, :, None] > ref.matrix[:, None, :])
    assert agree[gaps > 1e-4].all()


class Counter:
    """Counts the rows the UNet sees, the images the VAE encodes and the texts the encoder reads."""

    def __init__(self, model):
        self.unet_rows = self.unet_calls = self.vae_images = self.text_rows = 0
        self.handles = [
            model.unet.register_forward_pre_hook(self._unet, with_kwargs=True),
            model.text_encoder.register_forward_pre_hook(self._text, with_kwargs=True),
        ]
        self.vae, self.encode = model.vae, model.vae.encode

        def encode(x, *a, **k):
            self.vae_images += x.shape[0]
            return self.encode(x, *a, **k)

        model.vae.encode = encode

    def _unet(self, module, args, kwargs):
        self.unet_calls += 1
        self.unet_rows += args[0].shape[0]

    def _text(self, module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        self.text_rows += ids.shape[0]

    def close(self):
        for h in self.handles:
            h.remove()
        del self.vae.encode  # back to the class method


def test_the_empty_prompt_row_shifts_every_text_of_an_image_alike(tiny):
    """DiffusionITM's normalized score subtracts the empty prompt's error of the same image and timestep
    from every text's: per image a constant. So choosing among an image's texts gives the same answer
    with ``normalize=False``, at M of the M + 1 rows per image and timestep; racing decides on the
    differences between an image's texts, so it drops and stops the same way too. (Choosing among
    images, image retrieval, is where the row matters.)"""
    N, M, T = 3, 5, 12
    imgs = torch.rand(N, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    kw = dict(model=tiny, timesteps=T, seed=2, batch_size=8)
    norm = fastitm.score(imgs, TEXTS[:M], **kw)
    raw = fastitm.score(imgs, TEXTS[:M], normalize=False, **kw)
    shift = norm.matrix - raw.matrix  # mean_k u_k of each image, whatever the text
    assert_close(shift, shift[:, :1].expand_as(shift), rtol=1e-5, atol=1e-6)
    assert torch.equal(norm.matrix.argmax(dim=1), raw.matrix.argmax(dim=1))
    assert norm.stats["unet_rows"] - raw.stats["unet_rows"] == N * T
    race = {"alpha": 0.45, "min_timesteps": 2, "round_size": 2}  # loose: drops and early stops on a tiny model
    a = fastitm.score(imgs, TEXTS[:M], adaptive=race, **kw)
    b = fastitm.score(imgs, TEXTS[:M], normalize=False, adaptive=race, **kw)
    dropped = torch.isinf(a.matrix)
    assert dropped.any() and torch.equal(dropped, torch.isinf(b.matrix))
    assert torch.equal(a.matrix.argmax(dim=1), b.matrix.argmax(dim=1))
    steps = a.stats["racing"]["timesteps_per_image"]
    assert steps == b.stats["racing"]["timesteps_per_image"] and min(steps) < T
    assert a.stats["unet_rows"] - b.stats["unet_rows"] == sum(steps)  # one empty prompt's row per timestep run


@pytest.mark.parametrize("method,opts,uncond", [
    ("diffusion_itm", {}, True),
    ("diffusion_itm", {"normalize": False}, False),
    ("diffusion_classifier", {}, False),
    ("discffusion", {}, False),
    ("discffusion", {"denoise": True}, True),
])
def test_work_sharing_counts(tiny, method, opts, uncond):
    N, M, T = 3, 4, 2
    imgs = torch.rand(N, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    c = Counter(tiny)
    try:
        res = fastitm.score(imgs, TEXTS[:M], model=tiny, method=method, timesteps=T, batch_size=5, **opts)
    finally:
        c.close()
    rows = T * N * (M + (1 if uncond else 0))
    assert c.unet_rows == rows == res.stats["unet_rows"]
    assert c.unet_calls == -(-rows // 5)  # packed: ceil(rows / batch_size) forward passes
    assert c.vae_images == N
    assert c.text_rows == M + (1 if uncond else 0)
    # The reference, for contrast, runs every pair's unconditional row and encodes texts per pair.
    c = Counter(tiny)
    try:
        fastitm.reference.score(imgs, TEXTS[:M], model=tiny, method=method, plan=res.plan, **opts)
    finally:
        c.close()
    assert c.unet_rows == T * N * M * (2 if uncond else 1)


@pytest.mark.parametrize("rounds,T,M", [([(2, 3), (4, 1)], 6, 6), ([(1, 2)], 3, 5), ([(3, 9)], 4, 4)])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_adaptive_elimination(tiny, rounds, T, M, backend):
    from fastitm.core.methods import spread_order

    N = 3
    texts = [f"a {w} shape" for w in ("red", "blue", "green", "tiny", "big", "odd")][:M]
    imgs = torch.rand(N, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    res = fastitm.score(imgs, texts, model=tiny, method="diffusion_classifier", timesteps=T, seed=3,
                        batch_size=4, backend=backend, elimination=rounds)
    ref = fastitm.reference.score(imgs, texts, model=tiny, method="diffusion_classifier", plan=res.plan,
                                  elimination=rounds)
    full = fastitm.reference.score(imgs, texts, model=tiny, method="diffusion_classifier", plan=res.plan)
    # Same survivors, same scores; the engine computed only the rows the rounds need.
    assert torch.equal(res.matrix.isinf(), ref.matrix.isinf())
    fin = res.matrix.isfinite()
    assert_close(res.matrix[fin], full.matrix[fin], rtol=1e-5, atol=1e-6)
    assert torch.equal(res.per_timestep.isnan(), ref.per_timestep.isnan())
    known = ~res.per_timestep.isnan()
    assert_close(res.per_timestep[known], full.per_timestep[known], rtol=1e-5, atol=1e-6)
    alive, start, expected = M, 0, 0
    for steps, keep in rounds:
        expected += alive * (steps - start)
        alive, start = min(alive, keep), steps
    expected = N * (expected + alive * (T - start))
    assert res.stats["unet_rows"] == expected
    assert res.stats["unet_rows_saved"] == N * M * T - expected
    # Each image's winner under elimination is the best of the texts that survived every round.
    assert (fin.sum(dim=1) == alive).all()
    order = spread_order(T)
    assert sorted(order) == list(range(T))


def test_spread_order_prefixes_cover_the_schedule():
    from fastitm.core.methods import spread_order

    for T in (1, 2, 7, 10, 31):
        order = spread_order(T)
        assert sorted(order) == list(range(T))
        for n in range(2, T + 1):
            pre = sorted(order[:n])
            # No gap inside a prefix is more than twice the even spacing (plus rounding).
            assert max(b - a for a, b in zip([-1] + pre, pre + [T], strict=True)) <= 2 * T / n + 1


@pytest.mark.parametrize("T", [7, 31, 49, 250])
def test_spread_order_prefixes_are_balanced(T):
    """Every prefix is spread evenly, not only without wide gaps: of its n indices, about n x / T lie
    below any x. (Ties taken left to right broke this: a prefix of 25 of 49 held 16 indices below 24,
    a balanced one 12; racing's settled stop predicts the unseen timesteps from the seen.)"""
    from fastitm.core.methods import spread_order

    order = spread_order(T)
    for n in range(1, T + 1):
        taken = [False] * T
        for k in order[:n]:
            taken[k] = True
        below = 0
        for x in range(T + 1):
            assert abs(below - n * x / T) <= 3, (n, x, below)
            if x < T:
                below += taken[x]


@pytest.mark.parametrize("bad", ["2:5,1:1", "2:1,5:3", "0:1", "x", [(1, 2, 3)], "2-5"])
def test_bad_elimination_rounds(tiny, bad):
    with pytest.raises(ValueError, match="elimination"):
        fastitm.score(torch.rand(1, 3, 16, 16), ["a", "b"], model=tiny, method="diffusion_classifier",
                      timesteps=6, elimination=bad)


def test_elimination_longer_than_plan(tiny):
    with pytest.raises(ValueError, match="plan has 3"):
        fastitm.score(torch.rand(1, 3, 16, 16), ["a", "b"], model=tiny, method="diffusion_classifier",
                      timesteps=3, elimination=[(5, 1)])


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_batch_size(tiny, bad):
    with pytest.raises(ValueError, match="batch_size"):
        fastitm.score(torch.rand(1, 3, 16, 16), ["a"], model=tiny, timesteps=1, batch_size=bad)


def _interrupt_after(model, calls, sig: str = "SIGINT"):
    """A UNet hook that delivers a real SIGINT (as Ctrl-C does), or SIGTERM (as a batch scheduler or
    torchrun does), during the given forward call."""
    import signal

    seen = [0]

    def hook(module, args):
        seen[0] += 1
        if seen[0] == calls:
            signal.raise_signal(getattr(signal, sig))

    return model.unet.register_forward_pre_hook(hook)


@pytest.mark.parametrize("method,opts,sig", [("diffusion_itm", {}, "SIGINT"), ("discffusion", {"denoise": True}, "SIGTERM"),
                                             ("diffusion_classifier", {"elimination": [(2, 2)]}, "SIGINT")])
def test_ctrl_c_then_resume(tiny, tmp_path, method, opts, sig):
    from fastitm.engine import Interrupted

    imgs = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    texts = TEXTS[:4]
    kw = dict(model=tiny, method=method, timesteps=3, seed=2, batch_size=5, **opts)
    full = fastitm.score(imgs, texts, **kw)
    ckpt = tmp_path / "run.pt"
    h = _interrupt_after(tiny, 3, sig)
    try:
        with pytest.raises(Interrupted) as info:
            fastitm.score(imgs, texts, checkpoint=str(ckpt), checkpoint_every=1e9, **kw)
    finally:
        h.remove()
    e = info.value
    assert isinstance(e, KeyboardInterrupt) and e.checkpoint == str(ckpt) and ckpt.exists()
    assert e.rows_done == 15 and e.partial.stats["unet_rows"] == 15  # the batch in flight finished
    part = e.partial
    known = ~part.per_timestep.isnan()
    assert known.any() and not known.all()
    assert_close(part.per_timestep[known], full.per_timestep[known], rtol=1e-5, atol=2e-5)
    done = ~part.matrix.isnan()  # pairs finished on every timestep (none yet under elimination)
    assert torch.equal(done, known.all(dim=2))
    assert_close(part.matrix[done], full.matrix[done], rtol=1e-5, atol=2e-5)
    # Resume: only the missing rows run, and the result is the uninterrupted one.
    c = Counter(tiny)
    try:
        res = fastitm.score(imgs, texts, checkpoint=str(ckpt), **kw)
    finally:
        c.close()
    assert c.unet_rows == res.stats["unet_rows"] == full.stats["unet_rows"] - 15
    assert torch.equal(res.matrix.isinf(), full.matrix.isinf())
    fin = full.matrix.isfinite()
    assert_close(res.matrix[fin], full.matrix[fin], rtol=1e-5, atol=2e-5)
    # A finished checkpoint answers at once.
    again = fastitm.score(imgs, texts, checkpoint=str(ckpt), **kw)
    assert again.stats["unet_rows"] == 0 and torch.equal(again.matrix, res.matrix)


def test_checkpoint_of_another_run_is_refused(tiny, tmp_path):
    imgs = torch.rand(2, 3, 16, 16)
    ckpt = tmp_path / "c.pt"
    fastitm.score(imgs, ["a", "b"], model=tiny, timesteps=1, checkpoint=str(ckpt))
    with pytest.raises(ValueError, match="another run"):
        fastitm.score(imgs, ["a", "c"], model=tiny, timesteps=1, checkpoint=str(ckpt))
    with pytest.raises(ValueError, match="another run"):
        fastitm.score(imgs, ["a", "b"], model=tiny, timesteps=1, seed=1, checkpoint=str(ckpt))
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        fastitm.score(imgs, ["a", "b"], model=tiny, timesteps=1, checkpoint=str(ckpt))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fastitm.score(imgs, ["a"], model=tiny, timesteps=1, checkpoint=str(tmp_path / "no" / "c.pt"))


def test_unet_runner_eager_interface(tiny, monkeypatch):
    """The runner the engine calls: eager on CPU, same outputs as the UNet, bucket enforced; graphs
    only on CUDA and only when asked for (off by default: the H200 run in bench/RESULTS.md)."""
    from fastitm.engine.cuda_graphs import UNetRunner, graphs_enabled

    monkeypatch.delenv("FASTITM_CUDA_GRAPHS", raising=False)
    assert not graphs_enabled(torch.device("cpu")) and not graphs_enabled(torch.device("cuda"))
    monkeypatch.setenv("FASTITM_CUDA_GRAPHS", "1")
    assert graphs_enabled(torch.device("cuda")) and not graphs_enabled(torch.device("cpu"))
    monkeypatch.setenv("FASTITM_CUDA_GRAPHS", "0")
    assert not graphs_enabled(torch.device("cuda"))
    runner = UNetRunner(tiny.unet, None, bucket=4, use_graph=False)
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 990])
    cond = torch.randn(3, 77, 32)
    pred, pooled = runner(x, t, cond)
    assert pooled is None
    assert torch.equal(pred, tiny.unet(x, t, encoder_hidden_states=cond).sample)
    with pytest.raises(ValueError, match="bucket"):
        runner(torch.randn(5, 4, 8, 8), torch.zeros(5, dtype=torch.long), torch.randn(5, 77, 32))
    with pytest.raises(ValueError, match="CUDA"):
        UNetRunner(tiny.unet, None, bucket=4, use_graph=True)


@pytest.mark.parametrize("bs", [1, 3, 8, 50])
def test_pack_recuts_streamed_rows_in_order(bs):
    from fastitm.engine.engine import pack, stage_chunks

    alive = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    chunks = list(stage_chunks(alive, [4, 1], needs_uncond=True))
    # Image 1 has no text left: no rows at all, not even its empty prompt's (nothing would use them);
    # each image's rows are grouped by timestep.
    assert [c.shape[0] for c in chunks] == [6, 8]
    assert chunks[0].tolist() == [[0, -1, 4], [0, 0, 4], [0, 2, 4], [0, -1, 1], [0, 0, 1], [0, 2, 1]]
    batches = list(pack(iter(chunks), bs))
    assert all(len(b) == bs for b in batches[:-1]) and 1 <= len(batches[-1]) <= bs
    assert torch.equal(torch.cat(batches), torch.cat(chunks))
    assert list(pack(iter([]), bs)) == []
    assert list(stage_chunks(alive, [], needs_uncond=False)) == []


def test_texts_are_encoded_in_chunks_to_the_same_rows(tiny, monkeypatch):
    """The engine and the text cache run the text encoder on at most TEXT_CHUNK texts per call (so a
    1,000-class task's encoder activations do not set the peak memory), and the rows equal those of
    one call over every text."""
    import fastitm.engine.common as common
    from fastitm.engine.text_cache import TextCache

    colours = ("red", "blue", "green", "white", "black")
    texts = [f"a {size} {colour} square" for size in ("big", "small") for colour in colours]
    whole = tiny.spec.encode(tiny, texts)["hidden"]
    sizes = []
    encode = tiny.spec.encode
    monkeypatch.setattr(tiny.spec, "encode", lambda model, t: sizes.append(len(t)) or encode(model, t))
    monkeypatch.setattr(common, "TEXT_CHUNK", 4)
    got = common.encode_conditioning(tiny, texts, empty=True)["hidden"]
    assert sizes == [4, 4, 2, 1] and got.shape[0] == len(texts) + 1  # the texts, then the empty prompt
    assert_close(got[:-1], whole, rtol=1e-6, atol=1e-6, name="chunked rows")
    sizes.clear()
    cached = TextCache().encode(tiny, texts)["hidden"]
    assert sizes == [4, 4, 2]
    assert_close(cached, whole, rtol=1e-6, atol=1e-6, name="text cache rows")
