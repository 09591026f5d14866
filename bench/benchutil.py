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


def row_flops(model) -> dict[str, int]:
    """FLOPs of one row through the whole denoiser, through the text-free prefix the engine shares per
    (image, timestep) cell, and through the cross-attention K/V projections it shares per text (torch's
    FLOP counter: matmuls, convolutions and attention, whose CPU kernel it does not know by itself).
    The one count of a row's work for every benchmark: the CPU overhead benchmark and the GPU headline."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    from fastitm.engine.sharing import kv_modules, prefix_modules

    unet = model.unet
    names = {m: n for n, m in unet.named_modules()}
    x = torch.randn(1, *model.latent_shape).to(model.device, model.dtype)
    t = torch.tensor([500], device=model.device)
    cond = model.spec.encode_empty(model)
    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                lambda q, k, v, *_, out_shape=None, **__: sdpa_flop_count(q, k, v)}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as fc:
        model.spec.forward(unet, x, t, cond)
    counts = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}

    def of(mods):
        return sum(counts.get(f"{type(unet).__name__}.{names[m]}", 0) for m in mods)

    return {"row": counts["Global"], "prefix": of(prefix_modules(unet)), "kv": of(kv_modules(unet))}
