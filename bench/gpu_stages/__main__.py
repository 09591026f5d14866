"""The measuring stages of ``make gpu-check``, one module each (``stage_<name>.py``), each run by
``bench/gpu_check.py`` in its own process:

    python bench/gpu_stages STAGE --figures FILE --until EPOCH_SECONDS [--smoke]

Every figure is appended to FILE (one JSON line: stage, name, figures with their conditions) the
moment it is measured, so a stage stopped at its time limit keeps what it reached. Each stage
checks ``--until`` before each step and skips, with a line saying so, what would not fit.

Stages (in the order the check runs them, most valuable first):

- ``ceilings``: the device's measured bf16 GEMM rate (8192^3) and device-to-device copy bandwidth,
  the denominators of every floor below.
- ``kernels``: the fused ops (cross-attention + LSE forward and backward, error reduction) on fresh
  random inputs at the SD 2.1-base and SDXL layer shapes, fp32/fp16/bf16 against the fp32 reference,
  next to PyTorch's own error in that dtype.
- ``headline``: the SD 2.1-base architecture (random weights, 512 px, bf16): UNet rows/s of the
  engine (CUDA graphs on and off; at the first batch size also without row sharing,
  ``FASTITM_ROW_SHARING=0``), a bare loop of denoiser calls on the same rows, ``fastitm.reference``
  and a per-pair loop in the published scripts' style, at batch sizes 16/32/64/128; UNet FLOPs per row
  counted with ``torch.utils.flop_counter``; the engine's rate as a fraction of the GEMM ceiling.
- ``fused-ops``: the fused ops against SDPA + logsumexp at the SD 2.1 shapes (time, peak memory),
  each time next to its floor (bytes / measured copy bandwidth, FLOPs / measured GEMM rate).
- ``levers``: channels_last and fuse_qkv against the same model without them (compile last, only
  when enough time is left).

``--smoke`` runs a stage on the CPU with the tiny model and small shapes: CI's check that the code
runs (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a folder or loaded from a test: its modules

import stage_ceilings  # noqa: E402
import stage_fused_ops  # noqa: E402
import stage_headline  # noqa: E402
import stage_kernels  # noqa: E402
import stage_levers  # noqa: E402
from stages_common import Ctx  # noqa: E402

STAGES = {"ceilings": stage_ceilings.run_ceilings, "kernels": stage_kernels.run_kernels,
          "headline": stage_headline.run_headline, "fused-ops": stage_fused_ops.run_fused_ops,
          "levers": stage_levers.run_levers}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=list(STAGES))
    p.add_argument("--figures", required=True, type=Path)
    p.add_argument("--until", type=float, default=None, help="the stage's end (seconds since the epoch)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, small shapes: the code runs, no figures")
    args = p.parse_args(argv)
    ctx = Ctx(args.stage, args.figures, args.until or time.time() + 600, args.smoke)
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    try:
        STAGES[args.stage](ctx)
    except SystemExit:
        raise
    except Exception as e:
        ctx.record("error", {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]})
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
