"""``fastitm demo`` of two source trees side by side: alternating rounds, median wall time of each,
and whether their accuracy tables are identical.

    python bench/compare_demo.py OLD_TREE NEW_TREE [--rounds 2]

Each tree is put first on PYTHONPATH (its fastitm package, with the compiled extension copied in when
it has none), so both run in this environment with the same torch; runs never overlap.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run_once(tree: Path, out: Path) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "fastitm.cli", "demo", "--out", str(out)], env=env, cwd=out.parent,
                         capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - t
    m = re.search(r"(2-way choice.*?image retrieval[^\n]*)", res.stdout, re.S)
    table = m.group(1) if m else res.stdout
    return elapsed, table.replace(str(tree), "<tree>")  # the model card path names the tree


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    here = Path(__file__).resolve().parents[1]
    for tree in (args.old, args.new):
        if not list((tree / "fastitm").glob("_C*.so")):
            for so in (here / "fastitm").glob("_C*.so"):
                shutil.copy(so, tree / "fastitm")
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "fastitm-compare-demo"
    work.mkdir(exist_ok=True)
    times: dict[str, list[float]] = {"old": [], "new": []}
    tables: dict[str, str] = {}
    for r in range(args.rounds):
        for name, tree in (("old", args.old), ("new", args.new)):
            elapsed, table = run_once(tree, work / f"{name}{r}")
            times[name].append(elapsed)
            tables.setdefault(name, table)
            print(f"round {r} {name}: {elapsed:.1f} s", flush=True)
    old, new = statistics.median(times["old"]), statistics.median(times["new"])
    print(f"median old {old:.1f} s, new {new:.1f} s: {old / new:.2f}x; tables identical: {tables['old'] == tables['new']}")
    if tables["old"] != tables["new"]:
        print("--- old\n" + tables["old"] + "\n--- new\n" + tables["new"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
