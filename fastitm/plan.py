"""The plan: every random choice a score depends on, fixed up front and carried by every result.

Passing ``res.plan`` back to a scorer reproduces its scores bit for bit on the same device, and lets
the reference and the fast engine be compared on exactly the same noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

LATENT_MODES = ("mean", "sample")
TIMESTEP_SCHEMES = ("grid", "stratified")


@dataclass
class Plan:
    """Timesteps [T] (int64), noise [T, C, h, w] (float32, CPU), the latent choice and the seed.

    The noise of timestep k is shared by every image and every text (a paired comparison, as the
    published scripts do). ``latent="sample"`` draws each image's posterior sample from a generator
    seeded with ``seed + 1 + image_index`` so the draw does not depend on batching.
    """

    timesteps: torch.Tensor
    noise: torch.Tensor
    latent: str = "mean"
    seed: int | None = None
    scheme: str = "explicit"
    meta: dict = field(default_factory=dict)

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
        if self.latent == "sample" and self.seed is None:
            raise ValueError("latent='sample' needs a seed")

    def __len__(self) -> int:
        return self.timesteps.numel()

    def describe(self) -> dict:
        """A JSON-able description (the noise itself is reproducible from the seed, not listed)."""
        return {
            "timesteps": [int(t) for t in self.timesteps],
            "scheme": self.scheme,
            "seed": self.seed,
            "latent": self.latent,
            "noise_shape": list(self.noise.shape),
            "noise_dtype": str(self.noise.dtype).replace("torch.", ""),
        }

    def check_model(self, model) -> None:
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
             "seed": self.seed, "scheme": self.scheme, "meta": self.meta},
            path,
        )

    @classmethod
    def load(cls, path) -> "Plan":
        d = torch.load(path, map_location="cpu", weights_only=True)
        return cls(**d)


def grid_timesteps(T: int, num_train_timesteps: int = 1000) -> list[int]:
    """The published DiffusionITM grid ``range(10, 990, 1000 // T)``, scaled to the schedule length.

    For T that does not divide 980 evenly the grid can hold a few more or fewer than T entries
    (T=100 gives 98); that is the published behaviour and ``plan.timesteps`` records what was used.
    """
    scale = num_train_timesteps / 1000
    return [int(t * scale) for t in range(10, 990, 1000 // T)]


def stratified_timesteps(T: int, num_train_timesteps: int, generator: torch.Generator) -> list[int]:
    """One timestep drawn uniformly from each of T equal strata of [0, num_train_timesteps)."""
    edges = torch.linspace(0, num_train_timesteps, T + 1)
    u = torch.rand(T, generator=generator)
    ts = (edges[:-1] + u * (edges[1:] - edges[:-1])).floor().long().clamp(0, num_train_timesteps - 1)
    return ts.tolist()


def make_plan(
    model,
    timesteps: int | Sequence[int] | torch.Tensor = 10,
    *,
    seed: int = 0,
    scheme: str = "grid",
    latent: str = "mean",
) -> Plan:
    """Build a plan for ``model``.

    ``timesteps`` is a count T (with ``scheme`` "grid", the published DiffusionITM grid, or
    "stratified") or an explicit list of timesteps. The noise is drawn on the CPU in float32 from a
    generator seeded with ``seed``, so the same seed gives the same plan on every machine.
    """
    n_train = model.num_train_timesteps
    gen = torch.Generator("cpu").manual_seed(int(seed))
    if isinstance(timesteps, bool):
        raise TypeError("timesteps must be an int count or a list of ints, not a bool")
    if isinstance(timesteps, int):
        T = timesteps
        if T < 1:
            raise ValueError(f"timesteps must be at least 1, got {T}")
        if T > n_train:
            raise ValueError(f"timesteps={T} exceeds the schedule's {n_train} training timesteps")
        if scheme == "grid":
            if T > 1000:
                raise ValueError(f"the published grid supports at most 1000 timesteps, got {T}")
            ts = grid_timesteps(T, n_train)
        elif scheme == "stratified":
            ts = stratified_timesteps(T, n_train, gen)
        else:
            raise ValueError(f"unknown timestep scheme {scheme!r}; choose one of {TIMESTEP_SCHEMES}")
    else:
        ts = torch.as_tensor(timesteps)
        if ts.numel() == 0:
            raise ValueError("the explicit timestep list is empty")
        if ts.is_floating_point() or ts.dtype == torch.bool:
            raise TypeError(f"explicit timesteps must be integers, got dtype {ts.dtype}")
        ts = ts.long().flatten().tolist()
        bad = [t for t in ts if not 0 <= t < n_train]
        if bad:
            raise ValueError(f"timesteps {bad} are outside the schedule's range [0, {n_train})")
        scheme = "explicit"
    if latent not in LATENT_MODES:
        raise ValueError(f"unknown latent mode {latent!r}; choose one of {LATENT_MODES}")
    noise = torch.randn((len(ts), *model.latent_shape), generator=gen, dtype=torch.float32)
    return Plan(torch.tensor(ts, dtype=torch.long), noise, latent=latent, seed=int(seed), scheme=scheme)
