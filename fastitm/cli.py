"""The ``fastitm`` command line: ``fastitm score | eval | calibrate | results | finetune | demo | info``.

Each command imports what it runs inside its own function, so ``--help``, a bad argument and
``fastitm info`` answer without loading the engine, the evaluation runner, the training loop or the
demo (start-up time), and the compiled extension is imported only where it is reported (optional)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from .core import interrupts
from .core.inputs import RESIZE_MODES
from .core.locks import held
from .core.methods import METHODS
from .core.plan import LATENT_MODES, NOISE_MODES, TIMESTEP_SCHEMES
from .evaluate.tasks import TASKS


def _parse_option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    low = value.strip().lower()
    parsed: object
    if low in ("true", "yes", "on"):
        parsed = True
    elif low in ("false", "no", "off"):
        parsed = False
    else:
        try:
            parsed = float(value)
        except ValueError:
            parsed = value
    return key.strip(), parsed


def _parse_weights(text: str):
    """``--weights``: uniform, exp, exp:RATE (the words in any case), or a JSON file (see fastitm.core.weights)."""
    word = text.strip().lower()
    if word == "uniform":
        return None
    if word == "exp" or word.startswith("exp:"):
        rate = word.partition(":")[2] or "7"
        try:
            value = float(rate)
        except ValueError:
            raise argparse.ArgumentTypeError(f"exp:RATE needs a number, got {rate!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"exp:RATE needs a finite rate, got {rate!r}")
        return {"kind": "exp", "rate": value}
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a weights file (JSON, as fastitm calibrate "
                                         "writes), uniform, exp or exp:RATE")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such weights file; give uniform, exp, exp:RATE or a JSON "
                                         "weights file (as fastitm calibrate writes)")
    return text


def _parse_adaptive(text: str | None):
    """``--adaptive`` alone: racing with its defaults; ``--adaptive alpha=0.01,min_timesteps=5``: those
    options (see fastitm.engine.racing.RaceOptions), each named once."""
    if text is None:
        return None
    if text == "on":
        return True
    out: dict = {}
    for part in text.split(","):
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise ValueError(f"--adaptive expects KEY=VALUE[,KEY=VALUE...] (e.g. alpha=0.01,keep=5), got {text!r}")
        if key in out:
            raise ValueError(f"--adaptive names {key} twice ({text!r}); give each option once")
        if key in ("over", "against"):  # the options that are words
            out[key] = value
            continue
        try:
            out[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            raise ValueError(f"--adaptive {key}={value!r}: expected a number") from None
    return out


def _adaptive_alone(argv: list[str]) -> list[str]:
    """``--adaptive`` takes an optional value; a following word that is not KEY=VALUE (the task of
    ``fastitm eval --adaptive jsonl ...``) is not its value but the next argument."""
    out = []
    for n, tok in enumerate(argv):
        out.append(tok)
        if (tok == "--adaptive" and n + 1 < len(argv) and argv[n + 1] != "on" and "=" not in argv[n + 1]
                and not argv[n + 1].startswith("-")):
            out.append("on")
    return out


def format_table(matrix, row_names: Sequence[str], col_names: Sequence[str], width: int = 18) -> str:
    """Scores as a text table; the best text of each image is marked with '*'."""

    def cut(s: str, n: int) -> str:
        return s if len(s) <= n else s[: n - 1] + "~"

    rw = max(5, min(28, max(len(r) for r in row_names)))
    header = " " * rw + " | " + " | ".join(f"{cut(c, width):>{width}}" for c in col_names)
    lines = [header, "-" * len(header)]
    best = matrix.argmax(dim=1).tolist()
    for i, name in enumerate(row_names):
        cells = []
        for j in range(len(col_names)):
            mark = "*" if j == best[i] else " "
            cells.append(f"{matrix[i, j].item():>{width - 1}.5g}{mark}")
        lines.append(f"{cut(name, rw):<{rw}} | " + " | ".join(cells))
    return "\n".join(lines)


def _load(model_arg: str | None, dtype: str, device: str, method: str | None = None, levers: dict | None = None,
          lora: str | None = None):
    """The model the command asked for; the device, and (from the folder's model_index.json alone)
    whether its family supports ``method``, are checked before any weight is read."""
    import torch

    from . import load_model, testing
    from .models.model import check_device, finish_loading, resolve_dtype

    check_device(device)
    if method is not None and model_arg not in (None, "tiny") and Path(model_arg).expanduser().is_dir():
        from .models.families import detect

        detect(Path(model_arg).expanduser())[0].check_method(method)
    levers = levers or {}
    if model_arg == "tiny":
        print("model: random-weight tiny model (fastitm.testing.tiny_model): scores carry no meaning",
              file=sys.stderr)
        model = testing.tiny_model(0)
        want = resolve_dtype(dtype, torch.device(device))
        if want != model.dtype or torch.device(device) != model.device:
            model.to(device=device, dtype=want)
        # a test fixture: its layout stays as testing.tiny_model built it unless a lever is asked for
        return finish_loading(model, lora, bool(levers.get("channels_last")), levers.get("fuse_qkv", False),
                              levers.get("compile", False))
    return load_model(model_arg, dtype=dtype, device=device, lora=lora, **levers)


def check_output_path(path: str, what: str) -> None:
    """An output file's folder must exist and the path must not be a folder: checked before any work,
    so a run is never lost at the end to a typo."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} {p} is a folder; give a file path")
    if not p.parent.is_dir():
        raise FileNotFoundError(f"{what}: folder {p.parent} does not exist")


def cmd_score(args: argparse.Namespace) -> int:
    from . import score
    from .engine.common import check_arguments
    from .engine.engine import Interrupted, check_checkpoint_path
    from .engine.racing import RaceOptions
    from .models.speed import auto_compile, default_batch_size

    options = dict(args.option or [])
    if args.json:
        check_output_path(args.json, "--json")
    if args.checkpoint:
        check_checkpoint_path(Path(args.checkpoint))
    # Every argument is checked before the model loads (_load checks the device first), so bad input
    # fails at once.
    args.method = args.method or "diffusion_itm"
    _, _, spec, _ = check_arguments(args.images, args.texts, method=args.method, timesteps=args.timesteps,
                                    seed=args.seed, plan=None, resize=args.resize, latent=args.latent,
                                    scheme=args.scheme, noise=args.noise, preset=args.preset, options=options,
                                    backend=args.backend)

    adaptive = RaceOptions.parse(_parse_adaptive(args.adaptive))
    model = _load(args.model, args.dtype, args.device, args.method, _levers(args), lora=args.lora)
    if args.compile is None:  # one engine call: every (image, text, timestep) row, and the empty prompt's
        n, t = len(args.images), 10 if args.timesteps is None else args.timesteps
        rows = n * len(args.texts) * t + (n * t if spec.needs_uncond else 0)
        rounds = adaptive is not None or bool(spec.options.get("elimination"))
        auto_compile(model, [rows], args.batch_size or default_batch_size(model), rounds=rounds)
    try:
        res = score(args.images, args.texts, model=model, method=args.method, timesteps=args.timesteps,
                    seed=args.seed, preset=args.preset, resize=args.resize, scheme=args.scheme, latent=args.latent,
                    noise=args.noise, backend=args.backend, batch_size=args.batch_size,
                    progress=None if not args.no_progress else False, checkpoint=args.checkpoint,
                    adaptive=adaptive, weights=args.weights, **options)
    except Interrupted as e:
        print(f"fastitm: {e}", file=sys.stderr)
        return interrupts.exit_code()
    names = [Path(p).name for p in args.images]
    preset = f"  preset: {res.preset}" if res.preset else ""
    print(f"model: {model.source} ({model.spec.label})")
    print(f"method: {res.method} {res.options}{preset}  backend: {res.backend}")
    print(f"choices: {res.choices}  timesteps: {res.plan.timesteps.tolist()}  seed: {res.plan.seed}")
    print(format_table(res.matrix, names, args.texts))
    if args.json:
        out = res.to_json()
        out["images"] = [str(p) for p in args.images]
        out["texts"] = list(args.texts)
        out["model"] = model.source
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0


def _run_options(args: argparse.Namespace) -> dict:
    """The scoring options ``fastitm eval`` and ``fastitm calibrate`` pass on to the runner: ``--option``
    pairs and the plan and preset flags given."""
    options = dict(args.option or [])
    for name in ("preset", "resize", "latent", "scheme", "noise"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    return options


def cmd_eval(args: argparse.Namespace) -> int:
    from .engine import distributed as dist
    from .engine.racing import RaceOptions

    options = _run_options(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for report.json, report.md and the plot")
    try:  # now, not after the run: a folder that cannot be made would lose every score
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: the folder cannot be created ({e.strerror or e}); give a folder "
                         "where the report can be written") from None
    if args.checkpoint:
        check_output_path(args.checkpoint, "--checkpoint")
    if args.results:
        check_output_path(args.results, "--results")
    adaptive = RaceOptions.parse(_parse_adaptive(args.adaptive))
    # Under torchrun: one process per GPU (or CPU process with gloo); rank 0 reports.
    dist.init_from_env(args.device)
    _published_run_choices(args, dist.local_device(args.device))
    evaluation = _evaluation(args, options, adaptive)
    with ExitStack() as stack:
        if dist.rank() == 0:  # the one that writes: --out is its alone for the run
            _check_report_folder(out, evaluation, args.overwrite)
            stack.enter_context(held(out / ".fastitm-eval.lock", lambda holder: ValueError(
                f"--out {out} is in use by another fastitm eval (process {holder}); wait for it to finish or give "
                "another --out")))
        return _eval(args, out, options, adaptive, evaluation)


def _published_run_choices(args: argparse.Namespace, device) -> None:
    """``--preset published`` with the discffusion method: the timesteps dsd_infer.py runs for the task
    (unless --timesteps is given) and its float16 on CUDA (unless --dtype is given); said on stderr."""
    import torch

    from .evaluate.tasks_discffusion import published_choices

    choices = published_choices(args.task, args.method) if args.preset == "published" else {}
    said = []
    if choices and args.timesteps is None:
        args.timesteps = choices["timesteps"]
        said.append(f"{args.timesteps} timesteps")
    if choices and args.dtype == "auto" and torch.device(device).type == "cuda":
        args.dtype = choices["dtype"]
        said.append(args.dtype)
    if said:
        print(f"fastitm: --preset published: {' and '.join(said)} for {args.task}, as dsd_infer.py runs it",
              file=sys.stderr)


def _evaluation(args: argparse.Namespace, options: dict, adaptive) -> dict:
    """What makes a ``fastitm eval`` run another evaluation (report.json's ``evaluation``): the task,
    data and model, the method with its options, the plan, the weights, racing and the item selection;
    defaults filled in as the run fills them, so an explicit default is the same evaluation."""
    from .evaluate.runner import task_defaults

    timesteps = 10 if args.timesteps is None else args.timesteps
    method = args.method or task_defaults(args.task, timesteps).get("method", "diffusion_itm")
    record = {"task": args.task, "data": str(args.data), "model": args.model or "embedded", "dtype": args.dtype,
              "method": method, "options": dict(sorted(options.items())), "timesteps": timesteps,
              "seed": 0 if args.seed is None else args.seed, "split": args.split, "limit": args.limit,
              "weights": args.weights or "uniform", "adaptive": None if adaptive is None else vars(adaptive),
              "lora": args.lora, "fewshot": args.fewshot, "prompts": args.prompts}
    return json.loads(json.dumps(record, default=str))  # as report.json will hold it


def _check_report_folder(out: Path, evaluation: dict, overwrite: bool) -> None:
    """Refuse an ``--out`` holding the report of another evaluation unless ``overwrite``, naming what
    differs: the same evaluation's report is replaced (a rerun), another one is never lost silently."""
    f = out / "report.json"
    if overwrite or not f.is_file():
        return
    try:
        old = json.loads(f.read_text())
        theirs = old.get("evaluation") or {"task": old.get("task"), "data": old.get("data")}  # older reports
    except (OSError, ValueError, AttributeError):
        raise ValueError(f"--out {out} holds a report.json that is not a fastitm report; give another --out, or "
                         "--overwrite to replace it") from None
    differ = [k for k in evaluation if k in theirs and theirs[k] != evaluation[k]]
    if differ:
        said = "; ".join(f"{k} {json.dumps(theirs[k])} there, {json.dumps(evaluation[k])} here" for k in differ)
        raise ValueError(f"--out {out} holds the report of another evaluation ({said}); give another --out, or "
                         "--overwrite to replace it")


def _eval(args: argparse.Namespace, out: Path, options: dict, adaptive, evaluation: dict) -> int:
    from .engine import distributed as dist
    from .evaluate import run

    device = dist.local_device(args.device)
    model = _load(args.model, args.dtype, device, args.method, _levers(args), lora=args.lora)
    report = run(args.task, args.data, model=model, method=args.method,
                 timesteps=10 if args.timesteps is None else args.timesteps, seed=0 if args.seed is None else args.seed,
                 split=args.split, limit=args.limit, skip_bad=args.skip_bad, backend=args.backend,
                 batch_size=args.batch_size, progress=None if not args.no_progress else False,
                 checkpoint=args.checkpoint, adaptive=adaptive, stream=args.stream, weights=args.weights,
                 image_cache=args.image_cache, compile=None if args.compile is None else False,
                 fewshot=args.fewshot, prompts=args.prompts, **options)
    if dist.rank() != 0:
        return 0
    report.evaluation = evaluation
    written = report.save(out)
    print(report.to_markdown())
    for path in written.values():
        print(f"wrote {path}")
    if args.results:
        from .evaluate.results import append

        append(args.results, report)
        print(f"appended this run's record to {args.results} (fastitm results {args.results} lists them)")
    if report.skipped:
        print(f"skipped {len(report.skipped)} item(s) with unreadable images (listed in report.json)", file=sys.stderr)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .evaluate.calibrate import calibrate

    options = _run_options(args)
    check_output_path(args.out, "--out")
    model = _load(args.model, args.dtype, args.device, args.method, _levers(args), lora=args.lora)
    cal = calibrate(args.task, args.data, model=model, method=args.method,
                    timesteps=20 if args.timesteps is None else args.timesteps, seed=0 if args.seed is None else args.seed,
                    split=args.split, fraction=args.fraction, limit=args.limit, folds=args.folds,
                    sample_seed=args.sample_seed, out=args.out, progress=None if not args.no_progress else False,
                    backend=args.backend, batch_size=args.batch_size, **options)
    print(cal.to_markdown())
    print(f"wrote {args.out}; use it with fastitm eval {args.task} --weights {args.out} "
          f"--timesteps {len(cal.weights)} (the same plan)")
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from .evaluate.results import read, table

    records = read(args.file, on_bad=lambda why: print(f"fastitm: warning: {why}", file=sys.stderr))
    print(table(records, "csv" if args.csv else "markdown"), end="")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import finetune

    model = _load(args.model, args.dtype, args.device)
    command = "fastitm finetune " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else None
    out = finetune(args.recipe, args.data, out=args.out, model=model, rank=args.rank, steps=args.steps, lr=args.lr,
                   batch_size=args.batch_size, examples=args.examples, seed=args.seed,
                   progress=None if not args.no_progress else False, command=command, overwrite=args.overwrite,
                   task=args.task, fewshot=args.fewshot, split=args.split)
    print(f"the adapter and its card are in {out}; load it with fastitm.load_model(..., lora={str(out)!r})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.n < 8:
        raise ValueError(f"--n must be at least 8 (image retrieval uses groups of 8), got {args.n}")
    return run_demo(out_dir=args.out, timesteps=args.timesteps, seed=args.seed, n=args.n, model_path=args.model)


def cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    from ._version import __version__
    from .models.model import describe_folder, embedded_model_path

    if args.model is not None:
        if not args.model.strip():
            raise ValueError("--model is empty: give a model folder, a hub id or 'tiny' (or leave --model out for "
                             "this installation)")
        if args.model == "tiny":  # what score and eval load for --model tiny
            from . import testing

            d = testing.tiny_model(0).describe()
            d["source"] = "tiny (fastitm.testing.tiny_model, random weights)"
        else:
            d = describe_folder(args.model)
        if args.json:
            print(json.dumps(d, indent=2))
            return 0
        print(f"model: {d['source']}")
        print(f"family: {d['family']} ({d['label']})")
        print(f"prediction: {d['prediction']}   resolution: {d['resolution']} px   latents: "
              f"{'x'.join(map(str, d['latent_shape']))}   training timesteps: {d['num_train_timesteps']}")
        for name, cls in d["components"].items():
            print(f"  {name:<15} {cls:<30} {_count(d['parameters'][name])} parameters")
        print(f"methods: {', '.join(d['methods'])}")
        return 0
    try:
        from . import _C  # noqa: F401

        native = {"built": True, "openmp": bool(_C.has_openmp())}
    except ImportError as e:
        native = {"built": False, "why": str(e)}
    embedded = embedded_model_path()
    env = {"fastitm": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "cuda_available": torch.cuda.is_available(), "embedded_model": str(embedded) if embedded else None,
           "native_extension": native}
    if args.json:
        print(json.dumps(env, indent=2))
        return 0
    print(f"fastitm {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    print(f"cuda available: {torch.cuda.is_available()}")
    print(f"embedded model: {embedded or 'none shipped'}")
    print(f"native extension: built (openmp={native['openmp']})" if native["built"]
          else f"native extension: not available ({native['why']})")
    return 0


def _levers(args: argparse.Namespace) -> dict:
    # compile: None (the default) is decided per run from its rows, once the model is loaded (speed.auto_compile)
    return {"channels_last": args.channels_last, "fuse_qkv": args.fuse_qkv, "compile": bool(args.compile)}


def _count(n: int) -> str:
    """1234567 -> "1.235 M"; whole numbers below a thousand as they are."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return str(n)


def _scoring_arguments() -> argparse.ArgumentParser:
    """The arguments ``score`` and ``eval`` share: the model, the method and every scoring choice."""
    c = argparse.ArgumentParser(add_help=False)
    c.add_argument("--model", default=None,
                   help="diffusers model folder or Hugging Face hub id, e.g. stabilityai/stable-diffusion-2-1-base "
                        "(cached; HF_HUB_OFFLINE=1: from the cache only) (default: the embedded model; 'tiny': "
                        "random-weight tiny model)")
    c.add_argument("--lora", default=None, metavar="ADAPTER",
                   help="a LoRA for the model's UNet: a fastitm finetune --out folder, or a LoRA in diffusers' "
                        "file format (a .safetensors file or its folder, e.g. an LCM-LoRA); SD 1.x/2.x")
    c.add_argument("--method", default=None, choices=METHODS,
                   help="diffusion_itm (Krojer et al.: text-conditioned error minus the empty prompt's; the default), "
                   "diffusion_classifier (Li et al.: MSE only; eval pets' default, with adaptive elimination), "
                   "discffusion (He et al.: LogSumExp-pooled cross-attention)")
    c.add_argument("--preset", default=None, choices=("published",),
                   help="'published': every choice as the method's published code makes it (timesteps, "
                   "layers, latents, resizing, ...); options given explicitly override it")
    c.add_argument("--option", action="append", type=_parse_option, metavar="KEY=VALUE",
                   help="method option, e.g. normalize=false, err=mse, pool=probs, layers=published, "
                   "mix_uncond=true, elimination=2:5,5:1, order=published (repeatable)")
    c.add_argument("--timesteps", type=int, default=None,
                   help="number of timesteps (default 10), laid out by --scheme")
    c.add_argument("--scheme", default=None, choices=TIMESTEP_SCHEMES,
                   help="timestep layout: grid (DiffusionITM's range(10, 990, 1000 // T), default), midpoint "
                   "(Diffusion Classifier's), discffusion (999 - grid), stratified (random per stratum)")
    c.add_argument("--seed", type=int, default=None, help="seed of the noise and latent samples (default 0)")
    c.add_argument("--latent", default=None, choices=LATENT_MODES,
                   help="image latent: mean (posterior mean, default), sample (one per image), "
                   "sample_per_timestep (a fresh sample per image and timestep, as the published pipelines)")
    c.add_argument("--noise", default=None, choices=NOISE_MODES,
                   help="per_timestep (default) or shared (one noise tensor for every timestep)")
    c.add_argument("--resize", default=None, choices=RESIZE_MODES,
                   help="squash (antialiased bicubic, default), squash_pil (PIL bicubic on 8-bit, as the "
                   "published loaders), center_crop (torchvision's Resize + CenterCrop)")
    c.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="model precision (auto: bf16 on CUDA, fp32 on the CPU)")
    c.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="UNet and VAE-encoder convolutions in channels-last layout (default: on for fp32 on the "
                   "CPU, where it is faster; off on CUDA)")
    c.add_argument("--fuse-qkv", action="store_true", help="fused self-attention QKV projections (GPU lever)")
    c.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the denoiser (the first batch compiles: minutes on a CPU). Default: on the "
                        "CPU when the run is long enough to repay it (the reason is printed), off on a GPU")
    c.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (under torchrun, cuda is each rank's GPU)")
    c.add_argument("--backend", default="auto", choices=("auto", "triton", "native", "reference"),
                   help="fused ops: auto (Triton on CUDA, C++ on CPU), or one by name")
    c.add_argument("--batch-size", type=int, default=None,
                   help="denoiser rows per forward pass (default: from the device: on CUDA what fits half the free "
                        "memory, on the CPU 32 for small latents)")
    c.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return c


def _racing_arguments() -> argparse.ArgumentParser:
    """What ``score`` and ``eval`` take beyond the scoring choices (``calibrate`` scores every timestep
    of every candidate and fits the weights itself): racing and timestep weights."""
    c = argparse.ArgumentParser(add_help=False)
    c.add_argument("--adaptive", nargs="?", const="on", default=None, metavar="KEY=VALUE,...",
                   help="paired racing: drop a text once a paired test says it is worse than the image's best "
                   "(fewer denoiser rows); alone for the defaults (alpha=0.05,min_timesteps=5,round_size=3,keep=1,"
                   "settled=alpha,futility=0,over=texts,against=strongest) or with those options (over=images: each "
                   "text's images compete; against=leader: test against the leader alone)")
    c.add_argument("--weights", type=_parse_weights, default=None, metavar="uniform|exp[:RATE]|FILE",
                   help="how per-timestep scores average: uniform (default), exp[:RATE] (exp(-RATE t/1000), Clark & "
                        "Jaini's; RATE 7 by default) or a JSON file with a {timestep: weight} table under 'weights'")
    return c


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastitm", description="Diffusion models as image-text matchers.")
    sub = p.add_subparsers(dest="command", required=True)
    scoring, racing = _scoring_arguments(), _racing_arguments()

    s = sub.add_parser("score", parents=[scoring, racing], help="score images against texts and print the table",
                       description="Score every image against every text (higher = better match); prints the "
                       "table with each image's best text marked '*'.")
    s.add_argument("--images", nargs="+", required=True, help="image files")
    s.add_argument("--texts", nargs="+", required=True, help="captions")
    s.add_argument("--checkpoint", default=None,
                   help="save finished work here as it goes; rerun with it to resume after Ctrl-C")
    s.add_argument("--json", default=None, help="write the matrix, plan, method and versions here")
    s.set_defaults(func=cmd_score)

    e = sub.add_parser("eval", parents=[scoring, racing],
                       help="evaluate on a benchmark task (published metrics, accuracy vs timesteps)",
                       description="Score a benchmark task read from its published on-disk format and write "
                       "report.json, report.md, accuracy_vs_timesteps.png and accuracy_vs_rows.png "
                       "to --out.")
    e.add_argument("task", choices=sorted(TASKS), help="the task")
    e.add_argument("--data", required=True, help="the dataset folder (jsonl: the .jsonl file)")
    e.add_argument("--split", default=None, help="dataset split where the task has several (default: the published one)")
    e.add_argument("--limit", type=int, default=None, help="score only the first N items")
    e.add_argument("--prompts", default=None, metavar="CSV",
                   help="classify: the class prompts, prompt,classname,classidx (the Diffusion Classifier's "
                        "prompts/*.csv; a class scores as its best prompt); default 'a photo of a <class>.'")
    e.add_argument("--fewshot", type=float, default=None, metavar="FRACTION",
                   help="score only the task's few-shot test part: what fastitm finetune --task TASK --fewshot "
                        "FRACTION leaves out of training (Discffusion's protocol: 0.05)")
    e.add_argument("--stream", type=int, default=16, metavar="BATCHES",
                   help="denoiser batches' worth of items per engine call (default 16): batches stay full across items")
    e.add_argument("--skip-bad", action="store_true", help="skip items whose images cannot be read (listed in the report)")
    e.add_argument("--image-cache", action="store_true",
                   help="compute each image's latent and unconditional rows once per process, not once per item "
                        "(tasks whose items share images, e.g. flickr30k_image); the same scores to float rounding, "
                        "but not to the bit across ranks or resumes")
    e.add_argument("--out", default="fastitm-eval", help="folder for the report (default fastitm-eval)")
    e.add_argument("--results", default=None,
                   help="append this run's record (report.json's header, metrics and items) to this .jsonl file; "
                        "`fastitm results FILE` prints the runs as one table")
    e.add_argument("--overwrite", action="store_true",
                   help="replace the report of another evaluation in --out (refused otherwise)")
    e.add_argument("--checkpoint", default=None,
                   help="save finished items here (per rank under torchrun); rerun with it to resume")
    e.set_defaults(func=cmd_eval)

    k = sub.add_parser("calibrate", parents=[scoring], help="fit timestep weights on a few labelled items of a task",
                       description="Score a small random part of a task once (every timestep), choose and fit "
                       "timestep weights by cross-validation (uniform, the exp family, or a non-negative logistic "
                       "model), print the held-out accuracy before and after, and write the weights file that "
                       "fastitm eval --weights reads.")
    k.add_argument("task", choices=sorted(TASKS), help="the task")
    k.add_argument("--data", required=True, help="the dataset folder (jsonl: the .jsonl file)")
    k.add_argument("--split", default=None, help="dataset split where the task has several")
    part = k.add_mutually_exclusive_group()
    part.add_argument("--fraction", type=float, default=None, help="score this share of the items (default 0.05)")
    part.add_argument("--limit", type=int, default=None, help="score this many items (at most)")
    k.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    k.add_argument("--sample-seed", type=int, default=0, help="seed of the items drawn and of the folds (default 0)")
    k.add_argument("--out", default="weights.json", help="the weights file to write (default weights.json)")
    k.set_defaults(func=cmd_calibrate)

    r = sub.add_parser("results", help="the runs recorded by fastitm eval --results, as one table")
    r.add_argument("file", help="the .jsonl file fastitm eval --results appended to")
    r.add_argument("--csv", action="store_true", help="CSV instead of a markdown table")
    r.set_defaults(func=cmd_results)

    f = sub.add_parser("finetune", help="train a LoRA adapter (HardNeg-DiffusionITM or Discffusion few-shot)",
                       description="Fine-tune the UNet with a LoRA adapter; rerun the same command to resume.")
    f.add_argument("--recipe", required=True, choices=("hardneg", "discffusion"), help="the training recipe")
    f.add_argument("--data", default="synthetic",
                   help="'synthetic' (fastitm.data's training split), a .jsonl file, or with --task that task's data folder")
    f.add_argument("--task", default=None, choices=sorted(TASKS),
                   help="train on this benchmark task's few-shot training part (--fewshot; then fastitm eval TASK "
                        "--fewshot scores exactly the rest)")
    f.add_argument("--fewshot", type=float, default=None, metavar="FRACTION",
                   help="with --task: the training part, a fraction of the task (default 0.05, the Discffusion paper's)")
    f.add_argument("--split", default=None, help="with --task: the task's split or subsets")
    f.add_argument("--out", required=True, help="folder for the adapter, its card and the checkpoint")
    f.add_argument("--model", default=None,
                   help="diffusers model folder or Hugging Face hub id (default: the embedded model)")
    f.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4, as published)")
    f.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 1000 hardneg, 300 discffusion)")
    f.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-4)")
    f.add_argument("--batch-size", type=int, default=None, help="examples per step (default 16 hardneg, 8 discffusion)")
    f.add_argument("--examples", type=int, default=None,
                   help="training examples (default 4000 hardneg, 1200 discffusion: 5%% of the training split)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="model precision")
    f.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    f.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    f.add_argument("--overwrite", action="store_true",
                   help="replace an adapter or checkpoint of other arguments in --out (refused otherwise)")
    f.set_defaults(func=cmd_finetune)

    d = sub.add_parser("demo", help="accuracy of every method on held-out synthetic images (no downloads)")
    d.add_argument("--model", default=None,
                   help="diffusers model folder or Hugging Face hub id (default: the embedded model)")
    d.add_argument("--n", type=int, default=48, help="held-out images to score")
    d.add_argument("--out", default="fastitm-demo", help="folder for the picture it saves")
    d.add_argument("--timesteps", type=int, default=10)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("info", help="versions and available backends; with --model, what a model folder holds")
    i.add_argument("--model", default=None,
                   help="a diffusers model folder, a hub id or 'tiny': print its family, components, parameter counts "
                        "and the methods it supports (read from the configs; no weights are loaded)")
    i.add_argument("--json", action="store_true", help="print as JSON (the model's description, or the installation's)")
    i.set_defaults(func=cmd_info)
    return p


def _valued_options(parser: argparse.ArgumentParser) -> set[str]:
    """The option strings (of every subcommand) that take a value."""
    found: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _valued_options(sub)
        elif action.option_strings and action.nargs != 0:
            found.update(action.option_strings)
    return found


def _negative_values(argv: list[str], valued: set[str]) -> list[str]:
    """argparse reads ``--lr -1e-4`` as two options ("expected one argument"): join a negative number to
    the option before it when that option takes a value (``--lr=-1e-4``), so the command refuses it with
    the reason instead."""
    out: list[str] = []
    for a in argv:
        if out and out[-1] in valued and a.startswith("-") and _is_number(a):
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    from .ops._backend import BackendUnavailable

    parser = build_parser()
    argv = _adaptive_alone(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(_negative_values(argv, _valued_options(parser)))
    interrupts.received.clear()
    # A command line speaks to a user, not a developer: a warning is one line, without fastitm's source
    # file and line (restored after, for callers of main() in a Python process).
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *rest, **kw: f"fastitm: warning: {message}\n"
    try:
        with interrupts.terminate_as_interrupt():  # SIGTERM (SLURM, torchrun) saves like Ctrl-C
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"fastitm: {'stopped by SIGTERM' if interrupts.exit_code() == 143 else 'interrupted'}", file=sys.stderr)
        return interrupts.exit_code()
    except BrokenPipeError:
        # The reader stopped early (`fastitm results runs.jsonl | head`): not an error. What is left in
        # stdout's buffer goes to /dev/null, so the interpreter's flush at exit cannot fail either.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # a stdout without a file descriptor (captured): nothing to flush
            pass
        return 0
    except (ValueError, TypeError, FileNotFoundError, OSError, BackendUnavailable) as e:
        print(f"fastitm: error: {e}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())
