"""Prove every GPU path on a bare CUDA machine in one call of at most 8 minutes, and write what was seen.

Two subcommands, each run through ``make``:

- ``wheels`` (``make gpu-wheels``, on a machine with the package registry): downloads into ``.whl/``
  the wheels fastitm needs beyond what a CUDA machine with torch, Triton and transformers has
  (diffusers and the requirements it checks at import, Pillow as a Python 3.12 manylinux wheel, the
  benchmark plugin), pinned to the versions installed here, so the GPU machine runs what CI tested.
- ``run`` (``make gpu-check OUT=dir``): stages in order of value, each in its own process with a time
  budget, the whole run ending itself by ``--budget`` seconds (480 by default) and rewriting its
  report after every stage, so whatever stops it keeps what was measured:

  ====================  ==========================================================================
  install               no pip: the carried wheels the machine lacks are unpacked into a site
                        folder, fastitm is linked there (its native extension, the CPU path, is not
                        built); then the device and versions are read
  ceilings              bf16 GEMM 8192^3 and a device-to-device copy (bench/gpu_stages/)
  kernels               the fused ops at SD 2.1 and SDXL layer shapes, fp32/fp16/bf16 vs fp32
  headline              SD 2.1-base rows/s: engine (graphs on/off) vs a bare UNet loop vs the
                        reference vs a published-style per-pair loop, batch 16/32/64/128
  fused-ops             the fused ops vs SDPA + logsumexp, next to their floors
  levers                channels_last, fuse_qkv (compile only with time to spare)
  gpu-tests             ``pytest -m gpu tests`` with what is left
  ====================  ==========================================================================

  ``--budget SECONDS`` scales every stage; time a stage leaves unused passes to the next.
  ``--only`` and ``--limit`` pick stages and fix their limits (the earlier two-call form; also the
  old ``gpu-benchmarks`` stage, ``pytest -m gpu bench``, which the one-call plan leaves out).
  ``OUT`` gets three files: gpu-report.md and gpu-report.json (device, versions, every stage, test
  and figure with its conditions), then gpu-logs.tar.gz (each stage's log and raw results).

On a machine without CUDA the GPU stages are reported as skipped; the install, the stage runner and
the report still run (the dry run), which is how CI checks this file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Distributions carried as wheels: (name, why). diffusers is absent from the CUDA machine's image;
# importlib-metadata and zipp are requirements of diffusers it lacks; diffusers checks requests,
# filelock and numpy at import, so requests and its own requirements come too, used only where missing.
# Pillow is the one binary wheel (CPython 3.12, manylinux), likewise only where missing.
CARRIED = (
    ("diffusers", "the model classes; not installed on the CUDA image"),
    ("importlib-metadata", "a requirement of diffusers the CUDA image lacks"),
    ("zipp", "a requirement of importlib-metadata"),
    ("requests", "checked by diffusers at import"),
    ("urllib3", "a requirement of requests"),
    ("idna", "a requirement of requests"),
    ("charset-normalizer", "a requirement of requests"),
    ("certifi", "a requirement of requests"),
    ("filelock", "checked by diffusers at import"),
    ("pillow", "image decoding (binary: cp312 manylinux)"),
    ("pytest-benchmark", "runs the benchmarks of the gpu-benchmarks stage"),
    ("py-cpuinfo", "a requirement of pytest-benchmark"),
)
BINARY = {"pillow"}
ALWAYS_INSTALL = {"diffusers"}
NEEDS = {"pytest-benchmark": ">=4", "huggingface-hub": ">=1.32"}

# The one-call plan: (stage, seconds) in order of value, for a budget of BUDGET seconds, RESERVE of
# which is kept for the reports and the log archive. A stage may use what earlier stages left.
BUDGET = 480
RESERVE = 20
PLAN = (("install", 30), ("ceilings", 20), ("kernels", 60), ("headline", 170), ("fused-ops", 35),
        ("levers", 70), ("gpu-tests", 75))
OPTIONAL = {"gpu-benchmarks": 300}  # only with --only
# The GPU tests the other stages do not cover come first (the kernels stage already checks the fused ops
# at real shapes; their many small parametrized cases run last, with what time is left).
GPU_TESTS_FIRST = ("test_engine_gpu.py", "test_low_precision.py", "test_speed.py", "test_attention_processor.py",
                   "test_error_reduce.py", "test_cross_attention_lse_grad.py")
MEASURING = ("ceilings", "kernels", "headline", "fused-ops", "levers")  # bench/gpu_stages/, one module each
LIMITS = {**dict(PLAN), **OPTIONAL}
assert sum(s for _, s in PLAN) + RESERVE <= BUDGET


def planned_limits(budget: int = BUDGET) -> dict[str, int]:
    """Each stage's seconds for a total ``budget``: the plan scaled, the reserve kept."""
    scale = (budget - RESERVE) / (BUDGET - RESERVE)
    return {name: max(5, int(secs * scale)) for name, secs in PLAN}


@dataclass
class Stage:
    name: str
    status: str = "not run"  # passed | failed | timeout | skipped | not run
    seconds: float = 0.0
    limit_s: int = 0
    detail: str = ""
    log: str = ""


@dataclass
class Report:
    started: str
    device: str = "unknown"
    cuda: bool = False
    versions: dict = field(default_factory=dict)
    stages: list = field(default_factory=list)
    tests: list = field(default_factory=list)
    figures: list = field(default_factory=list)
    total_seconds: float = 0.0
    work: str = ""  # where the logs are (also in gpu-logs.tar.gz)


# -- wheels ------------------------------------------------------------------------------------------

def download_wheels(dest: Path, python_version: str = "3.12") -> list[Path]:
    """Download the CARRIED wheels, pinned to this environment's versions, into ``dest``: pure Python
    (``*-none-any.whl``) except BINARY, fetched for CPython ``python_version`` on manylinux x86-64."""
    from importlib.metadata import PackageNotFoundError, version

    dest.mkdir(parents=True, exist_ok=True)
    specs = {"pure": [], "binary": []}
    for name, _ in CARRIED:
        try:
            spec = f"{name}=={version(name)}"
        except PackageNotFoundError:
            spec = name
        specs["binary" if name in BINARY else "pure"].append(spec)
    base = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
            "--python-version", python_version, "-d", str(dest)]
    subprocess.run([*base, "--implementation", "py", "--abi", "none", "--platform", "any", *specs["pure"]], check=True)
    abi = "cp" + python_version.replace(".", "")
    subprocess.run([*base, "--implementation", "cp", "--abi", abi, "--platform", "manylinux2014_x86_64",
                    "--platform", "manylinux_2_28_x86_64", *specs["binary"]], check=True)
    wheels = sorted(dest.glob("*.whl"))
    impure = [w.name for w in wheels if not w.name.endswith("-none-any.whl") and _dist_of(w) not in BINARY]
    if impure:
        raise SystemExit(f"not pure-Python wheels: {impure}")
    (dest / "MANIFEST.json").write_text(json.dumps({"wheels": [w.name for w in wheels], "specs": specs,
                                                    "why": dict(CARRIED)}, indent=2))
    return wheels


def _dist_of(wheel: Path) -> str:
    return wheel.name.split("-")[0].replace("_", "-").lower()


def wheels_to_unpack(wheels_dir: Path) -> list[Path]:
    """The carried wheels this interpreter needs: diffusers always, the rest where their distribution
    is missing or older than NEEDS."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.specifiers import SpecifierSet

    wanted = []
    for w in sorted(wheels_dir.glob("*.whl")) if wheels_dir.is_dir() else []:
        dist = _dist_of(w)
        try:
            have = distribution(dist).version
        except PackageNotFoundError:
            have = None
        too_old = have is not None and dist in NEEDS and not SpecifierSet(NEEDS[dist]).contains(have, prereleases=True)
        if dist in ALWAYS_INSTALL or have is None or too_old:
            wanted.append(w)
    return wanted


def build_overlay(wheels_dir: Path, site: Path) -> list[str]:
    """The offline install without pip (whose rights and versions on a foreign image are unknown):
    unpack the wanted wheels into ``site`` and link fastitm there as the installed layout has it
    (``kernels/`` as ``fastitm.kernels``). Stages run with ``PYTHONPATH=site``. Returns what was done."""
    site.mkdir(parents=True, exist_ok=True)
    done = []
    for w in wheels_to_unpack(wheels_dir):
        with zipfile.ZipFile(w) as z:
            z.extractall(site)
        done.append(f"unpacked {w.name}")
    pkg = site / "fastitm"
    pkg.mkdir(exist_ok=True)
    for entry in (ROOT / "fastitm").iterdir():
        if entry.name == "__pycache__" or entry.name.startswith("_C"):
            continue  # the native extension is the CPU path; one built elsewhere is for another Python
        link = pkg / entry.name
        if not link.exists():
            link.symlink_to(entry)
    if not (pkg / "kernels").exists():
        (pkg / "kernels").symlink_to(ROOT / "kernels")
    done.append(f"linked fastitm from {ROOT}")
    return done


# -- running stages ------------------------------------------------------------------------------------

def run_stage(stage: Stage, cmds: list[list[str]], out: Path, env: dict | None = None,
              go_on: frozenset = frozenset()) -> Stage:
    """Run the commands in order, within the stage's time limit in all; log to out/<name>.log. An exit
    status in ``go_on`` (pytest's 1: some tests failed) marks the stage failed but runs the next command."""
    log_path = out / f"{stage.name}.log"
    start = time.monotonic()
    deadline = start + stage.limit_s
    stage.status = "passed"
    with open(log_path, "w") as log:
        for cmd in cmds:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            left = deadline - time.monotonic()
            if left <= 0:
                stage.status, stage.detail = "timeout", f"limit {stage.limit_s} s reached before: {' '.join(cmd[:4])}"
                break
            try:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=left, cwd=ROOT,
                                    env={**os.environ, **(env or {})}).returncode
            except subprocess.TimeoutExpired:
                stage.status, stage.detail = "timeout", f"limit {stage.limit_s} s reached in: {' '.join(cmd[:4])}"
                break
            if rc != 0:
                # pytest's 5: nothing collected; its 1: some tests failed (their outcomes are in the report)
                stage.status, stage.detail = "failed", f"exit {rc}: {' '.join(cmd[:4])}"
                if rc not in go_on:
                    break
    stage.seconds = round(time.monotonic() - start, 1)
    stage.log = log_path.name
    return stage


def skip(stage: Stage, why: str) -> Stage:
    stage.status, stage.detail = "skipped", why
    return stage


def probe(python: str, env: dict | None = None) -> dict:
    """Device and versions, read in a fresh process (after the install, with its ``PYTHONPATH``)."""
    code = r"""
import json, platform, sys
out = {"python": platform.python_version()}
try:
    import torch
    out["torch"] = torch.__version__
    out["cuda_runtime"] = torch.version.cuda
    out["cuda"] = torch.cuda.is_available()
    out["device"] = torch.cuda.get_device_name(0) if out["cuda"] else "no CUDA device (" + (platform.processor() or platform.machine()) + ")"
    if out["cuda"]:
        p = torch.cuda.get_device_properties(0)
        out["device_memory_gib"] = round(p.total_memory / 2**30, 1)
        out["sm_count"] = p.multi_processor_count
except Exception as e:
    out["torch"] = f"not importable: {e}"
    out["cuda"] = False
    out["device"] = "unknown"
for name in ("triton", "diffusers", "transformers", "huggingface_hub", "safetensors", "peft", "numpy", "PIL", "scipy",
             "pytest", "fastitm", "fastitm.kernels"):
    try:
        mod = __import__(name, fromlist=["_"])
        out[name] = getattr(mod, "__version__", "importable")
    except Exception as e:
        out[name] = f"not importable: {type(e).__name__}"
try:
    from fastitm.ops import native_status
    out["native_extension"] = native_status() or "built"
    import fastitm, fastitm.kernels
    out["fastitm_from"] = fastitm.__file__
    out["fastitm.kernels_from"] = fastitm.kernels.__file__
except Exception as e:
    out["native_extension"] = f"unknown: {e}"
print(json.dumps(out))
"""
    try:
        res = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, cwd="/",
                             env={**os.environ, **(env or {})})
        return json.loads(res.stdout.strip().splitlines()[-1])
    except Exception as e:  # the probe itself must never stop the report
        return {"python": platform.python_version(), "cuda": False, "device": "unknown", "probe_error": str(e)}


def junit_outcomes(path: Path, source: str) -> list[dict]:
    """Every test case of a JUnit XML file: id, outcome (passed, failed, error, skipped), seconds, message."""
    if not path.is_file():
        return []
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (el.get("message") or "")[:300]
                break
        out.append({"source": source, "id": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                    "seconds": float(case.get("time") or 0), "message": message})
    return out


def test_log_outcomes(path: Path, source: str) -> list[dict]:
    """Every test of a ``FASTITM_TEST_LOG`` file (see the root conftest): id, outcome, seconds,
    message; a test that started and has no outcome was cut off by the stage's time limit."""
    if not path.is_file():
        return []
    tests: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by the kill
            continue
        t = tests.setdefault(rec["id"], {"source": source, "id": rec["id"], "outcome": "unfinished", "seconds": 0.0,
                                         "message": "stopped at the stage's time limit"})
        if rec["event"] == "start":
            continue
        outcome = rec["outcome"]
        if rec["event"] != "call" and outcome == "failed":
            outcome = "error"  # a fixture's setup or teardown failed
        if t["outcome"] in ("unfinished", "passed"):
            t.update(outcome=outcome, message=rec.get("message", ""))
        t["seconds"] = round(t["seconds"] + rec.get("seconds", 0.0), 3)
    return list(tests.values())


def figure_log(path: Path, source: str | None = "gpu-benchmarks") -> list[dict]:
    """The figures appended to a JSON-lines log as they were measured (a line cut by a kill is dropped):
    the benchmarks' ``FASTITM_FIGURES_LOG`` (bench/conftest.py), or with ``source=None`` the measuring
    stages' log (bench/gpu_stages/), whose lines name their stage."""
    if not path.is_file():
        return []
    figures = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        figures.append({"source": source or rec.get("stage", ""), "name": rec["name"], "median_ms": None,
                        "figures": rec["figures"]})
    return figures


def benchmark_figures(path: Path) -> list[dict]:
    """The side-by-side figures the GPU benchmarks stored in pytest-benchmark's extra_info, with
    each benchmark's median time."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    figures = []
    for b in data.get("benchmarks", []):
        extra = dict(b.get("extra_info") or {})
        figures.append({"source": "gpu-benchmarks", "name": b.get("fullname") or b.get("name"),
                        "median_ms": round(1e3 * b["stats"]["median"], 3) if b.get("stats") else None,
                        "figures": extra})
    return figures


def run(out: Path, wheels: Path, python: str, limits: dict | None = None, only: set | None = None,
        work: Path | None = None, budget: int = BUDGET, smoke: bool = False) -> Report:
    """All stages in order within ``budget`` seconds; returns the report, written to ``out`` after every
    stage (gpu-report.md/json) and at the end with gpu-logs.tar.gz (the stages' logs and raw results,
    kept in ``work``: a fresh temporary folder by default, so that ``out`` holds just those three files).
    ``smoke`` runs the measuring stages on the CPU with the tiny model (CI's check that they run)."""
    t0 = time.monotonic()
    deadline = t0 + budget - RESERVE
    planned = planned_limits(budget)
    fixed = dict(limits or {})
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fastitm-gpu-check-")) if work is None else work
    work.mkdir(parents=True, exist_ok=True)
    site = work / "site"
    report = Report(started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), work=str(work))
    names = [n for n, _ in PLAN] + [n for n in OPTIONAL if only and n in only]
    stages = {n: Stage(n, limit_s=fixed.get(n, planned.get(n, OPTIONAL.get(n, 0)))) for n in names}
    report.stages = [asdict(s) for s in stages.values()]
    figures = work / "figures.jsonl"
    env = {"PYTHONUNBUFFERED": "1", "TRITON_INTERPRET": "0", "PYTHONPATH": str(site), "FASTITM_SITE": str(site),
           "FASTITM_FIGURES_LOG": str(work / "bench-figures.jsonl")}
    no_cuda = "no CUDA device on this machine"
    spent_plan = 0  # the planned seconds of the stages run so far: a stage may use what they left

    def wanted(name):
        return only is None or name in only

    def limit_for(name) -> int:
        if name in fixed:
            return fixed[name]
        left = int(deadline - time.monotonic())
        carry = int(t0 + spent_plan - time.monotonic())  # > 0 when earlier stages finished early
        return max(0, min(left, stages[name].limit_s + max(0, carry)))

    def save():
        report.stages = [asdict(s) for s in stages.values()]
        report.tests = (test_log_outcomes(work / "gpu-tests.jsonl", "gpu-tests")
                        or junit_outcomes(work / "gpu-tests.xml", "gpu-tests")
                        + junit_outcomes(work / "gpu-tests-rest.xml", "gpu-tests"))
        report.tests += (test_log_outcomes(work / "gpu-benchmarks.jsonl", "gpu-benchmarks")
                         or junit_outcomes(work / "gpu-benchmarks.xml", "gpu-benchmarks"))
        report.figures = figure_log(figures, source=None) + (benchmark_figures(work / "bench.json")
                                                   or figure_log(work / "bench-figures.jsonl"))
        report.total_seconds = round(time.monotonic() - t0, 1)
        write_report(report, out)

    for name in names:
        stage = stages[name]
        if not wanted(name):
            continue
        if name == "install":
            start = time.monotonic()
            with open(work / "install.log", "w") as log:
                try:
                    for line in build_overlay(wheels, site):
                        log.write(line + "\n")
                    report.versions = probe(python, env)
                    log.write(json.dumps(report.versions, indent=1) + "\n")
                    stage.status = "passed"
                    missing = [k for k in ("diffusers", "fastitm", "fastitm.kernels")
                               if "not importable" in str(report.versions.get(k, "not importable"))]
                    stage.detail = (f"not importable: {', '.join(missing)}" if missing else
                                    f"{len(wheels_to_unpack(wheels))} wheel(s) unpacked, fastitm linked")
                    if missing:
                        stage.status = "failed"
                    if not any(wheels.glob("*.whl")) if wheels.is_dir() else True:
                        stage.detail += f"; no wheels in {wheels} (`make gpu-wheels` where the registry is reachable)"
                except Exception as e:  # the report must still be written
                    stage.status, stage.detail = "failed", f"{type(e).__name__}: {e}"
                    log.write(stage.detail + "\n")
            stage.seconds, stage.log = round(time.monotonic() - start, 1), "install.log"
            report.device = report.versions.get("device", "unknown")
            report.cuda = bool(report.versions.get("cuda"))
        elif not report.cuda and not smoke:
            skip(stage, no_cuda)
        else:
            stage.limit_s = limit_for(name)
            if stage.limit_s < 5:
                skip(stage, f"no time left in the {budget} s budget")
            elif name in MEASURING:
                cmd = [python, str(ROOT / "bench" / "gpu_stages"), name, "--figures", str(figures),
                       "--until", str(time.time() + stage.limit_s - 3), *(["--smoke"] if smoke else [])]
                run_stage(stage, [cmd], work, env)
            elif name == "gpu-tests":
                # Two runs, the uncovered files first (pytest orders a directory's files itself, even
                # after files named before it); one JSON-lines log for both.
                first = [str(ROOT / "tests" / f) for f in GPU_TESTS_FIRST if (ROOT / "tests" / f).is_file()]
                common = [python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
                          "-c", str(ROOT / "pyproject.toml")]
                cmds = [[*common, *first, f"--junitxml={work / 'gpu-tests.xml'}"],
                        [*common, str(ROOT / "tests"), *[f"--ignore={f}" for f in first],
                         f"--junitxml={work / 'gpu-tests-rest.xml'}"]]
                run_stage(stage, cmds, work, {**env, "FASTITM_TEST_LOG": str(work / "gpu-tests.jsonl")},
                          go_on=frozenset({1, 5}))
            elif name == "gpu-benchmarks":
                cmd = [python, "-m", "pytest", "-m", "gpu", str(ROOT / "bench"), "-q", "-s", "-p", "no:cacheprovider",
                       "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"),
                       f"--junitxml={work / 'gpu-benchmarks.xml'}", f"--benchmark-json={work / 'bench.json'}"]
                run_stage(stage, [cmd], work, {**env, "FASTITM_TEST_LOG": str(work / "gpu-benchmarks.jsonl")})
        spent_plan += planned.get(name, 0)
        save()
    save()
    with tarfile.open(out / "gpu-logs.tar.gz", "w:gz") as tar:
        tar.add(work, arcname="gpu-logs", filter=lambda ti: None if ti.name.startswith("gpu-logs/site") else ti)
    return report


# -- the report ------------------------------------------------------------------------------------------

def write_report(report: Report, out: Path) -> tuple[Path, Path]:
    j = out / "gpu-report.json"
    j.write_text(json.dumps(asdict(report), indent=2))
    m = out / "gpu-report.md"
    m.write_text(render_markdown(report))
    return j, m


def render_markdown(r: Report) -> str:
    lines = [f"# fastitm GPU check, {r.started}", "", f"Device: {r.device}  ", f"Total: {r.total_seconds} s  ",
             f"Logs: each stage's log and raw results in gpu-logs.tar.gz (written in {r.work or 'the work folder'})", "",
             "## Versions", "", "| package | version |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in r.versions.items()]
    lines += ["", "## Stages", "", "| stage | status | seconds | limit (s) | detail | log |", "|---|---|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} | {s['limit_s']} | {s['detail']} | {s['log']} |"
              for s in r.stages]
    lines += ["", "## Figures (each with its conditions)", ""]
    if not r.figures:
        lines.append("none (no GPU stage ran)")
    for f in r.figures:
        lines.append(f"### [{f['source']}] {f['name']}")
        if f.get("median_ms") is not None:
            lines.append(f"- median time per benchmark round: {f['median_ms']} ms")
        for k, v in (f.get("figures") or {}).items():
            lines.append(f"- {k}: {v}")
        lines.append("")
    counts: dict[str, int] = {}
    for t in r.tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    lines += ["", "## Tests", "", ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none run", ""]
    if r.tests:
        lines += ["| test | outcome | seconds | message |", "|---|---|---|---|"]
        lines += [f"| {t['id']} | {t['outcome']} | {t['seconds']:.2f} | {t['message'].replace('|', '/')} |"
                  for t in r.tests]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wheels", help="download the carried wheels (needs the package registry)")
    w.add_argument("--dest", default=str(ROOT / ".whl"))
    r = sub.add_parser("run", help="install offline, run every GPU stage within the budget, write gpu-report.md/json")
    r.add_argument("--out", required=True)
    r.add_argument("--wheels", default=str(ROOT / ".whl"))
    r.add_argument("--python", default=sys.executable)
    r.add_argument("--budget", type=int, default=BUDGET, help=f"seconds for the whole check (default {BUDGET})")
    r.add_argument("--only", default="", help=f"comma-separated stages to run (default: {','.join(n for n, _ in PLAN)}; "
                   f"also {','.join(OPTIONAL)})")
    r.add_argument("--limit", action="append", default=[], metavar="STAGE=SECONDS",
                   help="fix a stage's time limit (repeatable)")
    r.add_argument("--smoke", action="store_true", help="run the measuring stages on the CPU with the tiny model")
    r.add_argument("--work", default=None, help="folder for the stages' logs and the offline install "
                   "(default: a fresh temporary folder, left in place for inspection)")
    args = p.parse_args(argv)
    if args.cmd == "wheels":
        for wheel in download_wheels(Path(args.dest)):
            print(wheel.name)
        return 0
    only = {x.strip() for x in args.only.split(",") if x.strip()} or None
    limits = {}
    for item in args.limit:
        name, _, secs = item.partition("=")
        if name not in LIMITS or not secs.strip().isdigit():
            p.error(f"--limit {item!r}: expected STAGE=SECONDS with STAGE one of {', '.join(LIMITS)}")
        limits[name] = int(secs)
    if only and only - set(LIMITS):
        p.error(f"--only: unknown stage(s) {', '.join(sorted(only - set(LIMITS)))}; stages: {', '.join(LIMITS)}")
    if args.budget < 60:
        p.error(f"--budget {args.budget}: at least 60 seconds")
    plan = planned_limits(args.budget)
    print(f"plan for a {args.budget} s budget: " + ", ".join(f"{n} {s} s" for n, s in plan.items())
          + f" (sum {sum(plan.values())} s, {RESERVE} s kept for the report)", flush=True)
    report = run(Path(args.out).resolve(), Path(args.wheels).resolve(), args.python, limits, only,
                 work=Path(args.work).resolve() if args.work else None, budget=args.budget, smoke=args.smoke)
    print(render_markdown(report).split("## Tests")[0][:20000])
    print(f"wrote {Path(args.out) / 'gpu-report.md'}, gpu-report.json and gpu-logs.tar.gz (logs in {report.work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
