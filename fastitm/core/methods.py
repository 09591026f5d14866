"""The scoring methods and their options, validated once and shared by every scorer.

Higher score = better match for every method.

- ``diffusion_itm`` (Krojer et al. 2023): per timestep the error of the text-conditioned noise
  prediction; ``err="l2"`` is the published norm over the latent (not squared, not averaged),
  ``"mse"`` the mean squared error. ``normalize=True`` subtracts the unconditional (empty prompt)
  error of the same image and timestep, which image retrieval needs; score = -mean_k (e - u).
- ``diffusion_classifier`` (Li et al. 2023): score = -mean_k MSE, no unconditional pass.
  ``elimination=[(T_1, keep_1), (T_2, keep_2), ...]`` is the paper's adaptive elimination for many
  candidate texts: after the first T_r timesteps (taken in a spread-out order, see
  :func:`fastitm.core.methods.spread_order`) only each image's best keep_r texts go on; the survivors
  get every timestep of the plan, the others score ``-inf`` (their partial errors stay in
  ``per_timestep``, NaN where not computed). On the command line: ``elimination=2:5,5:1``.
  ``order="published"`` evaluates each round's strided subset as ``eval_prob_adaptive.py`` does
  (``idx[T // T_r // 2 :: T // T_r][:T_r]`` minus the timesteps already done, so T_r counts can grow:
  [2, 5, 10] evaluates 2, 6, 10); the default ``"spread"`` adds timesteps farthest-point first.
- ``discffusion`` (He et al.): row-wise LogSumExp of the cross-attention logits (``pool="logits"``,
  the published code) or of ``lam`` times the softmax probabilities (``pool="probs"``, the paper's
  eq. 4), averaged over pixels, heads, the selected layers and timesteps; ``denoise=True`` adds the
  denoising term mean_k (u - e) with ``err``. Layers (see :func:`fastitm.engine.common.cross_attention_layers`):
  ``"all"`` cross-attention layers (the paper), ``"last"`` (the last one of each UNet block), or
  ``"published"`` (the published code's: the last block with cross-attention of each of down, mid
  and up, every attention of that block). ``mix_uncond=True`` averages each layer's term with the
  empty-prompt row's, as the published pipeline's mean over its [empty; text] batch does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

METHODS = ("diffusion_itm", "diffusion_classifier", "discffusion")
MAX_LAM = 1e30
ERRS = ("l2", "mse")

# name -> {option: (default, allowed values or a type)}
_OPTIONS: dict[str, dict[str, tuple[Any, Any]]] = {
    "diffusion_itm": {"err": ("l2", ERRS), "normalize": (True, bool)},
    "diffusion_classifier": {"elimination": (None, "rounds"), "order": ("spread", ("spread", "published"))},
    "discffusion": {
        "pool": ("logits", ("logits", "probs")),
        "lam": (1.0, float),
        "layers": ("all", ("all", "last", "published")),
        "denoise": (False, bool),
        "err": ("l2", ERRS),
        "mix_uncond": (False, bool),
    },
}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    options: dict = field(default_factory=dict)

    @property
    def err(self) -> str:
        return "mse" if self.name == "diffusion_classifier" else self.options["err"]

    @property
    def needs_uncond(self) -> bool:
        """Whether the unconditional (empty prompt) UNet pass enters the score."""
        if self.name == "diffusion_itm":
            return bool(self.options["normalize"])
        if self.name == "discffusion":
            return bool(self.options["denoise"] or self.options["mix_uncond"])
        return False

    @property
    def needs_error(self) -> bool:
        """Whether the conditional denoising error enters the score."""
        return self.name != "discffusion" or bool(self.options["denoise"])

    @property
    def needs_attention(self) -> bool:
        return self.name == "discffusion"

    @property
    def mix_uncond(self) -> bool:
        """Whether the empty-prompt row's attention term is averaged into every text's."""
        return self.name == "discffusion" and bool(self.options["mix_uncond"])


def parse_rounds(value: Any, what: str = "elimination") -> tuple[tuple[int, int], ...] | None:
    """``[(T_1, keep_1), ...]`` or ``"T_1:keep_1,T_2:keep_2"`` -> a checked tuple of pairs, or None.

    The timestep counts must rise and the numbers kept must fall, all at least 1.
    """
    if value is None or value == "" or value == "none":
        return None
    try:
        if isinstance(value, str):
            pairs = [tuple(int(x) for x in part.split(":")) for part in value.split(",")]
        else:
            pairs = [tuple(int(x) for x in p) for p in value]
        if not pairs or any(len(p) != 2 for p in pairs):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be rounds (timesteps, keep), e.g. [(2, 5), (5, 1)] or '2:5,5:1'; "
                         f"got {value!r}") from None
    ts, keeps = [p[0] for p in pairs], [p[1] for p in pairs]
    if min(ts + keeps) < 1 or ts != sorted(set(ts)) or keeps != sorted(set(keeps), reverse=True):
        raise ValueError(f"{what}: timestep counts must rise and the numbers kept fall, all >= 1; got {pairs}")
    return tuple(pairs)  # type: ignore[return-value]


def _radical_inverse(i: int) -> float:
    """i's binary digits mirrored about the point (van der Corput): 0, 1/2, 1/4, 3/4, 1/8, ..."""
    r, f = 0.0, 0.5
    while i:
        r += f * (i & 1)
        i >>= 1
        f /= 2
    return r


def spread_order(T: int) -> list[int]:
    """Timestep indices 0..T-1 ordered so that every prefix is spread evenly over the whole schedule:
    the order in which racing and adaptive elimination evaluate timesteps, and the fixed curves' plans.

    Farthest-point first from the middle: each next index is one farthest from those taken. Ties (the
    midpoints of equal gaps) are taken in van der Corput order of their position, not left to right:
    left to right, each level of the order (its last, the gaps of one timestep, is two thirds of a
    49-timestep plan) filled the plan from one end to the other, so a prefix of 25 of 49 held two
    thirds of the first half's timesteps and a third of the second's. Racing's settled stop predicts
    the timesteps to come from those seen, which holds only when the two are alike; the score
    differences' spread varies about 180-fold over a plan. Any prefix of n now holds within 3 of
    n x / T of the indices below any x (T up to 250; tests/test_engine.py)."""
    if T < 1:
        return []
    first = T // 2
    chosen = [first]
    dist = [abs(k - first) for k in range(T)]  # each index's distance to the nearest taken; -1: taken
    dist[first] = -1
    while len(chosen) < T:
        d = max(dist)
        level = [k for k in range(T) if dist[k] == d]
        for j in sorted(range(len(level)), key=lambda j: (_radical_inverse(j), j)):
            k = level[j]
            if dist[k] != d:  # a neighbour in the same gap was taken: it waits for its own level
                continue
            chosen.append(k)
            dist[k] = -1
            for q in range(max(0, k - d), min(T, k + d + 1)):
                if dist[q] > abs(q - k):
                    dist[q] = abs(q - k)
    return chosen


def published_stages(T: int, rounds: tuple[tuple[int, int], ...]) -> list[list[int]]:
    """Diffusion Classifier's published round structure (``eval_prob_adaptive.py``) over plan indices
    0..T-1: round r evaluates ``idx[T // T_r // 2 :: T // T_r][:T_r]`` minus what earlier rounds
    evaluated; a final stage evaluates the rest (the published last round, T_r = T)."""
    done: set[int] = set()
    stages = []
    for steps, _ in rounds:
        stride = T // steps
        picked = [k for k in list(range(T))[stride // 2 :: stride][:steps] if k not in done]
        done.update(picked)
        stages.append(picked)
    stages.append([k for k in range(T) if k not in done])
    return stages


def elimination_stages(T: int, rounds: tuple[tuple[int, int], ...] | None, order: str = "spread") -> list[list[int]]:
    """The plan's timestep indices in stages: one per elimination round, then the rest (evaluated
    for the survivors only). Without rounds, one stage of every timestep."""
    if not rounds:
        return [list(range(T))]
    check_rounds(rounds, T)
    if order == "published":
        return published_stages(T, rounds)
    spread = spread_order(T)
    bounds = [0] + [steps for steps, _ in rounds] + [T]
    return [spread[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def check_rounds(rounds: tuple[tuple[int, int], ...] | None, T: int) -> None:
    """Rounds must fit the plan: no round may ask for more timesteps than the plan has."""
    if rounds and rounds[-1][0] > T:
        raise ValueError(f"elimination round asks for {rounds[-1][0]} timesteps but the plan has {T}")


def resolve_method(method: str, options: dict | None = None) -> MethodSpec:
    """Check the method name and its options; fill defaults. Raises naming what is wrong."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    allowed = _OPTIONS[method]
    options = dict(options or {})
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        hint = f"its options are {sorted(allowed)}" if allowed else "it takes no options"
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; {hint}")
    out = {}
    for name, (default, kind) in allowed.items():
        value = options.get(name, default)
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError(f"option {name!r} of {method!r} must be True or False, got {value!r}")
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"option {name!r} of {method!r} must be a number, got {value!r}")
            value = float(value)
            if not value > 0 or not math.isfinite(value):
                raise ValueError(f"option {name!r} of {method!r} must be a positive finite number, got {value}")
            if name == "lam" and value > MAX_LAM:
                # lam multiplies probabilities in float32 and the pooled sums add up to Lq rows of it:
                # beyond this the sums overflow to inf and the scores to NaN.
                raise ValueError(f"option 'lam' of {method!r} must be at most {MAX_LAM:g}, got {value:g}")
        elif kind == "rounds":
            value = parse_rounds(value, f"option {name!r} of {method!r}")
        elif value not in kind:
            raise ValueError(f"option {name!r} of {method!r} must be one of {kind}, got {value!r}")
        out[name] = value
    return MethodSpec(method, out)
