"""The launch-configuration tuner (kernels/_tuning.py): it runs on CUDA only, so here the timer is
stubbed and the tuned launchers run under the interpreter. The winner is the fastest candidate,
timed once per shape key; failing candidates are skipped; and timing the candidates never touches
the caller's outputs (the error reduction accumulates scores in place)."""

import pytest
import torch

from fastitm.kernels import _tuning
from fastitm.ops import cross_attention_lse, cross_attention_lse_ref, error_reduce, error_reduce_ref
from fastitm.testing import assert_close


def test_enabled_only_on_cuda_and_not_when_switched_off(monkeypatch):
    monkeypatch.delenv("FASTITM_AUTOTUNE", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _tuning.enabled(torch.device("cpu"))
    assert _tuning.enabled(torch.device("cuda"))
    monkeypatch.setenv("FASTITM_AUTOTUNE", "0")
    assert not _tuning.enabled(torch.device("cuda"))
    monkeypatch.setenv("FASTITM_AUTOTUNE", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not _tuning.enabled(torch.device("cuda"))


def test_pick_the_fastest_once_per_key_skipping_failures(monkeypatch):
    monkeypatch.setattr(_tuning, "_best", {})
    cost = {"a": 3.0, "b": 1.0, "c": None, "d": 2.0}  # None: fails to launch
    runs = []

    def run(config):
        runs.append(config)
        if cost[config] is None:
            raise RuntimeError("out of resources")

    monkeypatch.setattr(_tuning, "_time", lambda fn: (fn(), cost[runs[-1]])[1])
    assert _tuning.pick(("k", 1), list(cost), run) == "b"
    assert runs == ["a", "b", "c", "d"]
    assert _tuning.pick(("k", 1), list(cost), run) == "b" and len(runs) == 4  # cached
    assert _tuning.chosen() == {("k", 1): "b"}

    def broken(config):
        raise RuntimeError("no candidate compiles")

    assert _tuning.pick(("k", 2), ["x", "y"], broken) == "x"  # its launch then raises the real error


@pytest.fixture
def tuned(triton_interpret, monkeypatch):
    """Tuning switched on under the interpreter, the timer stubbed: each candidate still runs (on the
    launcher's scratch buffers), and the last candidate of each key wins."""
    monkeypatch.setattr(_tuning, "_best", {})
    monkeypatch.setattr(_tuning, "enabled", lambda device: True)
    counter = iter(range(10**6, 0, -1))
    monkeypatch.setattr(_tuning, "_time", lambda fn: (fn(), next(counter))[1])
    return _tuning


def test_tuned_error_reduce_leaves_the_outputs_to_the_real_launch(tuned):
    N, M, T, F = 2, 3, 2, 300
    rows = torch.tensor([(i, j, k) for i in range(N) for k in range(T) for j in range(-1, M)])
    ri, rj, rk = rows.unbind(1)
    pred, target = torch.randn(len(ri), F), torch.randn(T, F)
    outs = [torch.zeros(N, T), torch.zeros(N, M, T), torch.zeros(N, M)]
    want = [torch.zeros(N, T), torch.zeros(N, M, T), torch.zeros(N, M)]
    error_reduce(pred, target, rk, ri, rj, rk, *outs, backend="triton")
    error_reduce_ref(pred, target, rk, ri, rj, rk, *want, "l2", True)
    for got, exp in zip(outs, want, strict=True):
        assert_close(got, exp, rtol=1e-5, atol=1e-5)  # once, not once per candidate
    (key, config), = tuned.chosen().items()
    assert key[0] == "error_reduce" and config == (512, 8)  # the last candidate timed (fastest here)


def test_tuned_cross_attention_matches_the_reference(tuned):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 40, generator=g) for n in (37, 77, 77))
    out, pooled = cross_attention_lse(q, k, v, pool="probs", lam=1.5, backend="triton")
    want_out, want_pooled = cross_attention_lse_ref(q, k, v, pool="probs", lam=1.5)
    assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    assert_close(pooled, want_pooled, rtol=1e-5, atol=1e-5)
    from fastitm.kernels.cross_attention_lse import fwd_candidates

    (key, config), = tuned.chosen().items()
    # the last candidate timed (fastest here) of fp32's list for head dim 40 (BLOCK_D 64)
    assert key[0] == "cross_attention_lse_fwd" and config == fwd_candidates(64, torch.float32)[-1] == (64, 8, None)
