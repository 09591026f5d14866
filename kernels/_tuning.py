"""Launch configurations chosen by timing a few candidates on first use (CUDA only).

``triton.autotune`` re-runs a kernel with every candidate on the real arguments; ours write their
outputs in place (score buffers, atomics) and size a buffer by the block (partial LSE sums), so each
candidate here runs on scratch buffers through a closure the launcher supplies, and the winner is
cached per shape key. Under the interpreter, or with ``FASTITM_AUTOTUNE=0``, the launchers keep
their fixed defaults.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

_best: dict[tuple, Any] = {}


def enabled(device: torch.device) -> bool:
    return (device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1"
            and os.environ.get("FASTITM_AUTOTUNE", "1").strip() not in ("0", "false", "off"))


def _time(fn: Callable[[], Any]) -> float:
    """Median milliseconds of ``fn`` (triton's do_bench: warm-up, then timed repetitions)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))


def pick(key: tuple, configs: Sequence[Any], run: Callable[[Any], Any]) -> Any:
    """The fastest of ``configs`` for ``key`` (timed once, then cached). A candidate that fails to
    compile or launch is skipped; if all fail, the first is returned (its launch will raise)."""
    if key in _best:
        return _best[key]
    timed = []
    for n, config in enumerate(configs):
        try:
            timed.append((_time(lambda c=config: run(c)), n))
        except Exception:  # noqa: BLE001 - e.g. out of shared memory for this block size
            continue
    best = configs[min(timed)[1]] if timed else configs[0]
    _best[key] = best
    return best


def chosen() -> dict[tuple, Any]:
    """What was picked so far (for reports)."""
    return dict(_best)
