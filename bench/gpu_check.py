"""Prove every GPU path on a bare CUDA machine in one command, and write what was seen.

Two subcommands, each run through ``make``:

- ``wheels`` (``make gpu-wheels``, on a machine with the package registry): downloads into ``.whl/``
  the pure-Python wheels fastitm needs beyond what a CUDA machine with torch, Triton, transformers
  and safetensors already has (diffusers and its one missing requirement, and the benchmark plugin),
  pinned to the versions installed here, so the GPU machine runs what CI tested.
- ``run`` (``make gpu-check OUT=dir``): stages, each in its own process with its own time limit, so
  one failure or hang does not stop the rest: the offline install (``pip install --no-index`` from
  ``.whl/``, then fastitm built with its native extension), an import check, ``pytest -m gpu tests``,
  the GPU benchmarks, and a scoring run of the SD 2.1-base architecture (random weights) in bf16 with
  and without CUDA graphs. It writes three files to ``OUT``: ``gpu-report.json`` and ``gpu-report.md``
  (the device, the versions, every stage's outcome, every test's outcome, every figure with its
  conditions) and ``gpu-logs.tar.gz`` (each stage's log and raw results). Tests and figures are
  logged as they finish, so a stage stopped at its time limit keeps what it reached and names the
  test it was in.

On a machine without CUDA the GPU stages are reported as skipped; the install, the stage runner and
the report writer still run, which is how CI checks this file.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Distributions carried as wheels: (name, why). diffusers is absent from the CUDA machine's image;
# importlib-metadata is diffusers' one requirement it lacks. pytest-benchmark (and py-cpuinfo) run the
# benchmarks, setuptools and pybind11 build the native extension; they are there today, carried so an
# image without them, or with versions older than fastitm's build needs (NEEDS), still works. A carried
# wheel is installed only where its distribution is missing or too old, except diffusers, always ours.
CARRIED = (
    ("diffusers", "the model classes; not installed on the CUDA image"),
    ("importlib-metadata", "a requirement of diffusers the CUDA image lacks"),
    ("zipp", "a requirement of importlib-metadata"),
    ("pytest-benchmark", "runs the benchmarks"),
    ("py-cpuinfo", "a requirement of pytest-benchmark"),
    ("setuptools", "builds fastitm (PEP 639 license metadata needs setuptools >= 77)"),
    ("pybind11", "builds the native extension"),
)
ALWAYS_INSTALL = {"diffusers"}
NEEDS = {"setuptools": ">=77", "pybind11": ">=2.12", "pytest-benchmark": ">=4"}

# Stage time limits (seconds): together within 20 minutes on one H100, install included.
LIMITS = {"install": 240, "imports": 60, "gpu-tests": 420, "gpu-benchmarks": 300, "sd21-scoring": 180}


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
    """Download the CARRIED wheels, pinned to this environment's versions, into ``dest``; every one
    must be pure Python (``*-none-any.whl``), since the GPU machine may differ in platform."""
    from importlib.metadata import PackageNotFoundError, version

    dest.mkdir(parents=True, exist_ok=True)
    specs = []
    for name, _ in CARRIED:
        try:
            specs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            specs.append(name)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "py", "--abi", "none", "--platform", "any",
           "-d", str(dest), *specs]
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("*.whl"))
    impure = [w.name for w in wheels if not w.name.endswith("-none-any.whl")]
    if impure:
        raise SystemExit(f"not pure-Python wheels: {impure}")
    (dest / "MANIFEST.json").write_text(json.dumps({"wheels": [w.name for w in wheels], "specs": specs,
                                                    "why": dict(CARRIED)}, indent=2))
    return wheels


def _dist_of(wheel: Path) -> str:
    return wheel.name.split("-")[0].replace("_", "-").lower()


def install_command(wheels_dir: Path, python: str) -> list[list[str]]:
    """The offline install: the carried wheels a machine lacks, then fastitm with its native extension."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.specifiers import SpecifierSet

    wanted = []
    for w in sorted(wheels_dir.glob("*.whl")):
        dist = _dist_of(w)
        try:
            have = distribution(dist).version
        except PackageNotFoundError:
            have = None
        too_old = have is not None and dist in NEEDS and not SpecifierSet(NEEDS[dist]).contains(have, prereleases=True)
        if dist in ALWAYS_INSTALL or have is None or too_old:
            wanted.append(str(w))
    cmds = []
    if wanted:
        cmds.append([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--upgrade", *wanted])
    cmds.append([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation", "-e",
                 str(ROOT)])
    return cmds


# -- running stages ------------------------------------------------------------------------------------

def run_stage(stage: Stage, cmds: list[list[str]], out: Path, env: dict | None = None) -> Stage:
    """Run the commands in order, within the stage's time limit in all; log to out/<name>.log."""
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
                break
    stage.seconds = round(time.monotonic() - start, 1)
    stage.log = log_path.name
    return stage


def skip(stage: Stage, why: str) -> Stage:
    stage.status, stage.detail = "skipped", why
    return stage


def probe(python: str) -> dict:
    """Device and versions, read in a fresh process (after the install)."""
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
for name in ("triton", "diffusers", "transformers", "safetensors", "peft", "fastitm"):
    try:
        out[name] = __import__(name).__version__
    except Exception as e:
        out[name] = f"not importable: {type(e).__name__}"
try:
    from fastitm.ops import native_status
    out["native_extension"] = native_status() or "built"
except Exception as e:
    out["native_extension"] = f"unknown: {e}"
print(json.dumps(out))
"""
    try:
        res = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
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


def figure_log(path: Path) -> list[dict]:
    """The figures the benchmarks appended to ``FASTITM_FIGURES_LOG`` (bench/conftest.py)."""
    if not path.is_file():
        return []
    figures = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        figures.append({"source": "gpu-benchmarks", "name": rec["name"], "median_ms": None, "figures": rec["figures"]})
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
        work: Path | None = None) -> Report:
    """All stages in order; returns the report, written to ``out`` as gpu-report.md/json and
    gpu-logs.tar.gz (the stages' logs and raw results, kept in ``work``: a fresh temporary folder by
    default, so that ``out`` holds just those three files)."""
    limits = {**LIMITS, **(limits or {})}
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fastitm-gpu-check-")) if work is None else work
    work.mkdir(parents=True, exist_ok=True)
    report = Report(started=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    t0 = time.monotonic()
    stages = {name: Stage(name, limit_s=limits[name]) for name in LIMITS}

    def wanted(name):
        return only is None or name in only

    if wanted("install"):
        if not wheels.is_dir() or not any(wheels.glob("*.whl")):
            skip(stages["install"], f"no wheels in {wheels}: run `make gpu-wheels` where the registry is reachable")
        else:
            run_stage(stages["install"], install_command(wheels, python), work)
    versions = probe(python)
    report.versions = versions
    report.device = versions.get("device", "unknown")
    report.cuda = bool(versions.get("cuda"))
    if wanted("imports"):
        run_stage(stages["imports"], [[python, "-c", "import fastitm, diffusers, transformers, fastitm.cli; "
                                       "fastitm.testing.tiny_model(0); print('ok')"]], work)
    no_cuda = "no CUDA device on this machine"
    env = {"PYTHONUNBUFFERED": "1", "TRITON_INTERPRET": "0", "FASTITM_FIGURES_LOG": str(work / "figures.jsonl")}
    for name, cmd in (
        ("gpu-tests", [python, "-m", "pytest", "-m", "gpu", "tests", "-q", "-p", "no:cacheprovider",
                       f"--junitxml={work / 'gpu-tests.xml'}"]),
        ("gpu-benchmarks", [python, "-m", "pytest", "-m", "gpu", "bench", "-q", "-s", "-p", "no:cacheprovider",
                            f"--junitxml={work / 'gpu-benchmarks.xml'}", f"--benchmark-json={work / 'bench.json'}"]),
        ("sd21-scoring", [python, str(Path(__file__).resolve()), "score-run", "--json", str(work / "sd21.json")]),
    ):
        if not wanted(name):
            continue
        if not report.cuda:
            skip(stages[name], no_cuda)
        else:
            run_stage(stages[name], [cmd], work, {**env, "FASTITM_TEST_LOG": str(work / f"{name}.jsonl")})
    report.stages = [asdict(s) for s in stages.values()]
    for name in ("gpu-tests", "gpu-benchmarks"):
        # The incremental log when there is one (it survives a timeout), else pytest's JUnit file.
        report.tests += (test_log_outcomes(work / f"{name}.jsonl", name)
                         or junit_outcomes(work / f"{name}.xml", name))
    report.figures = benchmark_figures(work / "bench.json") or figure_log(work / "figures.jsonl")
    if (work / "sd21.json").is_file():
        report.figures += json.loads((work / "sd21.json").read_text())
    report.total_seconds = round(time.monotonic() - t0, 1)
    report.work = str(work)
    write_report(report, out)
    with tarfile.open(out / "gpu-logs.tar.gz", "w:gz") as tar:
        tar.add(work, arcname="gpu-logs")
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
    counts: dict[str, int] = {}
    for t in r.tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    lines += ["", "## Tests", "", ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none run", ""]
    if r.tests:
        lines += ["| test | outcome | seconds | message |", "|---|---|---|---|"]
        lines += [f"| {t['id']} | {t['outcome']} | {t['seconds']:.2f} | {t['message'].replace('|', '/')} |"
                  for t in r.tests]
    lines += ["", "## Figures", ""]
    if not r.figures:
        lines.append("none (no GPU stage ran)")
    for f in r.figures:
        lines.append(f"### {f['name']}")
        if f.get("median_ms") is not None:
            lines.append(f"- median time per benchmark round: {f['median_ms']} ms")
        for k, v in (f.get("figures") or {}).items():
            lines.append(f"- {k}: {v}")
        lines.append("")
    return "\n".join(lines) + "\n"


# -- the SD 2.1-base scoring run -------------------------------------------------------------------------

def score_run(json_path: Path, images: int = 8, texts: int = 8, timesteps: int = 10, rounds: int = 3) -> list[dict]:
    """Score random images against texts with the SD 2.1-base architecture (random weights) in bf16,
    with and without CUDA graphs, side by side in one process; figures with their conditions."""
    import torch

    import fastitm

    model = fastitm.testing.sd21_base_architecture(device="cuda", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(images, 3, 512, 512, generator=g)
    caps = [f"a photo of object {i} next to object {i + 1}" for i in range(texts)]
    figures = []
    plan = fastitm.make_plan(model, timesteps, seed=0)
    results = {}
    for graphs in ("0", "1"):
        os.environ["FASTITM_CUDA_GRAPHS"] = graphs
        times = []
        for _ in range(rounds + 1):  # the first round warms up (compilation, capture)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            res = fastitm.score(imgs, caps, model=model, plan=plan, progress=False)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        rows = res.stats["unet_rows"]
        med = sorted(times[1:])[len(times[1:]) // 2]
        results[graphs] = res.matrix
        figures.append({"source": "sd21-scoring", "name": f"SD 2.1-base diffusion_itm, CUDA graphs {'on' if graphs == '1' else 'off'}",
                        "figures": {"rows_per_s": round(rows / med, 1), "ms_per_batch": round(1e3 * med / (rows / res.stats["batch_size"]), 2),
                                    "median_s": round(med, 3), "rounds": rounds, "unet_rows": rows,
                                    "batch_size": res.stats["batch_size"], "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                                    "conditions": f"{images} images 512 px x {texts} texts x {timesteps} timesteps, bf16, random weights, "
                                                  f"backend {res.backend}, {torch.cuda.get_device_name(0)}"}})
    diff = (results["1"] - results["0"]).abs().max().item()
    figures.append({"source": "sd21-scoring", "name": "CUDA graphs vs eager, same plan",
                    "figures": {"max_abs_score_difference": diff,
                                "speedup": round(figures[0]["figures"]["median_s"] / figures[1]["figures"]["median_s"], 3)}})
    json_path.write_text(json.dumps(figures, indent=2))
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wheels", help="download the carried pure-Python wheels (needs the package registry)")
    w.add_argument("--dest", default=str(ROOT / ".whl"))
    r = sub.add_parser("run", help="install offline, run every GPU stage, write gpu-report.md/json")
    r.add_argument("--out", required=True)
    r.add_argument("--wheels", default=str(ROOT / ".whl"))
    r.add_argument("--python", default=sys.executable)
    r.add_argument("--only", default="", help=f"comma-separated stages to run (default all: {','.join(LIMITS)}); "
                   "e.g. split over two sessions of a machine whose commands may run 10 minutes")
    r.add_argument("--limit", action="append", default=[], metavar="STAGE=SECONDS",
                   help="override a stage's time limit (repeatable)")
    s = sub.add_parser("score-run", help="the SD 2.1-base bf16 scoring stage (CUDA)")
    s.add_argument("--json", required=True)
    args = p.parse_args(argv)
    if args.cmd == "wheels":
        for wheel in download_wheels(Path(args.dest)):
            print(wheel.name)
        return 0
    if args.cmd == "score-run":
        score_run(Path(args.json))
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
    report = run(Path(args.out).resolve(), Path(args.wheels).resolve(), args.python, limits, only)
    print(render_markdown(report).split("## Tests")[0])
    print(f"wrote {Path(args.out) / 'gpu-report.md'}, gpu-report.json and gpu-logs.tar.gz (logs in {report.work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
