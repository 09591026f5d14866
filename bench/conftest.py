"""Benchmark fixtures."""

import json
import os

import pytest


@pytest.fixture
def report(benchmark, request):
    """Store the side-by-side figures with their context in the benchmark's extra_info and print
    one line per provider (visible with -s, and in the pytest-benchmark JSON). With
    ``FASTITM_FIGURES_LOG=path`` each test's figures are also appended to that JSON-lines file when
    it ends, so a benchmark run stopped at a time limit keeps the figures it reached."""
    lines = []

    def add(name, value):
        benchmark.extra_info[name] = value
        lines.append(f"{name}: {value}")

    yield add
    print("\n" + "\n".join(lines))
    path = os.environ.get("FASTITM_FIGURES_LOG")
    if path and benchmark.extra_info:
        with open(path, "a") as f:
            f.write(json.dumps({"name": request.node.nodeid, "figures": dict(benchmark.extra_info)}, default=str)
                    + "\n")
