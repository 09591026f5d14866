"""The fine-tuning loop: LoRA on a frozen model, a progress bar with the running loss, checkpoints
every few minutes and on Ctrl-C, resume by rerunning the same command, and a card beside the adapter."""

from __future__ import annotations

import json
import math
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from ..core.inputs import prepare_images
from ..core.interrupts import terminate_as_interrupt
from ..engine.attention import lse_pooling
from ..engine.common import encode_posterior, encode_texts, noisy_latents, progress_disabled, scale_latents, target
from ..evaluate.fewshot import fewshot as fewshot_split
from ..models.lora import adapter_state, add_lora, nonfinite, save_adapter
from ..models.model import Model, embedded_model_path, load_model
from .examples import TrainExample, item_examples, load_examples
from .recipes import MARGIN, discffusion_loss, hardneg_loss

RECIPES = ("hardneg", "discffusion")


LOSS_GROWTH = 100.0  # warn when the running loss exceeds the first steps' largest loss this many times
EARLY_STEPS = 10


def _differences(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} here" for k in keys) or "none"


def _finished(out: Path, args: dict, overwrite: bool) -> bool:
    """Whether ``out`` already holds the finished adapter of these arguments (then say so); refuse one
    made with other arguments unless ``overwrite``."""
    card = out / "training.json"
    if not card.is_file() or overwrite:
        return False
    try:
        prev = json.loads(card.read_text()).get("args")
    except (OSError, ValueError, AttributeError):
        prev = None
    if prev == args and (out / "adapter_model.safetensors").is_file():
        print(f"fastitm finetune: {out} already holds the adapter these arguments train (see its README.md); "
              "nothing to do (--overwrite trains it again)", file=sys.stderr)
        return True
    raise FileExistsError(f"--out {out} holds an adapter trained with other arguments "
                          f"({_differences(prev or {}, args)}); give another --out, or --overwrite to replace it")


class Diverged(ValueError):
    """Training produced a non-finite loss or weights; no adapter was written."""


# Per recipe: what it trains and its defaults. HardNeg adapts every attention projection (the
# published LoRACrossAttnProcessor on all processors); Discffusion the cross-attention ones.
DEFAULTS: dict[str, dict[str, Any]] = {
    "hardneg": {"steps": 1000, "lr": 1e-4, "batch_size": 16, "examples": 4000, "targets": "all"},
    "discffusion": {"steps": 300, "lr": 1e-4, "batch_size": 8, "examples": 1200, "targets": "cross"},
}
NEG_CANDIDATES = 4  # Discffusion: negatives per example (its hard negatives, topped up with random captions)


def _pixels(model, images) -> torch.Tensor:

    return prepare_images(images, model.resolution).to(model.device, model.dtype)


def _embed(model, texts: list[str]) -> torch.Tensor:

    with torch.no_grad():
        return encode_texts(model, texts)


def _latents(model, pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:

    mean, std = encode_posterior(model, pixels)
    eps = torch.randn(mean.shape, generator=gen).to(mean.device, mean.dtype)
    return scale_latents(model, mean + std * eps)  # a posterior sample, as published


def _noised(model, z, gen):

    noise = torch.randn(z.shape, generator=gen).to(z.device, z.dtype)
    t = torch.randint(0, model.num_train_timesteps, (z.shape[0],), generator=gen).to(z.device)
    return noisy_latents(model, z, noise, t), t, target(model, z, noise, t), noise


def _step(recipe: str, model, exs: list[TrainExample], idx: list[int], gen: torch.Generator, rng: random.Random,
          sink) -> tuple[torch.Tensor, dict]:
    batch = [exs[i] for i in idx]
    z = _latents(model, _pixels(model, [e.image for e in batch]), gen)
    x_t, t, tgt, noise = _noised(model, z, gen)
    emb_pos = _embed(model, [e.caption for e in batch])
    if recipe == "hardneg":
        u = rng.random()
        if u < 0.5:  # a negative image under the true caption, same noise and timestep
            # the example's own negative images (jsonl), else another example's image
            negs = [e.neg_images[rng.randrange(len(e.neg_images))] if e.neg_images else exs[rng.randrange(len(exs))].image
                    for e in batch]
            z_neg = _latents(model, _pixels(model, negs), gen)

            return hardneg_loss(model.unet, x_t, t, tgt, emb_pos, "image", x_t_neg=noisy_latents(model, z_neg, noise, t))
        if u < 0.75:  # a hard-negative caption
            caps = [e.neg_texts[rng.randrange(len(e.neg_texts))] if e.neg_texts else exs[rng.randrange(len(exs))].caption
                    for e in batch]
        else:  # a random other caption
            caps = [exs[rng.randrange(len(exs))].caption for _ in batch]
        return hardneg_loss(model.unet, x_t, t, tgt, emb_pos, "text", emb_neg=_embed(model, caps))
    rows = []
    for e in batch:
        negs = list(e.neg_texts)
        rng.shuffle(negs)
        negs = negs[:NEG_CANDIDATES]
        while len(negs) < NEG_CANDIDATES:
            other = exs[rng.randrange(len(exs))].caption
            if other != e.caption:
                negs.append(other)
        rows += [e.caption] + negs
    return discffusion_loss(model.unet, sink, x_t, t, _embed(model, rows), 1 + NEG_CANDIDATES)


def _save_checkpoint(path: Path, state: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        torch.save(state, f)
    os.replace(tmp, path)


def finetune(recipe: str, data: str = "synthetic", *, out: str | Path, model: Any = None, rank: int = 4,
             steps: int | None = None, lr: float | None = None, batch_size: int | None = None,
             examples: int | None = None, seed: int = 0, checkpoint_every: float = 120.0,
             progress: bool | None = None, command: str | None = None, overwrite: bool = False,
             task: str | None = None, fewshot: float | None = None, split: str | None = None) -> Path:
    """Train a LoRA adapter with ``recipe`` ("hardneg" or "discffusion") and save it in ``out``.

    data: "synthetic" (``fastitm.data``'s training split) or a .jsonl file; or, with ``task``, that
    benchmark task's data folder, trained on its few-shot training part (:func:`fastitm.evaluate.fewshot.fewshot`
    with ``fewshot``, 0.05 by default: Discffusion's protocol; ``fastitm eval TASK --fewshot`` then scores
    exactly the rest; the card records the split). examples: how many
    (default 4000 for hardneg, 1200 = 5% of the embedded model's 24000 training images for
    Discffusion's few-shot setting). model: a :class:`fastitm.Model` or a folder (default: the
    embedded model). A checkpoint (``out/checkpoint.pt``) is written every ``checkpoint_every``
    seconds and on Ctrl-C; calling again with the same arguments resumes from it, and once the adapter
    is written, says so and returns it. An ``out`` holding another run's adapter or checkpoint is refused
    unless ``overwrite``. Returns the adapter folder; load it with ``fastitm.load_model(path, lora=out)``.
    """
    from tqdm.auto import tqdm

    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {RECIPES}")
    d = DEFAULTS[recipe]
    steps = d["steps"] if steps is None else steps
    lr = d["lr"] if lr is None else lr
    batch_size = d["batch_size"] if batch_size is None else batch_size
    asked_examples, examples = examples, d["examples"] if examples is None else examples
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the adapter")
    if model is None or isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    if not isinstance(model, Model):
        raise TypeError(f"model must be a fastitm Model or a folder, got {type(model).__name__}")
    if model.dtype == torch.float16:
        # Without loss scaling fp16 gradients underflow and the updates overflow: NaN from the first steps.
        raise ValueError("fine-tuning in fp16 diverges (no loss scaling here): load the model with dtype fp32 or bf16")
    if model.family != "sd":
        # The recipes follow the published SD 1.x/2.x code (one text encoder, UNet cross-attention).
        raise ValueError(f"fine-tuning recipes are for SD 1.x/2.x models; {model.source} is {model.spec.label}")
    split_record = None
    if task is not None:

        part = fewshot_split(task, data, 0.05 if fewshot is None else fewshot, split)
        exs = item_examples(part.train[:asked_examples] if asked_examples is not None else part.train)
        split_record = part.record
        if len(exs) < 2:
            raise ValueError(f"the {part.record['fewshot']:g} few-shot training part of {task} in {data} has "
                             f"{len(exs)} item(s); fine-tuning needs at least 2 (a larger --fewshot, or more data)")
    elif fewshot is not None or split is not None:
        raise ValueError("--fewshot and --split choose a benchmark task's training part: give --task too")
    else:
        exs = load_examples(data, examples, seed=seed, size=model.resolution)
    out.mkdir(parents=True, exist_ok=True)

    source = "the embedded default model" if model.source == str(embedded_model_path()) else model.source
    args = {"recipe": recipe, "data": str(data), "rank": rank, "steps": steps, "lr": lr, "batch_size": batch_size,
            "examples": len(exs), "seed": seed, "targets": d["targets"], "model": source,
            **({"fewshot": split_record} if split_record else {})}
    ckpt = out / "checkpoint.pt"
    if _finished(out, args, overwrite):
        return out
    if overwrite:
        ckpt.unlink(missing_ok=True)
    params = add_lora(model.unet, rank, d["targets"], seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    history: list[dict] = []
    start, seconds = 0, 0.0
    early: list[float] = []  # the first EARLY_STEPS losses: the scale the loss-growth warning compares with
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state.get("args") != args:
            raise FileExistsError(f"--out {out} holds the checkpoint of a run with other arguments "
                                  f"({_differences(state.get('args') or {}, args)}); rerun that command to resume it, "
                                  "or give another --out, or --overwrite to start this one there")
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(model.unet, state["lora"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        rng.setstate(state["rng"])
        start, history, seconds = state["step"], state["history"], state["seconds"]
        early = list(state.get("early", []))

    def save(step: int, rng_states=None) -> None:
        g, r = rng_states or (gen.get_state(), rng.getstate())
        _save_checkpoint(ckpt, {"args": args, "step": step, "lora": adapter_state(model.unet),
                                "opt": opt.state_dict(), "gen": g, "rng": r,
                                "history": history, "early": early, "seconds": seconds + time.monotonic() - t0})

    t0 = time.monotonic()
    last_save = t0
    running = None
    warned = False
    model.unet.train()
    step = start
    snapshot = (gen.get_state(), rng.getstate())
    with ExitStack() as stack:
        stack.enter_context(terminate_as_interrupt())  # SIGTERM saves the checkpoint as Ctrl-C does
        sink = None
        if recipe == "discffusion":

            sink = stack.enter_context(lse_pooling(model.unet, "all", "logits", 1.0, "auto"))
        bar = stack.enter_context(tqdm(total=steps, initial=start, desc=f"finetune {recipe}", unit="step",
                                       disable=progress_disabled(progress), dynamic_ncols=True))
        try:
            for step in range(start, steps):
                snapshot = (gen.get_state(), rng.getstate())  # a resumed step redraws exactly this
                idx = torch.randint(len(exs), (batch_size,), generator=gen).tolist()
                loss, info = _step(recipe, model, exs, idx, gen, rng, sink)
                if not torch.isfinite(loss):  # diverged: stop before the update spreads it to the weights
                    save(step, snapshot)
                    raise Diverged(f"training diverged at step {step + 1}: the loss is {loss.item()} (lr {lr}); "
                                   f"nothing was written to {out / 'adapter_model.safetensors'}; try a lower --lr "
                                   f"(the checkpoint {ckpt} holds the last finite state)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
                if len(early) < EARLY_STEPS:
                    early.append(loss.item())
                base = max(early)  # the largest of the first steps' losses (the hinge losses are often 0)
                if not warned and len(early) == EARLY_STEPS and base > 0 and running > LOSS_GROWTH * base:
                    warned = True  # finite but blowing up: the usual sign of a too-high lr, said once
                    warnings.warn(f"the running loss grew from {base:.4g} to {running:.4g} by step {step + 1} "
                                  f"(lr {lr}): training may be diverging; a lower --lr usually helps", RuntimeWarning,
                                  stacklevel=2)
                bar.set_postfix(loss=f"{running:.4f}", **{k: f"{v:.3f}" for k, v in info.items()})
                bar.update(1)
                if step % max(1, steps // 50) == 0 or step == steps - 1:
                    history.append({"step": step + 1, "loss": loss.item(), "running_loss": running, **info})
                if time.monotonic() - last_save >= checkpoint_every:
                    save(step + 1)
                    last_save = time.monotonic()
        except KeyboardInterrupt:
            save(step, snapshot)  # the step in flight did not finish: it reruns on resume, same draws
            print(f"\nfastitm finetune: interrupted at step {step}; saved {ckpt}, rerun the same command to resume",
                  file=sys.stderr)
            raise
    model.unet.eval()
    model.unet.requires_grad_(False)
    seconds += time.monotonic() - t0
    bad = nonfinite(adapter_state(model.unet))
    if bad:  # never write an adapter that would score NaN
        raise Diverged(f"training produced non-finite adapter weights ({len(bad)} tensors, e.g. {bad[0]}); "
                       f"nothing was written to {out}; try a lower --lr")
    save_adapter(model.unet, out, rank, d["targets"])
    card = {"command": command or f"fastitm.finetune.finetune({recipe!r}, {str(data)!r}, ...)", "args": args,
            "seconds": round(seconds, 1), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "history": history,
            "loss": "MSE_pos - clamp(MSE_neg, max=MSE_pos)" if recipe == "hardneg"
            else f"clamp(max_neg - pos + {MARGIN}, 0)"}
    (out / "training.json").write_text(json.dumps(card, indent=1))
    (out / "README.md").write_text(_card_markdown(card))
    ckpt.unlink(missing_ok=True)
    return out


def _card_markdown(card: dict) -> str:
    a = card["args"]
    lines = [f"# LoRA adapter: {a['recipe']}", "", f"Command: `{card['command']}`", "",
             f"Model: `{a['model']}`; data: `{a['data']}`, {a['examples']} examples; LoRA rank {a['rank']} on the "
             f"{'cross-attention' if a['targets'] == 'cross' else 'attention'} projections; {a['steps']} steps, batch "
             f"{a['batch_size']}, AdamW lr {a['lr']}; seed {a['seed']}.", "",
             f"Loss: {card['loss']}. Trained in {card['seconds']:.0f} s on {card['machine']} (torch {card['torch']}).",
             ""]
    hist = card["history"]
    if a["recipe"] == "hardneg":
        lines += ["The loss is 0 whenever the negative's error already exceeds the true caption's (the clamp);",
                  "its gradient then lowers the true caption's error alone.", ""]
    extra = [k for k in (hist[0] if hist else {}) if k not in ("step", "loss", "running_loss")]
    lines += ["| step | loss | running loss | " + " | ".join(extra) + " |", "|---|---|---|" + "---|" * len(extra)]
    shown = hist[:: max(1, len(hist) // 10)]
    if hist and shown[-1] is not hist[-1]:  # always end on the last row, once
        shown.append(hist[-1])
    for h in shown:
        lines.append(f"| {h['step']} | {h['loss']:.4f} | {h['running_loss']:.4f} | "
                     + " | ".join(f"{h[k]:.4f}" for k in extra) + " |")
    return "\n".join(lines) + "\n"
