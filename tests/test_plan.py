import pytest
import torch

import fastitm
from fastitm.core.plan import grid_timesteps


@pytest.mark.parametrize("T", [1, 3, 7, 10, 30, 100])
def test_published_grid(tiny, T):
    plan = fastitm.make_plan(tiny, T, seed=0)
    assert plan.timesteps.tolist() == list(range(10, 990, 1000 // T))
    assert plan.noise.shape == (len(plan.timesteps), *tiny.latent_shape)
    assert grid_timesteps(T, 2000) == [2 * t for t in range(10, 990, 1000 // T)]


def test_stratified_one_per_stratum(tiny):
    plan = fastitm.make_plan(tiny, 8, seed=3, scheme="stratified")
    ts = plan.timesteps
    assert ts.tolist() != fastitm.make_plan(tiny, 8, seed=4, scheme="stratified").timesteps.tolist()
    for k, t in enumerate(ts.tolist()):
        assert k * 125 <= t < (k + 1) * 125


def test_noise_is_seeded_standard_normal(tiny):
    a = fastitm.make_plan(tiny, 10, seed=1)
    b = fastitm.make_plan(tiny, 10, seed=1)
    assert torch.equal(a.noise, b.noise)
    expected = torch.randn((10, *tiny.latent_shape), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.noise, expected)
    assert not torch.equal(a.noise, fastitm.make_plan(tiny, 10, seed=2).noise)


def test_explicit_timesteps(tiny):
    plan = fastitm.make_plan(tiny, [999, 0, 500], seed=0)
    assert plan.timesteps.tolist() == [999, 0, 500] and plan.scheme == "explicit"
    assert plan.describe()["timesteps"] == [999, 0, 500]
