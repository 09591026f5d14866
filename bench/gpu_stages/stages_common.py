"""What every measuring stage shares: the shapes, the context that logs each figure as it is measured,
the timers, the measured ceilings, the headline model and inputs."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

# SD 2.1-base at 512 px: the cross-attention layers' [heads, query length] (head dim 64, 77 keys).
SD21_LAYERS = ((5, 4096), (10, 1024), (20, 256), (20, 64))
# SDXL at 1024 px: its two attention levels (head dim 64, 77 keys).
SDXL_LAYERS = ((10, 4096), (20, 1024))
HEAD_DIM, KEYS = 64, 77
# Headline shapes: 4 images x 15 texts x 8 timesteps = 512 rows (with the 4 x 8 unconditional rows),
# a whole number of batches at every batch size tried.
N_IMAGES, N_TEXTS, N_TIMESTEPS = 4, 15, 8
BATCH_SIZES = (64, 128, 32, 16)  # the likely best first: a stage cut short keeps the most useful figures


class Ctx:
    def __init__(self, stage: str, figures: Path, until: float, smoke: bool):
        self.stage, self.figures, self.until, self.smoke = stage, figures, until, smoke
        self.device = torch.device("cpu" if smoke else "cuda")

    def left(self) -> float:
        return self.until - time.time()

    def fits(self, seconds: float, what: str) -> bool:
        """Whether ``seconds`` more fit before the stage's end; if not, say what is skipped."""
        if self.left() >= seconds:
            return True
        self.record(f"skipped: {what}", {"reason": f"needs about {seconds:.0f} s, {max(0.0, self.left()):.0f} s left"})
        return False

    def record(self, name: str, figures: dict) -> None:
        line = {"stage": self.stage, "name": name, "figures": figures, "at": round(time.time(), 1)}
        with open(self.figures, "a") as f:
            f.write(json.dumps(line, default=str) + "\n")
        print(f"[{self.stage}] {name}: {json.dumps(figures, default=str)}", flush=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self) -> int:
        if self.device.type != "cuda":
            return 0
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def peak_above(self, base: int) -> int:
        if self.device.type != "cuda":
            return 0
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    def device_name(self) -> str:
        return torch.cuda.get_device_name(0) if self.device.type == "cuda" else "cpu (smoke run)"


def timed(ctx: Ctx, fn, rounds: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``rounds`` calls after ``warmup`` untimed ones, synchronized."""
    for _ in range(warmup):
        fn()
    ctx.sync()
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        ctx.sync()
        out.append(time.perf_counter() - t)
    return out


def busy_seconds(spans) -> float:
    """The length of the union of (start, end) intervals: how long at least one of them was running."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def device_busy(ctx: Ctx, fn) -> tuple[float, float]:
    """(wall seconds, seconds the device was running at least one kernel or copy) of one ``fn()``
    under torch.profiler, from its Chrome trace (on the CPU, a smoke run: its top-level CPU ops)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    cuda = ctx.device.type == "cuda"
    kinds = {"kernel", "gpu_memcpy", "gpu_memset"} if cuda else {"cpu_op"}
    ctx.sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        fn()
        ctx.sync()
        wall = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in kinds and "dur" in e]
    return wall, busy_seconds(spans) / 1e6  # the trace is in microseconds


def event_ms(ctx: Ctx, fn, rounds: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` by CUDA events (wall clock on the CPU)."""
    if ctx.device.type != "cuda":
        return 1e3 * statistics.median(timed(ctx, fn, rounds, warmup))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def ceilings_path(figures: Path) -> Path:
    return figures.with_name("ceilings.json")


def load_ceilings(ctx: Ctx) -> dict:
    """The ceilings measured earlier in this run (``ceilings`` stage), or the datasheet-derived ones
    the issue gives for an H200 (marked as such) when that stage did not finish."""
    p = ceilings_path(ctx.figures)
    if p.is_file():
        return json.loads(p.read_text())
    return {"bf16_gemm_tflops": 780.0, "copy_gb_per_s": 4300.0, "source": "assumed (no ceilings measured in this run)"}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference over the expected's max magnitude."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def model_for(ctx: Ctx):
    import fastitm

    if ctx.smoke:
        return fastitm.testing.tiny_model(seed=0)
    return fastitm.testing.sd21_base_architecture(device="cuda", dtype=torch.bfloat16)


def setup(ctx: Ctx):
    """The model and the headline's inputs: N_IMAGES random images x N_TEXTS captions, a plan of
    N_TIMESTEPS (smaller in a smoke run)."""
    import fastitm

    model = model_for(ctx)
    n_img, n_txt, T = (2, 3, 4) if ctx.smoke else (N_IMAGES, N_TEXTS, N_TIMESTEPS)
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(n_img, 3, model.resolution, model.resolution, generator=g)
    texts = [f"a photo of object {j} next to object {j + 1}" for j in range(n_txt)]
    return model, imgs, texts, fastitm.make_plan(model, T, seed=0)
