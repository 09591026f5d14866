"""Speed levers on the CPU: each keeps the scores; the dtype and batch size chosen by device;
the CPU bf16 message; requirements that admit the CUDA machine's packages."""

import copy
import re
from pathlib import Path

import pytest
import tomllib
import torch

import fastitm
from fastitm.models import speed
from fastitm.testing import assert_close

TEXTS = ["a red circle", "a blue square left of a dog", "a cat"]


def _score(model, method="diffusion_itm", batch_size=5):
    imgs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return fastitm.score(imgs, TEXTS, model=model, method=method, timesteps=3, seed=1, batch_size=batch_size)


ALL_LEVERS = {"channels_last": True, "fuse_qkv": True, "compile": "eager"}


# Each lever with each method, compile (the slow one to trace: 10-25 s) once alone with the attention
# hooks (discffusion) and once with the other levers (diffusion_itm).
@pytest.mark.parametrize("method, lever", [(m, {k: v}) for m in ("diffusion_itm", "discffusion")
                                           for k, v in list(ALL_LEVERS.items())[:2]]
                         + [("discffusion", {"compile": "eager"}), ("diffusion_itm", ALL_LEVERS)])
def test_levers_keep_the_scores(tiny, lever, method):
    fast = speed.apply(copy.deepcopy(tiny), **lever)
    assert all(fast.levers[k] for k in lever)
    want = _score(tiny, method)
    got = _score(fast, method)
    assert_close(got.matrix, want.matrix, rtol=1e-5, atol=2e-5, name=str(lever))
    if lever.get("channels_last"):
        for w in (fast.unet.conv_in.weight, fast.vae.encoder.conv_in.weight):
            assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    if lever.get("fuse_qkv"):
        procs = {type(p).__name__ for p in fast.unet.attn_processors.values()}
        assert "FusedAttnProcessor2_0" in procs


def test_load_model_takes_the_levers(tiny_dir):
    m = fastitm.load_model(tiny_dir, channels_last=True, fuse_qkv=True)
    assert m.levers == {"channels_last": True, "fuse_qkv": True, "compile": False}


def test_channels_last_by_device(tiny_dir):
    # On by default for fp32 on the CPU (faster convolutions there), off when asked and in bf16.
    assert speed.default_channels_last(torch.device("cpu"), torch.float32)
    assert not speed.default_channels_last(torch.device("cuda"), torch.bfloat16)
    assert not speed.default_channels_last(torch.device("cpu"), torch.bfloat16)
    on, off = fastitm.load_model(tiny_dir), fastitm.load_model(tiny_dir, channels_last=False)
    assert on.levers["channels_last"] and not off.levers
    assert on.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert off.unet.conv_in.weight.is_contiguous()


def test_default_dtype_by_device(tiny_dir, monkeypatch):
    assert speed.default_dtype(torch.device("cpu")) == torch.float32
    assert fastitm.load_model(tiny_dir).dtype == torch.float32  # "auto" on the CPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert speed.default_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert speed.default_dtype(torch.device("cuda")) == torch.float32


def test_cpu_batch_size_by_latent_size(tiny):
    class Fake:
        device = torch.device("cpu")

        def __init__(self, h):
            self.latent_shape = (4, h, h)

    assert [speed.default_batch_size(Fake(h)) for h in (8, 32, 64, 96, 128)] == [32, 32, 8, 3, 2]
    res = _score(tiny, batch_size=None)
    assert res.stats["batch_size"] == 32


@pytest.mark.parametrize("free_mib,per_row_mib,want", [(10_000, 30, 128), (10_000, 100, 32), (1_000, 300, 1),
                                                      (1_000, 200, 2), (1_000, 125, 4)])
def test_cuda_batch_size_fits_half_the_free_memory(free_mib, per_row_mib, want):
    MiB = 2**20
    got = speed.largest_fitting_batch(free_mib * MiB, per_row_mib * MiB, speed.CUDA_MEMORY_FRACTION,
                                      speed.CUDA_MAX_BATCH)
    assert got == want
    fits = [bs for bs in (2**i for i in range(8)) if bs * per_row_mib <= free_mib / 2]  # by enumeration
    assert got == max(fits, default=1)


@pytest.mark.gpu
def test_cuda_batch_size_probe_on_the_gpu():
    """The probe on a real device: a power of two at most the cap, cached per model, and a denoiser call
    of that many rows adds no more than the budgeted fraction of the memory that was free."""
    model = fastitm.testing.tiny_model(seed=0).to(device="cuda")
    torch.cuda.synchronize()
    free, _ = torch.cuda.mem_get_info()
    bs = speed.default_batch_size(model)
    assert bs & (bs - 1) == 0 and 1 <= bs <= speed.CUDA_MAX_BATCH
    assert model._fastitm_batch_size == bs
    cond = {k: v.expand(bs, *v.shape[1:]) for k, v in model.spec.encode_empty(model).items()}
    x = torch.zeros(bs, *model.latent_shape, device="cuda")
    t = torch.full((bs,), 500, device="cuda")
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        model.spec.forward(model.unet, x, t, cond)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= speed.CUDA_MEMORY_FRACTION * free


def test_cpu_bf16_says_what_the_cpu_lacks(tiny_dir, monkeypatch):
    monkeypatch.setattr(speed, "cpu_bf16_support", lambda: None)
    with pytest.warns(RuntimeWarning, match="AVX512-BF16 or AMX"):
        m = fastitm.load_model(tiny_dir, dtype="bf16")
    assert m.dtype == torch.bfloat16
    monkeypatch.setattr(speed, "cpu_bf16_support", lambda: "amx_bf16")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fastitm.load_model(tiny_dir, dtype="bf16")


def test_cpu_bf16_support_reads_the_flags(tmp_path, monkeypatch):
    speed.cpu_bf16_support.cache_clear()
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(fake if p == "/proc/cpuinfo" else p, *a, **k))
    try:
        assert speed.cpu_bf16_support() == "avx512_bf16"
    finally:
        speed.cpu_bf16_support.cache_clear()


def test_requirements_admit_the_cuda_machine():
    """The GPU machine has Python 3.12, torch 2.11, transformers 5.17, safetensors 0.8, peft, numpy 2.5,
    pillow, tqdm, triton 3.6: no requirement may exclude them."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert SpecifierSet(meta["requires-python"]).contains("3.12")
    there = {"torch": "2.11.0", "transformers": "5.17.0", "safetensors": "0.8.0", "numpy": "2.5.2", "pillow": "11.0",
             "tqdm": "4.67", "peft": "0.17.0", "triton": "3.6.0", "diffusers": "0.42.1", "huggingface-hub": "1.33.0"}
    reqs = [Requirement(r) for r in meta["dependencies"] + meta["optional-dependencies"]["triton"]]
    for r in reqs:
        name = re.sub(r"[-_.]+", "-", r.name).lower()
        if name in there:
            assert r.specifier.contains(there[name], prereleases=True), f"{r} excludes {name} {there[name]}"


def test_cpu_bf16_keeps_the_demo_choices_that_bf16_can_resolve():
    """The embedded model in bf16 on the CPU: the hard-negative choices of the demo's held-out images
    agree with fp32 wherever fp32's margin exceeds twice the largest bf16 score error measured here;
    the kinds the model separates clearly (colour, shape, swapped attributes) keep their accuracy.
    (Near-tie kinds, decided by differences below bf16's resolution, may move.)"""
    import warnings

    from fastitm import data, evaluate

    if fastitm.models.model.embedded_model_path() is None:
        pytest.skip("this build ships no embedded model")
    # bf16 convolutions take a slow path on a CPU without AVX512-BF16 (10x fp32 here): kept small
    examples = data.make_dataset(9, "heldout", seed=0, size=32)
    reports = {}
    for dtype in ("fp32", "bf16"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # this CPU may lack native bf16: said elsewhere
            model = fastitm.load_model(dtype=dtype)
        reports[dtype] = evaluate.hard_negatives(model, examples, method="diffusion_itm", timesteps=5, seed=0)
    assert reports["bf16"].rows and model.dtype == torch.bfloat16

    def scores(rep):
        return torch.tensor([s for r in rep.rows for s in [r["score"]] + [n["score"] for n in r["negatives"]]])

    err = (scores(reports["bf16"]) - scores(reports["fp32"])).abs().max().item()
    assert 0 < err < 0.05  # bf16 moves the scores, within its rounding of the L2 error terms (~10)
    decided = total = 0
    for r32, r16 in zip(reports["fp32"].rows, reports["bf16"].rows, strict=True):
        for n32, n16 in zip(r32["negatives"], r16["negatives"], strict=True):
            margin = r32["score"] - n32["score"]
            total += 1
            if abs(margin) > 2 * err:
                decided += 1
                assert (r16["score"] - n16["score"] > 0) == (margin > 0), (r32["caption"], n32["caption"])
    assert decided > 0.6 * total  # most choices are clear enough to be checked
    for kind in ("colour", "shape", "swap_attributes"):
        assert reports["bf16"].accuracy(kind) == reports["fp32"].accuracy(kind)


def test_compile_pays_from_the_measured_cpu_figures():
    cpu = torch.device("cpu")
    # saved = batches x 7.8% of a batch, less the padded short batches; on at twice the 9.3 batches compiling costs
    need = speed.CPU_COMPILE_PAYBACK * speed.CPU_COMPILE_COST_BATCHES
    on = next(b for b in range(1, 10_000) if b * speed.CPU_COMPILE_SAVING - 1 >= need)
    assert on == 252
    assert speed.compile_pays(cpu, on, 1)[0] and not speed.compile_pays(cpu, on - 1, 1)[0]
    assert not speed.compile_pays(cpu, on, 5)[0]  # more padding, less saved
    pays, why = speed.compile_pays(torch.device("cuda"), 10**6, 0)
    assert not pays and "CPU only" in why
    assert speed.batches_of([24, 20, 7], 10) == (3 + 2 + 1, 2)


def test_auto_compile_decides_from_the_rows_and_pads_short_batches(tiny, monkeypatch, capsys):
    """Off for a short run, the reason recorded; on when it pays (the figures patched here), and then a
    compiled denoiser, specialised to one batch shape, gets short batches padded: one compiled graph for
    calls of any row count, the same scores as the eager model."""
    model = copy.deepcopy(tiny)
    assert speed.auto_compile(model, [24], 10).startswith("off: 3 denoiser batches")
    assert not model.levers.get("compile")
    assert capsys.readouterr().err == ""  # off is recorded, not said
    graphs = []

    def counting(gm, example_inputs):  # a dynamo backend: counts each graph compiled, runs it eagerly
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(speed, "CPU_COMPILE_COST_BATCHES", 0.0)
    monkeypatch.setattr(speed, "CPU_COMPILE_SAVING", 1.0)
    monkeypatch.setattr(speed, "AUTO_COMPILE_BACKEND", counting)
    model.levers = {"channels_last": False}
    assert speed.auto_compile(model, [24], 10).startswith("on: 3 denoiser batches")
    assert model.levers == {"channels_last": False, "compile": True}
    said = capsys.readouterr().err
    assert said.count("fastitm: compile on: 3 denoiser batches") == 1 and said.count("\n") == 1
    imgs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(timesteps=3, seed=1, batch_size=10)
    got = fastitm.score(imgs, TEXTS, model=model, **kw)  # 2 x (3 texts + the empty prompt) x 3 = 24 rows: 10, 10, 4
    assert got.stats["padded_rows"] == 6 and got.stats["row_sharing"].startswith("off under torch.compile")
    compiled = len(graphs)
    assert compiled >= 1
    want = fastitm.score(imgs, TEXTS, model=tiny, **kw)
    assert_close(got.matrix, want.matrix, rtol=1e-5, atol=2e-5)
    again = fastitm.score(imgs[:1], TEXTS[:2], model=model, **kw)  # 9 rows: one short batch
    assert again.stats["padded_rows"] == 1 and len(graphs) == compiled  # nothing compiled again
    assert_close(again.matrix, fastitm.score(imgs[:1], TEXTS[:2], model=tiny, **kw).matrix, rtol=1e-5, atol=2e-5)


def test_eval_records_the_compile_decision(tiny, tmp_path):
    from fastitm.evaluate import runner
    from fastitm.testing import write_jsonl_set

    jsonl = write_jsonl_set(tmp_path, 2, seed=3)
    rep = runner.run("jsonl", jsonl, model=copy.deepcopy(tiny), timesteps=2, progress=False, compile=None)
    assert rep.stats["compile"].startswith("off: 1 denoiser batches")  # 2 items x 3 rows x 2 timesteps
    rep = runner.run("jsonl", jsonl, model=tiny, timesteps=2, progress=False, adaptive=True, compile=None)
    assert rep.stats["compile"].startswith("off: racing and elimination")


def test_a_compiler_that_fails_leaves_the_run_eager_with_a_warning(tiny):
    """The first compiled call raising (no C++ toolchain, an op the compiler lacks) must not lose the run:
    it goes on eagerly, warns naming the failure, and gives the eager scores."""
    model = copy.deepcopy(tiny)

    def broken(gm, example_inputs):
        raise RuntimeError("simulated: no C++ compiler found")

    speed.apply(model, compile=broken)
    imgs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="torch.compile of the denoiser failed .*simulated: no C\\+\\+ compiler"):
        got = fastitm.score(imgs, TEXTS, model=model, timesteps=3, seed=1, batch_size=10)
    assert "simulated" in got.stats["compile_fallback"]
    want = fastitm.score(imgs, TEXTS, model=tiny, timesteps=3, seed=1, batch_size=10)
    assert_close(got.matrix, want.matrix, rtol=1e-5, atol=2e-5)
