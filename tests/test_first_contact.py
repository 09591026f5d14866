"""Safe first contact with an untested GPU, driven on the CPU by simulated failures.

Under ``backend="auto"`` the first use of each Triton kernel (per device and dtype) compiles it and
checks it against the reference; a failure warns once and the reference runs. ``backend="triton"``
raises instead. A CUDA graph capture that fails warns and the denoiser runs eagerly. Here the
interpreter stands in for the GPU: ``_preferred`` is patched so "auto" prefers Triton on the CPU."""

import warnings

import pytest
import torch

import fastitm
from fastitm.ops import _backend, cross_attention_lse, error_reduce
from fastitm.ops.cross_attention_lse import cross_attention_lse_ref
from fastitm.testing import assert_close


@pytest.fixture
def triton_first(triton_interpret, monkeypatch):
    monkeypatch.setattr(_backend, "_preferred", lambda device_type: "triton")
    _backend.reset_first_contact()
    yield
    _backend.reset_first_contact()


def _qkv():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 2, 9, 16, generator=g), torch.randn(2, 2, 5, 16, generator=g), torch.randn(2, 2, 5, 16, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_working_kernels_pass_their_first_check(triton_first, dtype):
    # bf16 is the default dtype on CUDA: a self-check too strict for it would silently cost the kernels.
    x = torch.empty(0, dtype=dtype)
    assert _backend.choose("auto", [x], "cross_attention_lse") == "triton"
    assert _backend.choose("auto", [x], "error_reduce") == "triton"
    assert _backend.choose("auto", [x], "fastitm.score") == "triton"
    assert set(_backend._first_contact.values()) == {None}


def test_compile_failure_falls_back_once_and_explicit_triton_raises(triton_first, monkeypatch):
    import fastitm.kernels.cross_attention_lse as kernel

    def broken(*args, **kwargs):
        raise RuntimeError("simulated: PTX assembly failed for sm_90")

    monkeypatch.setattr(kernel, "cross_attention_lse_fwd", broken)
    q, k, v = _qkv()
    with pytest.warns(RuntimeWarning, match=r"failed its first check.*simulated: PTX assembly failed"):
        out, pooled = cross_attention_lse(q, k, v, backend="auto")
    want_out, want_pooled = cross_attention_lse_ref(q, k, v, 16 ** -0.5, "logits", 1.0, None)
    assert_close(out, want_out, rtol=1e-6, atol=1e-6)
    assert_close(pooled, want_pooled, rtol=1e-6, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: silent now
        cross_attention_lse(q, k, v, backend="auto")
    with pytest.raises(RuntimeError, match="simulated"):
        cross_attention_lse(q, k, v, backend="triton")
    # the other kernel is unaffected
    assert _backend.choose("auto", [q], "error_reduce") == "triton"


def test_wrong_numbers_fall_back(triton_first, monkeypatch):
    import fastitm.kernels.error_reduce as kernel

    real = kernel.error_reduce_fwd

    def off_by_a_bit(*args, **kwargs):
        return real(*args, **kwargs) * 1.01  # compiles and runs, but is wrong

    monkeypatch.setattr(kernel, "error_reduce_fwd", off_by_a_bit)
    pred, target = torch.randn(4, 64), torch.randn(2, 64)
    rows = [torch.tensor(r) for r in ([0, 1, 0, 1], [0, 0, 1, 1], [-1, 0, -1, 0], [0, 0, 1, 1])]
    uncond = torch.zeros(2, 2)
    with pytest.warns(RuntimeWarning, match=r"error_reduce.*differ from the reference"):
        e = error_reduce(pred, target, *rows, uncond, backend="auto")
    assert_close(e, (pred - target[rows[0]]).norm(dim=1), rtol=1e-6, atol=1e-6)


def test_engine_runs_on_the_reference_when_a_kernel_fails(triton_first, monkeypatch, tiny):
    import fastitm.kernels.cross_attention_lse as kernel

    monkeypatch.setattr(kernel, "cross_attention_lse_fwd", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("simulated: out of shared memory")))
    imgs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="out of shared memory"):
        res = fastitm.score(imgs, ["a red dog", "a cat"], model=tiny, method="discffusion", timesteps=2, backend="auto")
    assert res.backend == "reference"
    ref = fastitm.reference.score(imgs, ["a red dog", "a cat"], model=tiny, method="discffusion", plan=res.plan)
    assert_close(res.matrix, ref.matrix, rtol=1e-5, atol=1e-6)


def test_failed_graph_capture_runs_eagerly(tiny, monkeypatch):
    from fastitm.engine.cuda_graphs import UNetRunner

    runner = UNetRunner(tiny.unet, None, bucket=4, use_graph=False)
    runner.use_graph = True  # as on CUDA

    def capture_fails(*args):
        raise RuntimeError("simulated: operation not permitted when stream is capturing")

    monkeypatch.setattr(runner, "_capture", capture_fails)
    x, t, cond = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900]), torch.randn(3, 77, 32)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed.*not permitted"):
        pred, pooled = runner(x, t, cond)
    with torch.no_grad():
        want = tiny.unet(x, t, encoder_hidden_states=cond).sample
    assert_close(pred, want, rtol=1e-6, atol=1e-6)
    assert not runner.use_graph and "not permitted" in runner.fallback
    pred2, _ = runner(x, t, cond)  # later batches: eager, no second warning or capture
    assert_close(pred2, want, rtol=1e-6, atol=1e-6)


def test_engine_reports_the_graph_fallback(tiny, monkeypatch):
    import fastitm.engine.engine as engine
    from fastitm.engine.cuda_graphs import UNetRunner

    class CaptureFails(UNetRunner):
        def __init__(self, *args, use_graph, **kwargs):
            super().__init__(*args, use_graph=False, **kwargs)
            self.use_graph = True

        def _capture(self, *args):
            raise RuntimeError("simulated capture failure")

    monkeypatch.setattr(engine, "graphs_enabled", lambda device: True)
    monkeypatch.setattr(engine, "UNetRunner", CaptureFails)
    imgs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="simulated capture failure"):
        res = fastitm.score(imgs, ["a red dog", "a cat"], model=tiny, timesteps=2)
    assert res.stats["cuda_graphs"] is False and "simulated" in res.stats["cuda_graph_fallback"]
    ref = fastitm.reference.score(imgs, ["a red dog", "a cat"], model=tiny, plan=res.plan)
    assert_close(res.matrix, ref.matrix, rtol=1e-5, atol=2e-5)
