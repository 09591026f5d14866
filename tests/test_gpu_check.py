"""The GPU check's machinery on the CPU: the stage runner (limits, failures, later stages still run),
the offline install's choice of wheels, JUnit and benchmark parsing, and a dry run that writes the
report with the GPU stages skipped."""

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


def test_install_takes_diffusers_always_and_others_when_missing_or_too_old(tmp_path):
    diffusers = _fake_wheel(tmp_path, "diffusers", "0.42.1")
    present = _fake_wheel(tmp_path, "pytest", "8.0.0")  # installed here: kept unless too old
    missing = _fake_wheel(tmp_path, "surely-not-installed-dist", "1.0")
    old_enough = _fake_wheel(tmp_path, "setuptools", "99.0")  # installed here is >= 77: kept
    gpu_check.NEEDS["pytest"] = ">=999"  # as if the installed pytest were too old
    try:
        cmds = gpu_check.install_command(tmp_path, "python3")
    finally:
        del gpu_check.NEEDS["pytest"]
    first = cmds[0]
    assert "--no-index" in first and "--no-deps" in first
    assert str(diffusers) in first and str(missing) in first and str(present) in first
    assert str(old_enough) not in first
    assert gpu_check.install_command(tmp_path, "python3")[0].count(str(present)) == 0
    assert cmds[-1][-2:] == ["-e", str(ROOT)] and "--no-build-isolation" in cmds[-1] and "--no-index" in cmds[-1]


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


def test_dry_run_writes_the_report_with_gpu_stages_skipped(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine the GPU stages run: make gpu-check")
    out = tmp_path / "out"
    report = gpu_check.run(out, tmp_path / "no-wheels", sys.executable)
    stages = {s["name"]: s for s in report.stages}
    assert stages["install"]["status"] == "skipped" and "make gpu-wheels" in stages["install"]["detail"]
    assert stages["imports"]["status"] == "passed"
    for name in ("gpu-tests", "gpu-benchmarks", "sd21-scoring"):
        assert stages[name]["status"] == "skipped" and "no CUDA" in stages[name]["detail"]
    data = json.loads((out / "gpu-report.json").read_text())
    assert data["cuda"] is False and data["versions"]["torch"] == torch.__version__
    assert data["versions"]["diffusers"] != "" and "not importable" not in data["versions"]["fastitm"]
    md = (out / "gpu-report.md").read_text()
    assert "| gpu-tests | skipped |" in md and "| imports | passed |" in md and torch.__version__ in md
    # OUT holds three files (what a machine hands back may be limited in number); the logs are packed
    assert sorted(p.name for p in out.iterdir()) == ["gpu-logs.tar.gz", "gpu-report.json", "gpu-report.md"]
    import tarfile

    with tarfile.open(out / "gpu-logs.tar.gz") as tar:
        log = tar.extractfile("gpu-logs/imports.log").read().decode()
    assert "ok" in log and data["work"] in md


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
    assert gpu_check.main(["run", "--out", str(out), "--wheels", str(tmp_path), "--only", "imports",
                           "--limit", "imports=50"]) == 0
    stages = {s["name"]: s for s in json.loads((out / "gpu-report.json").read_text())["stages"]}
    assert stages["imports"]["status"] == "passed" and stages["imports"]["limit_s"] == 50
    assert {stages[n]["status"] for n in ("install", "gpu-tests", "gpu-benchmarks", "sd21-scoring")} == {"not run"}
    for bad in (["--only", "imports,nope"], ["--limit", "imports=soon"], ["--limit", "nope=5"]):
        with pytest.raises(SystemExit):
            gpu_check.main(["run", "--out", str(out), *bad])
