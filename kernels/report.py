"""Compile every Triton kernel for a GPU that is not here, and read what the compiler made of it.

    python -m fastitm.kernels.report [--target 90 80] [--dtype bf16 fp16 fp32] [--json FILE]

For each kernel (cross-attention LSE forward and backward, error reduction), each configuration its
launcher may pick (the autotune candidates, or the fixed one: block sizes, warps and register cap)
and each dtype it serves, at the Stable Diffusion shapes (77 keys -> BLOCK_N 128, head dim 64 ->
BLOCK_D 64; SD 1.x's 80 and 160 -> BLOCK_D 128 and 256 in half precision), ``triton.compile``
builds the cubin for ``GPUTarget("cuda", cc, 32)`` and the ``cuobjdump`` shipped with Triton reads
its registers, local memory (spills) and, for the attention kernels, SASS (tensor-core instructions:
HGMMA on sm_90, HMMA on sm_80). Programs per SM follow from registers, shared memory and warps. No
GPU and no CUDA toolkit are needed; ``tests/test_kernel_compile.py`` runs this in CI.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import triton

from . import cross_attention_lse as cal
from . import error_reduce as er

# Per-SM limits by compute capability: registers, shared memory (bytes), warps, resident blocks.
SM_LIMITS = {90: (65536, 228 * 1024, 64, 32), 80: (65536, 164 * 1024, 64, 32)}
MAX_SHARED_PER_BLOCK = {90: 227 * 1024, 80: 163 * 1024}
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
BLOCK_N, BLOCK_D = 128, 64  # 77 CLIP keys, head dim 64
ERROR_F = 4 * 64 * 64  # one SD 2.1 latent row


@dataclass
class Row:
    kernel: str
    config: str
    dtype: str
    target: str
    head_dim_block: int  # BLOCK_D: 64 for SD 2.x/SDXL heads, 128/256 for SD 1.x's 80/160
    registers: int
    shared_bytes: int
    local_bytes: int  # spills
    mma: str  # HGMMA, HMMA or none; "-" where not read (the error reduction has no matrix product)
    programs_per_sm: int
    compile_s: float


def _ints(names):
    return {n: "i32" for n in names}


def _attention_signature(kernel, dtype: str, backward: bool) -> dict:
    names = kernel.arg_names
    sig = {}
    for n in names:
        if n in ("POOL_PROBS", "HAS_MASK", "IEEE", "BLOCK_M", "BLOCK_N", "BLOCK_D"):
            sig[n] = "constexpr"
        elif n in ("Q", "K", "V", "O", "DO", "DQ"):
            sig[n] = f"*{dtype}"
        elif n in ("PARTIAL", "DPOOL", "DK_PART", "DV_PART"):
            sig[n] = "*fp32"
        elif n == "MASK":
            sig[n] = "*i8"
        elif n in ("scale", "lam"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    return sig


def _error_signature(kernel, dtype: str) -> dict:
    sig = {n: "*i64" for n in ("ROW_TARGET", "ROW_IMAGE", "ROW_TEXT", "ROW_T")}
    sig.update({"PRED": f"*{dtype}", "TARGET": f"*{dtype}", "UNCOND": "*fp32", "PER_T": "*fp32", "SCORES": "*fp32",
                "ROW_ERR": "*fp32"})
    sig.update(_ints(("stride_pred", "stride_target", "F", "M", "T")))
    sig.update({n: "constexpr" for n in ("PHASE", "MSE", "NORMALIZE", "HAS_PER_T", "HAS_SCORES", "BLOCK_F")})
    return {n: sig[n] for n in kernel.arg_names}


def _jit(kernel):
    """The kernel as a JITFunction: under ``TRITON_INTERPRET=1`` (how CI runs the kernels) ``@triton.jit``
    made an interpreted function, which cannot be compiled; its Python function can."""
    from triton.runtime.jit import JITFunction

    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def _label(block_m: int, num_warps: int, maxnreg: int | None) -> str:
    return f"BLOCK_M={block_m} warps={num_warps}" + (f" maxnreg={maxnreg}" if maxnreg else "")


def cases(dtypes=(torch.bfloat16, torch.float16, torch.float32), wide_heads=(128, 256)):
    """(kernel name, jit function, signature, constexprs, options, config label, dtype) for everything the
    launchers may compile at the SD shapes: head dim 64 (BLOCK_D 64) in every dtype, and SD 1.x's wider
    heads (BLOCK_D in ``wide_heads``) for the attention kernels in half precision."""
    fwd, bwd, err = (_jit(k) for k in (cal._cross_attention_lse_fwd_kernel, cal._cross_attention_lse_bwd_kernel,
                                       er._error_reduce_fwd_kernel))
    out = []
    for dtype in dtypes:
        t = TYPES[dtype]
        ieee = dtype == torch.float32
        for block_d in (BLOCK_D,) + (tuple(wide_heads) if not ieee else ()):
            configs = [("cross_attention_lse_fwd", fwd, c) for c in cal.fwd_candidates(block_d, dtype)]
            configs.append(("cross_attention_lse_bwd", bwd, cal.bwd_config(block_d, dtype)))
            for name, fn, (bm, nw, maxnreg) in configs:
                consts = {"POOL_PROBS": False, "HAS_MASK": False, "IEEE": ieee, "BLOCK_M": bm, "BLOCK_N": BLOCK_N,
                          "BLOCK_D": block_d}
                options = {"num_warps": nw, **({"maxnreg": maxnreg} if maxnreg else {})}
                out.append((name, fn, _attention_signature(fn, t, name.endswith("bwd")), consts, options,
                            _label(bm, nw, maxnreg), t))
        for bf, nw in er.candidates(ERROR_F):
            consts = {"PHASE": 1, "MSE": False, "NORMALIZE": True, "HAS_PER_T": True, "HAS_SCORES": False,
                      "BLOCK_F": bf}
            out.append(("error_reduce", err, _error_signature(err, t), consts, {"num_warps": nw},
                        f"BLOCK_F={bf} warps={nw}", t))
    return out


def quick_skips(case, cc: int = 90) -> bool:
    """CI's subset: bf16 standing for fp16, no fp32 backward, fp32 forward for sm_90 only (a correctness
    path on GPUs, 7-10 s of compile per tile), the error reduction in bf16 only, the head dim of SD
    2.x/SDXL (64) only."""
    name, consts, dtype = case[0], case[3], case[-1]
    return dtype == "fp16" or (dtype == "fp32" and (name == "cross_attention_lse_bwd" or cc != 90)) or \
        (name == "error_reduce" and dtype != "bf16") or consts.get("BLOCK_D", BLOCK_D) != BLOCK_D


def cuobjdump() -> str:
    found = glob.glob(os.path.join(os.path.dirname(triton.__file__), "**", "bin", "cuobjdump"), recursive=True)
    if not found:
        raise FileNotFoundError("cuobjdump is not in this Triton package (it ships with Triton's NVIDIA backend)")
    return found[0]


def programs_per_sm(cc: int, registers: int, shared: int, warps: int) -> int:
    regs_sm, shared_sm, warps_sm, blocks_sm = SM_LIMITS[cc]
    per_warp = -(-registers * 32 // 256) * 256  # registers are allocated per warp in units of 256
    by_regs = regs_sm // max(1, per_warp * warps)
    by_shared = shared_sm // shared if shared else blocks_sm
    return min(by_regs, by_shared, warps_sm // warps, blocks_sm)


def compile_case(case, cc: int, tool: str | None = None) -> Row:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, fn, sig, consts, options, label, dtype = case
    nw = options["num_warps"]
    tool = tool or cuobjdump()
    t0 = time.perf_counter()
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", cc, 32),
                            options=options)
    seconds = time.perf_counter() - t0
    # The SASS is read only for the attention kernels, the ones with a matrix product: disassembling
    # takes cuobjdump 0.5-0.7 s a kernel, the resource line alone a few milliseconds.
    matrix = name.startswith("cross_attention")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([tool, "--dump-resource-usage", *(["-sass"] if matrix else []), f.name],
                              capture_output=True, text=True, check=True).stdout
    fields = {}
    for line in sass.splitlines():
        if "REG:" in line:
            for item in line.split():
                key, _, value = item.partition(":")
                if value.isdigit():
                    fields[key] = int(value)
    registers = fields.get("REG", 0)
    shared = max(int(kernel.metadata.shared), fields.get("SHARED", 0))  # dynamic (launch) or static
    mma = ("HGMMA" if "HGMMA" in sass else ("HMMA" if "HMMA" in sass else "none")) if matrix else "-"
    return Row(name, label, dtype, f"sm_{cc}", consts.get("BLOCK_D", 0), registers, shared, fields.get("LOCAL", 0), mma,
               programs_per_sm(cc, registers, shared, nw), round(seconds, 1))


def problems(row: Row) -> list[str]:
    """What disqualifies a configuration: spills, shared memory over the target's per-block limit,
    and a half-precision matrix kernel without tensor-core instructions."""
    out = []
    if row.local_bytes:
        out.append(f"spills {row.local_bytes} bytes to local memory")
    if row.shared_bytes > MAX_SHARED_PER_BLOCK[int(row.target[3:])]:
        out.append(f"shared memory {row.shared_bytes} over the per-block limit")
    if row.kernel.startswith("cross_attention") and row.dtype != "fp32" and row.mma == "none":
        out.append("no tensor-core instruction (HGMMA/HMMA) in a half-precision matrix kernel")
    return out


def table(rows: list[Row]) -> str:
    lines = ["| kernel | config | dtype | BLOCK_D | target | registers | shared (B) | spills (B) | MMA | programs/SM "
             "| compile s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.kernel} | {r.config} | {r.dtype} | {r.head_dim_block or '-'} | {r.target} | {r.registers} | {r.shared_bytes} | {r.local_bytes} "
              f"| {r.mma} | {r.programs_per_sm} | {r.compile_s} |" for r in rows]
    return "\n".join(lines)


def _compile_indexed(job) -> Row:
    cc, n, dtype_names, tool = job
    dtypes = [d for d, name in TYPES.items() if name in dtype_names]
    return compile_case(cases(dtypes)[n], cc, tool)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=int, nargs="+", default=[90, 80], choices=sorted(SM_LIMITS))
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp16", "fp32"], choices=list(TYPES.values()))
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    p.add_argument("--quick", action="store_true", help="CI's subset: bf16 standing for both half types (the same code, "
                   "the same registers in the full table), head dim 64, fp32 forward for sm_90 only, no fp32 backward "
                   "(about 50 s of compile for sm_90 and sm_80 on a 2-core CPU)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("TRITON_INTERPRET=1 makes @triton.jit kernels interpreted, which cannot be compiled: unset it")
    dtypes = [d for d, n in TYPES.items() if n in args.dtype]
    tool = cuobjdump()
    rows = []
    wide = "" if args.quick else " and SD 1.x's 80/160 (BLOCK_D 128/256, half precision)"
    print(f"Triton {triton.__version__}; shapes: 77 keys (BLOCK_N {BLOCK_N}), head dim 64 (BLOCK_D {BLOCK_D}){wide}, "
          f"error rows of {ERROR_F} elements", flush=True)
    todo = [(cc, n) for cc in args.target for n, case in enumerate(cases(dtypes))
            if not (args.quick and quick_skips(case, cc))]
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # fork: the workers inherit the kernels; each compiles the case it is given by index
        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("fork")) as pool:
            rows = list(pool.map(_compile_indexed, [(cc, n, args.dtype, tool) for cc, n in todo]))
        for row in rows:
            print(table([row]).splitlines()[-1], flush=True)
    for cc, n in todo if args.jobs <= 1 else []:
        rows.append(compile_case(cases(dtypes)[n], cc, tool))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    bad = [(r, problems(r)) for r in rows if problems(r)]
    for r, why in bad:
        print(f"problem: {r.kernel} {r.config} {r.dtype} {r.target}: {'; '.join(why)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
