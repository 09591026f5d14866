"""Benchmark fixtures."""

import pytest


@pytest.fixture
def report(benchmark):
    """Store the side-by-side figures with their context in the benchmark's extra_info and print
    one line per provider (visible with -s, and in the pytest-benchmark JSON)."""
    lines = []

    def add(name, value):
        benchmark.extra_info[name] = value
        lines.append(f"{name}: {value}")

    yield add
    print("\n" + "\n".join(lines))
