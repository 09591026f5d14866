"""The GPU check's machinery on the CPU: the stage runner (limits, failures, later stages still run),
the install without pip (wheels unpacked, fastitm linked), the budget plan, JUnit and benchmark
parsing, a dry run that writes the report with the GPU stages skipped, and every measuring stage's
code run on the CPU with the tiny model."""

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up
spec.loader.exec_module(gpu_check)


def test_stage_runner_limits_and_failures(tmp_path):
    ok = gpu_check.run_stage(gpu_check.Stage("a", limit_s=30), [[sys.executable, "-c", "print('hi')"]], tmp_path)
    assert ok.status == "passed" and "hi" in (tmp_path / "a.log").read_text()
    slow = gpu_check.run_stage(gpu_check.Stage("b", limit_s=1), [[sys.executable, "-c", "import time; time.sleep(30)"]],
                               tmp_path)
    assert slow.status == "timeout" and slow.seconds < 10
    bad = gpu_check.run_stage(gpu_check.Stage("c", limit_s=30),
                              [[sys.executable, "-c", "raise SystemExit(3)"], [sys.executable, "-c", "print('never')"]],
                              tmp_path)
    assert bad.status == "failed" and "exit 3" in bad.detail and "never" not in (tmp_path / "c.log").read_text()


def _fake_wheel(folder: Path, dist: str, version: str) -> Path:
    w = folder / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(w, "w") as z:
        z.writestr(f"{dist.replace('-', '_')}-{version}.dist-info/METADATA", f"Name: {dist}\nVersion: {version}\n")
    return w


def test_install_unpacks_diffusers_always_and_others_when_missing_or_too_old(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    diffusers = _fake_wheel(wheels, "diffusers", "0.42.1")
    present = _fake_wheel(wheels, "pytest", "8.0.0")  # installed here: kept unless too old
    missing = _fake_wheel(wheels, "surely-not-installed-dist", "1.0")
    gpu_check.NEEDS["pytest"] = ">=999"  # as if the installed pytest were too old
    try:
        assert set(gpu_check.wheels_to_unpack(wheels)) == {diffusers, present, missing}
    finally:
        del gpu_check.NEEDS["pytest"]
    assert set(gpu_check.wheels_to_unpack(wheels)) == {diffusers, missing}
    site = tmp_path / "site"
    done = gpu_check.build_overlay(wheels, site)
    assert (site / "diffusers-0.42.1.dist-info" / "METADATA").is_file() and len(done) == 3
    # fastitm is linked as installed: kernels/ as fastitm.kernels, no native extension built elsewhere
    assert (site / "fastitm" / "kernels").resolve() == ROOT / "kernels"
    assert (site / "fastitm" / "api.py").resolve() == ROOT / "fastitm" / "api.py"
    assert not list((site / "fastitm").glob("_C*"))
    code = "import fastitm, fastitm.kernels; print(fastitm.__file__); print(*fastitm.kernels.__path__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(site)}).stdout.split()
    assert out == [str(site / "fastitm" / "__init__.py"), str(site / "fastitm" / "kernels")]


def test_plan_fits_the_budget_and_scales():
    plan = gpu_check.planned_limits()
    assert list(plan) == ["install", "ceilings", "kernels", "headline", "fused-ops", "levers", "gpu-tests"]
    assert sum(plan.values()) + gpu_check.RESERVE <= 480
    half = gpu_check.planned_limits(250)
    assert sum(half.values()) + gpu_check.RESERVE <= 250 and half["headline"] < plan["headline"]


def test_junit_and_benchmark_parsing(tmp_path):
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert 1 == 2\n"
        "@pytest.mark.skip(reason='no CUDA')\n"
        "def test_skip(): pass\n")
    xml = tmp_path / "r.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_x.py"),
                    f"--junitxml={xml}"], capture_output=True, cwd=tmp_path)
    got = {t["id"].split("::")[-1]: t for t in gpu_check.junit_outcomes(xml, "gpu-tests")}
    assert {k: v["outcome"] for k, v in got.items()} == {"test_ok": "passed", "test_bad": "failed",
                                                          "test_skip": "skipped"}
    assert "no CUDA" in got["test_skip"]["message"] and "assert" in got["test_bad"]["message"]
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"benchmarks": [{"fullname": "bench/x.py::test_y", "stats": {"median": 0.0125},
                                                 "extra_info": {"speedup": "2.10x", "shape": "B=8"}}]}))
    figs = gpu_check.benchmark_figures(bench)
    assert figs == [{"source": "gpu-benchmarks", "name": "bench/x.py::test_y", "median_ms": 12.5,
                     "figures": {"speedup": "2.10x", "shape": "B=8"}}]


def test_dry_run_writes_the_report_with_gpu_stages_skipped(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine the GPU stages run: make gpu-check")
    out = tmp_path / "out"
    assert gpu_check.main(["run", "--out", str(out), "--wheels", str(tmp_path / "no-wheels"),
                           "--work", str(tmp_path / "work")]) == 0
    printed = capsys.readouterr().out
    plan = gpu_check.planned_limits()
    assert f"plan for a 480 s budget: install {plan['install']} s" in printed
    assert f"(sum {sum(plan.values())} s, {gpu_check.RESERVE} s kept for the report)" in printed
    data = json.loads((out / "gpu-report.json").read_text())
    stages = {s["name"]: s for s in data["stages"]}
    assert stages["install"]["status"] == "passed" and "make gpu-wheels" in stages["install"]["detail"]
    for name in ("ceilings", "kernels", "headline", "fused-ops", "levers", "gpu-tests"):
        assert stages[name]["status"] == "skipped" and "no CUDA" in stages[name]["detail"]
    assert data["cuda"] is False and data["versions"]["torch"] == torch.__version__
    assert data["versions"]["fastitm.kernels"] == "importable"
    assert data["versions"]["fastitm_from"].startswith(data["work"])  # the linked copy, not an installed one
    md = (out / "gpu-report.md").read_text()
    assert "| gpu-tests | skipped |" in md and "| install | passed |" in md and torch.__version__ in md
    # OUT holds three files (what a machine hands back may be limited in number); the logs are packed
    assert sorted(p.name for p in out.iterdir()) == ["gpu-logs.tar.gz", "gpu-report.json", "gpu-report.md"]
    import tarfile

    with tarfile.open(out / "gpu-logs.tar.gz") as tar:
        names = tar.getnames()
        log = tar.extractfile("gpu-logs/install.log").read().decode()
    assert "linked fastitm" in log and not any(n.startswith("gpu-logs/site") for n in names)


def test_measuring_stages_run_on_the_cpu(tmp_path):
    """--smoke: every measuring stage's code runs (tiny model, small shapes; here in this process), each
    figure is logged as it is measured and reaches the report; CI's guard for the one GPU call."""
    spec = importlib.util.spec_from_file_location("gpu_stages", ROOT / "bench" / "gpu_stages" / "__main__.py")
    stages = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stages)
    figures = tmp_path / "figures.jsonl"
    import time

    for name in ("ceilings", "kernels", "headline", "fused-ops", "levers"):
        stages.STAGES[name](stages.Ctx(name, figures, time.time() + 300, smoke=True))
    got = gpu_check.figure_log(figures, source=None)
    names = {(f["source"], f["name"]) for f in got}
    for want in [("ceilings", "bf16 GEMM ceiling"), ("kernels", "kernels summary"),
                 ("headline", "engine vs bare UNet loop, batch 8"), ("headline", "per-pair loop, published scripts' style"),
                 ("fused-ops", "error_reduce vs PyTorch row norms"), ("levers", "lever fuse_qkv"),
                 ("fused-ops", "cross_attention_lse backward, SD 2.1 layer 2x64")]:
        assert want in names, sorted(names)
    by_name = {f["name"]: f["figures"] for f in got}
    assert by_name["kernels summary"]["failures"] == 0
    tiles = by_name["cross_attention_lse forward per tile, SD 2.1 layer 2x64"]  # every autotune candidate timed
    assert len([k for k in tiles if k.endswith("_ms")]) == 5 and all(
        v > 0 for k, v in tiles.items() if k.endswith("_ms"))
    enc = by_name["encoders alone"]  # the engine's extra time over the bare loop, split
    assert enc["vae_encode_s"] > 0 and enc["text_encode_s"] > 0 and enc["vae_dtype"] == "torch.float32"
    busy = by_name["device busy, engine vs bare loop, batch 8"]  # on the CPU: its top-level ops
    assert "error" not in busy, busy["error"]
    assert 0 < busy["engine_busy_fraction"] <= 1.0 and 0 < busy["bare_unet_loop_busy_fraction"] <= 1.0
    # the union of intervals, by hand: [0, 3] and [2, 5] overlap (5), [7, 8] apart (1), [7.5, 7.6] inside
    import stages_common  # bench/gpu_stages/stages_common.py, on the path the stages' __main__ put it

    assert stages_common.busy_seconds([(7, 8), (0, 3), (2, 5), (7.5, 7.6)]) == 6
    bwd = by_name["cross_attention_lse backward, SD 2.1 layer 2x64"]  # timed next to its floors
    assert bwd["fused_bwd_ms"] > 0 and bwd["bytes_floor_ms"] > 0 and bwd["flops_floor_ms"] > 0
    # the engine computes the reference's numbers on the rows both ran
    ref = by_name["fastitm.reference (per pair and timestep, batch 1, stock attention)"]
    assert ref["engine_vs_reference_max_abs_score_diff"] <= 1e-5 * max(1.0, ref["score_scale"])
    report = gpu_check.Report(started="now", figures=got)
    assert "### [headline] engine vs bare UNet loop, batch 8" in gpu_check.render_markdown(report)
    # a stage out of time records what it skipped instead of running over
    stages.STAGES["fused-ops"](stages.Ctx("fused-ops", figures, time.time() + 1, smoke=True))
    assert any(f["name"].startswith("skipped: fused vs sdpa") for f in gpu_check.figure_log(figures, source=None))


def test_outcomes_survive_a_stage_killed_at_its_limit(tmp_path):
    """The root conftest logs each test as it ends; a run killed mid-test keeps every earlier outcome
    and names the test it was in, where the JUnit file is never written."""
    (tmp_path / "test_x.py").write_text(
        "import time, pytest\n"
        "@pytest.fixture\n"
        "def broken(): raise RuntimeError('no device')\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert 1 == 2\n"
        "@pytest.mark.skip(reason='no CUDA')\n"
        "def test_skip(): pass\n"
        "def test_fixture(broken): pass\n"
        "def test_hang(): time.sleep(60)\n"
        "def test_never(): pass\n")
    stage = gpu_check.Stage("gpu-tests", limit_s=8)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
           str(tmp_path / "test_x.py"), f"--junitxml={tmp_path / 'r.xml'}"]
    env = {"FASTITM_TEST_LOG": str(tmp_path / "log.jsonl"), "PYTHONPATH": str(ROOT)}
    gpu_check.run_stage(stage, [cmd], tmp_path, env)
    assert stage.status == "timeout" and not (tmp_path / "r.xml").exists()
    got = {t["id"].split("::")[-1]: t for t in gpu_check.test_log_outcomes(tmp_path / "log.jsonl", "gpu-tests")}
    assert {k: v["outcome"] for k, v in got.items()} == {
        "test_ok": "passed", "test_bad": "failed", "test_skip": "skipped", "test_fixture": "error",
        "test_hang": "unfinished"}
    assert "no CUDA" in got["test_skip"]["message"] and "no device" in got["test_fixture"]["message"]
    assert "assert 1 == 2" in got["test_bad"]["message"]
    assert "time limit" in got["test_hang"]["message"]


def test_figures_logged_as_each_benchmark_ends(tmp_path):
    log = tmp_path / "figures.jsonl"
    log.write_text(json.dumps({"name": "bench/x.py::test_y", "figures": {"speedup": 2.1}}) + "\n" + '{"name": "cut')
    assert gpu_check.figure_log(log) == [{"source": "gpu-benchmarks", "name": "bench/x.py::test_y",
                                          "median_ms": None, "figures": {"speedup": 2.1}}]


def test_chosen_stages_and_limits_from_the_command_line(tmp_path):
    """A machine whose commands may run 10 minutes takes the check in two calls: --only picks stages,
    --limit overrides a stage's limit; the other stages are reported as not run."""
    out = tmp_path / "out"
    # ceilings, not install: with no CUDA it is skipped at once (install takes a subprocess; the dry run
    # test covers it)
    assert gpu_check.main(["run", "--out", str(out), "--wheels", str(tmp_path), "--only", "ceilings",
                           "--limit", "ceilings=50", "--work", str(tmp_path / "work")]) == 0
    stages = {s["name"]: s for s in json.loads((out / "gpu-report.json").read_text())["stages"]}
    assert stages["ceilings"]["status"] == "skipped" and stages["ceilings"]["limit_s"] == 50
    assert stages["install"]["limit_s"] == gpu_check.planned_limits()["install"]
    assert {stages[n]["status"] for n in ("install", "headline", "gpu-tests")} == {"not run"}
    assert "gpu-benchmarks" not in stages  # the old benchmark stage runs only when asked for
    for bad in (["--only", "install,nope"], ["--limit", "install=soon"], ["--limit", "nope=5"], ["--budget", "10"]):
        with pytest.raises(SystemExit):
            gpu_check.main(["run", "--out", str(out), *bad])
