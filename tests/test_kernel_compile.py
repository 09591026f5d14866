"""Every Triton kernel compiled for Hopper (sm_90) and Ampere (sm_80) without a GPU: the autotune
candidates and the fixed configurations the launchers may pick, in the dtypes they serve, at the Stable
Diffusion shapes. bf16 stands for both half types (the same code; equal registers in the full table). A
compile error, a spill to local memory, shared memory over the target's limit or a half-precision matrix
kernel without tensor-core instructions fails. ``python -m fastitm.kernels.report --quick`` runs in a
subprocess (the test session runs Triton interpreted, which cannot compile; fp32 for sm_90 only, head
dim 64 only); its full table, with the fp32 backward, fp16 and SD 1.x's wider heads, is in
bench/RESULTS.md."""

import json
import os
import subprocess
import sys

import pytest

report = pytest.importorskip("fastitm.kernels.report")


def compile_report(tmp_path, args, env=()):
    """``python -m fastitm.kernels.report --quick --jobs 2 ARGS`` in a subprocess (the test session runs
    Triton interpreted): (its JSON, its rows, the finished process)."""
    out = tmp_path / "rows.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache"), **dict(env)}
    res = subprocess.run([sys.executable, "-m", "fastitm.kernels.report", *args, "--quick", "--jobs", "2", "--json",
                          str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert out.is_file(), res.stdout[-2000:] + res.stderr[-2000:]
    got = json.loads(out.read_text())
    return got, [report.Row(**r) for r in got["rows"]], res


def assert_rows_sound(rows, res):
    """No spill, shared memory within the limit, tensor cores in half-precision attention, at least two
    programs per SM for sm_90 attention (one cannot hide memory latency: such tiles are dropped), and
    the default tiles at four programs per SM."""
    for r in rows:
        assert report.problems(r) == [], r
        assert r.registers > 0 and r.programs_per_sm >= 1, r
        if r.target == "sm_90" and r.kernel.startswith("cross_attention"):
            assert r.programs_per_sm >= 2, r
        if r.kernel.startswith("cross_attention") and r.dtype != "fp32":
            assert r.mma in ("HGMMA", "HMMA"), r
    assert_default_tiles_fit_four_programs(rows)
    assert res.returncode == 0, res.stdout[-2000:]


def test_every_kernel_compiles_for_sm90_and_sm80_without_spills(tmp_path):
    try:
        report.cuobjdump()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    _, rows, res = compile_report(tmp_path, ["--target", "90", "80"])
    for target in ("sm_90", "sm_80"):
        kinds = {(r.kernel, r.dtype) for r in rows if r.target == target}
        assert ("cross_attention_lse_fwd", "bf16") in kinds and ("cross_attention_lse_bwd", "bf16") in kinds, target
        assert ("error_reduce", "bf16") in kinds, target
    assert ("cross_attention_lse_fwd", "fp32") in {(r.kernel, r.dtype) for r in rows if r.target == "sm_90"}
    assert_rows_sound(rows, res)


def test_kernels_compile_with_the_gpu_machines_triton(tmp_path):
    # The GPU machine runs Triton 3.6.0 (`make test` installs it beside the environment's own, in
    # $FASTITM_TRITON_GPU): the same checks for sm_90 in half precision, where registers differ most
    # between the two versions (BLOCK_M 64, 4 warps: 127 here, 204 there, uncapped).
    folder = os.environ.get("FASTITM_TRITON_GPU")
    if not folder or not os.path.isdir(os.path.join(folder, "triton")):
        pytest.skip("no second Triton: FASTITM_TRITON_GPU names no folder holding one (`make test` installs 3.6.0)")
    path = os.pathsep.join([os.path.abspath(folder), os.environ.get("PYTHONPATH", "")])
    got, rows, res = compile_report(tmp_path, ["--target", "90", "--dtype", "bf16"], {"PYTHONPATH": path})
    assert got["triton"] == os.path.basename(os.path.abspath(folder)).removeprefix("triton-"), got["triton"]
    assert {r.kernel for r in rows} >= {"cross_attention_lse_fwd", "cross_attention_lse_bwd", "error_reduce"}
    assert {r.target for r in rows} == {"sm_90"}
    assert_rows_sound(rows, res)


def assert_default_tiles_fit_four_programs(rows):
    """The tiles the launchers use without autotuning, in half precision at head dim 64, compile within
    128 registers without spilling: four programs per SM on sm_90 (ptxas alone took 204-254, two)."""
    import torch

    from fastitm.kernels import cross_attention_lse as cal

    for kernel, config in (("cross_attention_lse_fwd", cal.fwd_default(64, torch.bfloat16)),
                           ("cross_attention_lse_bwd", cal.bwd_config(64, torch.bfloat16))):
        row, = [r for r in rows if r.kernel == kernel and r.dtype == "bf16" and r.target == "sm_90"
                and r.head_dim_block == 64 and r.config == report._label(*config)]
        assert row.registers <= 128 and row.local_bytes == 0 and row.programs_per_sm >= 4, row


def test_programs_per_sm_by_hand():
    # 214 registers: ceil(214 * 32 / 256) * 256 = 6912 per warp, x 4 warps = 27648 -> 65536 // 27648 = 2
    assert report.programs_per_sm(90, 214, 49152, 4) == 2
    assert report.programs_per_sm(90, 32, 100 * 1024, 4) == 2  # shared memory: 2 x 100 KB in 228 KB
    assert report.programs_per_sm(90, 32, 1024, 8) == 8  # warps: 64 per SM, 8 per program
    bad = report.Row("cross_attention_lse_fwd", "x", "bf16", "sm_90", 64, 100, 300 * 1024, 64, "none", 1, 0.0)
    assert len(report.problems(bad)) == 3
