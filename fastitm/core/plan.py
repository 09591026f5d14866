"""The plan: every random choice a score depends on, fixed up front and carried by every result.

Passing ``res.plan`` back to a scorer reproduces its scores bit for bit on the same device, and lets
the reference and the fast engine be compared on exactly the same noise.
"""

from __future__ import annotations

import hashlib
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

LATENT_MODES = ("mean", "sample", "sample_per_timestep")
TIMESTEP_SCHEMES = ("grid", "stratified", "midpoint", "discffusion")
NOISE_MODES = ("per_timestep", "shared")
# Seeds feed torch.Generator.manual_seed (at most 2**64 - 1) after an offset per image and timestep.
MAX_SEED = 2**62


@dataclass
class Plan:
    """Timesteps [T] (int64), noise [T, C, h, w] (float32, CPU), the latent choice and the seed.

    The noise of timestep k is shared by every image and every text (a paired comparison, as the
    published scripts do); ``noise_mode="shared"`` marks a plan whose T noise rows are one tensor
    (the published Diffusion Classifier Winoground script). Latents:

    - ``"mean"``: the VAE posterior mean (deterministic; the default);
    - ``"sample"``: one posterior sample per image, from a generator seeded ``seed + 1 + i``;
    - ``"sample_per_timestep"``: a fresh posterior sample for every (image i, timestep k), seeded by
      :func:`cell_seed` and shared by all texts of the image, so the empty-prompt row stays shared.
      The published DiffusionITM and Discffusion pipelines re-sample the latent at every timestep;
      this is their expectation, with less variance than a draw per pair.
    Every draw depends only on (seed, i, k), never on batching.
    """

    timesteps: torch.Tensor
    noise: torch.Tensor
    latent: str = "mean"
    seed: int | None = None
    scheme: str = "explicit"
    meta: dict = field(default_factory=dict)
    noise_mode: str = "per_timestep"
    # The model family the plan was made for ("sd", "sdxl", "sd3"): a timestep means a different
    # noise level in each (DDPM alphas vs flow-matching sigma), so another family refuses the plan.
    # None: a plan built by hand or saved before families were recorded.
    family: str | None = None

    def __post_init__(self) -> None:
        self.timesteps = torch.as_tensor(self.timesteps, dtype=torch.long).cpu()
        if self.timesteps.ndim != 1 or self.timesteps.numel() < 1:
            raise ValueError(f"plan.timesteps must be a non-empty 1-D tensor, got shape {tuple(self.timesteps.shape)}")
        if self.noise.ndim != 4 or self.noise.shape[0] != self.timesteps.numel():
            raise ValueError(
                f"plan.noise must be [T, C, h, w] with T={self.timesteps.numel()}, got {tuple(self.noise.shape)}"
            )
        if self.latent not in LATENT_MODES:
            raise ValueError(f"unknown latent mode {self.latent!r}; choose one of {LATENT_MODES}")
        if self.latent != "mean" and self.seed is None:
            raise ValueError(f"latent={self.latent!r} needs a seed")
        if self.noise_mode not in NOISE_MODES:
            raise ValueError(f"unknown noise mode {self.noise_mode!r}; choose one of {NOISE_MODES}")

    def __len__(self) -> int:
        return self.timesteps.numel()

    def describe(self) -> dict:
        """A JSON-able description (the noise itself is reproducible from the seed, not listed)."""
        return {
            "timesteps": [int(t) for t in self.timesteps],
            "scheme": self.scheme,
            "seed": self.seed,
            "latent": self.latent,
            "noise": self.noise_mode,
            "noise_shape": list(self.noise.shape),
            "noise_dtype": str(self.noise.dtype).replace("torch.", ""),
            "family": self.family,
        }

    def check_model(self, model) -> None:
        if self.family is not None and self.family != model.family:
            raise ValueError(f"this plan was made for a {self.family!r} model and cannot score a {model.family!r} "
                             f"model (a timestep means another noise level there); make a new plan for it")
        if tuple(self.noise.shape[1:]) != tuple(model.latent_shape):
            raise ValueError(
                f"plan noise is for latents of shape {tuple(self.noise.shape[1:])}, but the model's "
                f"latents are {tuple(model.latent_shape)}"
            )
        n = model.num_train_timesteps
        if int(self.timesteps.min()) < 0 or int(self.timesteps.max()) >= n:
            raise ValueError(f"plan timesteps must lie in [0, {n}), got {self.timesteps.tolist()}")

    def save(self, path) -> None:
        torch.save(
            {"timesteps": self.timesteps, "noise": self.noise, "latent": self.latent,
             "seed": self.seed, "scheme": self.scheme, "meta": self.meta, "noise_mode": self.noise_mode,
             "family": self.family},
            path,
        )

    @classmethod
    def load(cls, path) -> Plan:
        d = torch.load(path, map_location="cpu", weights_only=True)
        return cls(**d)


def cell_seed(seed: int, image: int, k: int) -> int:
    """The generator seed of image ``image``'s posterior sample at plan timestep index ``k`` under
    ``latent="sample_per_timestep"``: a hash of (seed, image, k), so draws never depend on batching
    and no two cells share a generator."""
    digest = hashlib.sha256(f"fastitm-latent:{int(seed)}:{int(image)}:{int(k)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def grid_timesteps(T: int, num_train_timesteps: int = 1000) -> list[int]:
    """The published DiffusionITM grid ``range(10, 990, 1000 // T)``, scaled to the schedule length.

    For T that does not divide 980 evenly the grid can hold a few more or fewer than T entries
    (T=100 gives 98, T=500 gives 980); that is the published behaviour and ``plan.timesteps``
    records what was used (:func:`make_plan` warns when more run than asked for, or when a count
    over 100 is not hit: 334-500 give 490, 501-1000 give 980).
    """
    scale = num_train_timesteps / 1000
    return [int(t * scale) for t in range(10, 990, 1000 // T)]


def midpoint_timesteps(T: int, num_train_timesteps: int = 1000) -> list[int]:
    """Diffusion Classifier's grid (``eval_prob_adaptive.py``): the midpoints of T equal strata,
    ``range(n // T // 2, n, n // T)[:T]`` for a schedule of n training timesteps."""
    n = num_train_timesteps
    return list(range(n // T // 2, n, n // T))[:T]


def discffusion_timesteps(T: int, num_train_timesteps: int = 1000) -> list[int]:
    """Discffusion's timesteps (``DSDPipeline.sampled_timesteps`` over EulerDiscreteScheduler's
    1000 descending timesteps): ``999 - g`` for g on the grid ``range(10, 990, 1000 // T)``,
    ascending, scaled to the schedule length."""
    top = num_train_timesteps - 1
    return sorted(top - g for g in grid_timesteps(T, num_train_timesteps))


_SCHEMES = {"grid": grid_timesteps, "midpoint": midpoint_timesteps, "discffusion": discffusion_timesteps}


def stratified_timesteps(T: int, num_train_timesteps: int, generator: torch.Generator) -> list[int]:
    """One timestep drawn uniformly from each of T equal strata of [0, num_train_timesteps)."""
    edges = torch.linspace(0, num_train_timesteps, T + 1)
    u = torch.rand(T, generator=generator)
    ts = (edges[:-1] + u * (edges[1:] - edges[:-1])).floor().long().clamp(0, num_train_timesteps - 1)
    return ts.tolist()


def check_seed(seed: Any, what: str = "seed") -> int:
    """An int seed in [0, 2**62]; a bool, a float or a string is refused naming the argument."""
    if isinstance(seed, torch.Tensor) and seed.ndim == 0 and not seed.is_floating_point() and seed.dtype != torch.bool:
        seed = int(seed)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {type(seed).__name__} {seed!r}")
    seed = int(seed)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{what} must lie in [0, 2**62], got {seed}")
    return seed


def timestep_count(timesteps: Any) -> int | None:
    """The count a ``timesteps`` argument means (a Python, numpy or 0-d tensor integer), or None when
    it is a list of explicit timesteps. Floats, bools and strings are refused naming the argument."""
    if isinstance(timesteps, torch.Tensor) and timesteps.ndim == 0:
        if timesteps.is_floating_point() or timesteps.dtype == torch.bool:
            raise TypeError(f"timesteps must be an int count or a list of ints, got a {timesteps.dtype} tensor")
        return int(timesteps)
    if isinstance(timesteps, bool):
        raise TypeError("timesteps must be an int count or a list of ints, not a bool")
    if isinstance(timesteps, numbers.Integral):
        return int(timesteps)
    if isinstance(timesteps, (numbers.Number, str, bytes)):
        raise TypeError(f"timesteps must be an int count or a list of ints, got {type(timesteps).__name__} "
                        f"{timesteps!r}")
    return None


def explicit_timesteps(timesteps: Any, n_train: int | None) -> list[int]:
    """A flat list of explicit timesteps, each an int in [0, n_train); raises naming what is wrong.
    ``n_train`` None (no model yet): only the sign is checked."""
    if isinstance(timesteps, torch.Tensor):
        ts = timesteps.detach().cpu()
        if ts.ndim != 1:
            raise ValueError(f"explicit timesteps must be a flat list, got a tensor of shape {tuple(ts.shape)}")
        if ts.is_floating_point() or ts.dtype == torch.bool:
            raise TypeError(f"explicit timesteps must be integers, got dtype {ts.dtype}")
        values = ts.tolist()
    else:
        try:
            values = list(timesteps)
        except TypeError:
            raise TypeError(f"timesteps must be an int count or a list of ints, got {type(timesteps).__name__}") from None
        for n, t in enumerate(values):
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                if hasattr(t, "__len__") and not isinstance(t, str):
                    raise ValueError(f"explicit timesteps must be a flat list of ints; entry {n} is {t!r}")
                raise TypeError(f"explicit timesteps must be ints; entry {n} is {type(t).__name__} {t!r}")
        values = [int(t) for t in values]
    if not values:
        raise ValueError("the explicit timestep list is empty")
    if n_train is None:
        bad = [t for t in values if t < 0]
        if bad:
            raise ValueError(f"timesteps {bad} are negative; a timestep lies in [0, the model's training timesteps) "
                             "(0-999 for Stable Diffusion)")
        return values
    bad = [t for t in values if not 0 <= t < n_train]
    if bad:
        raise ValueError(f"timesteps {bad} are outside the schedule's range [0, {n_train})")
    return values


def check_plan_args(timesteps: Any, seed: Any, scheme: str, latent: str, noise: str) -> None:
    """Type and name checks of the plan's arguments that need no model (so they fail at once)."""
    if timesteps is not None and timestep_count(timesteps) is None:
        explicit_timesteps(timesteps, None)
    if seed is not None:
        check_seed(seed)
    if scheme not in TIMESTEP_SCHEMES:
        raise ValueError(f"unknown timestep scheme {scheme!r}; choose one of {TIMESTEP_SCHEMES}")
    if latent not in LATENT_MODES:
        raise ValueError(f"unknown latent mode {latent!r}; choose one of {LATENT_MODES}")
    if noise not in NOISE_MODES:
        raise ValueError(f"unknown noise mode {noise!r}; choose one of {NOISE_MODES}")


def make_plan(
    model,
    timesteps: int | Sequence[int] | torch.Tensor = 10,
    *,
    seed: int = 0,
    scheme: str = "grid",
    latent: str = "mean",
    noise: str = "per_timestep",
) -> Plan:
    """Build a plan for ``model``.

    ``timesteps`` is a count T (an int, numpy integer or 0-d integer tensor) laid out by ``scheme``:
    "grid" (the published DiffusionITM grid), "midpoint" (Diffusion Classifier's), "discffusion"
    (999 minus the grid, Discffusion's), or "stratified" (one random timestep per stratum); or an
    explicit flat list of timesteps. The noise is drawn on the CPU in float32 from a generator seeded
    with ``seed``, so the same seed gives the same plan on every machine; ``noise="shared"`` draws
    one tensor and uses it at every timestep.
    """
    n_train = model.num_train_timesteps
    check_plan_args(timesteps, seed, scheme, latent, noise)
    seed = check_seed(seed)
    gen = torch.Generator("cpu").manual_seed(seed)
    T = timestep_count(timesteps)
    if T is not None:
        if T < 1:
            raise ValueError(f"timesteps must be at least 1, got {T}")
        if T > n_train:
            raise ValueError(f"timesteps={T} exceeds the schedule's {n_train} training timesteps")
        if scheme == "stratified":
            ts = stratified_timesteps(T, n_train, gen)
        else:
            if scheme in ("grid", "discffusion") and T > 1000:
                raise ValueError(f"the published grid supports at most 1000 timesteps, got {T}")
            ts = _SCHEMES[scheme](T, n_train)
            # More work than asked, or a large count the grid does not hit (T=100 giving 98 is the
            # published setting and stays quiet).
            if len(ts) > T or (T > 100 and len(ts) != T):
                warnings.warn(
                    f"timesteps={T} on the {scheme!r} scheme (the published grid range(10, 990, 1000 // {T})) "
                    f"gives {len(ts)} timesteps, and {len(ts)} will run, as the published code would; pass "
                    "scheme='stratified' or an explicit list to run exactly the count asked for",
                    stacklevel=3,
                )
    else:
        ts = explicit_timesteps(timesteps, n_train)
        scheme = "explicit"
    shape = (len(ts), *model.latent_shape)
    if noise == "shared":
        eps = torch.randn((1, *model.latent_shape), generator=gen, dtype=torch.float32).expand(shape).contiguous()
    else:
        eps = torch.randn(shape, generator=gen, dtype=torch.float32)
    return Plan(torch.tensor(ts, dtype=torch.long), eps, latent=latent, seed=seed, scheme=scheme, noise_mode=noise,
                family=model.family)
