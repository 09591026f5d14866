"""Benchmark helpers: side-by-side medians and the context stored with every figure."""

import platform
import statistics
import time

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device, rounds=15, warmup=3):
    """Median and spread (min, max) of ``rounds`` timed calls after ``warmup`` untimed ones; the GPU
    is synchronized inside the timed region so asynchronous work is counted."""
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), min(ts), max(ts)


def machine() -> str:
    """The CPU, torch and its threads, as the script benchmarks record them."""
    return f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def context(device, dtype, **shapes):
    ctx = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        **shapes,
    }
    return ctx


def emit(out: dict, path: str | None = None) -> None:
    """Print a benchmark's figures as JSON, and write them to ``path`` when given."""
    import json

    print(json.dumps(out, indent=1))
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
