"""One-side critic timesteps for sharded two-expert DMD (distill/losses.py `side_draw`, `critic_sigmas(side=)`):
every sample of a call on the drawn side of the boundary, and the same per-sample distribution as the plain draw."""

from __future__ import annotations

import pytest
import torch

from distill.losses import ExpertSide, critic_sigmas, side_draw
from inference.flow import shift_sigma, sigma_of

SHIFT, T_MIN, T_MAX, BOUNDARY = 5.0, 20.0, 980.0, 0.875


def test_without_side_the_draw_is_the_plain_shifted_uniform():
    got = critic_sigmas(64, SHIFT, T_MIN, T_MAX, torch.Generator().manual_seed(3))
    u = torch.rand(64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, shift_sigma(u, SHIFT).clamp(sigma_of(T_MIN), sigma_of(T_MAX)))


@pytest.mark.parametrize("high", [True, False])
def test_every_sample_is_on_the_chosen_side(high):
    s = critic_sigmas(4096, SHIFT, T_MIN, T_MAX, torch.Generator().manual_seed(0), side=ExpertSide(high, BOUNDARY))
    t = 1000 * s
    assert bool(torch.all(t >= 875.0)) if high else bool(torch.all(t < 875.0))


def test_the_side_mixture_keeps_the_per_sample_distribution():
    """Side first (shared), then the sample within it: the marginal CDF equals the plain draw's (n = 40,000 each;
    the Kolmogorov distance of two such samples stays under 0.015 with overwhelming probability)."""
    shared, per_sample = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    mixed = torch.cat([critic_sigmas(8, SHIFT, T_MIN, T_MAX, per_sample, side=side_draw(SHIFT, BOUNDARY, T_MIN,
                                                                                            T_MAX, shared))
                       for _ in range(5000)])
    plain = critic_sigmas(40000, SHIFT, T_MIN, T_MAX, torch.Generator().manual_seed(4))
    grid = torch.linspace(0.0, 1.0, 201)
    cdf = lambda x: (x[None, :] <= grid[:, None]).double().mean(1)  # noqa: E731
    assert float((cdf(mixed) - cdf(plain)).abs().max()) < 0.015
    # the high side's share is P(t >= 875) of the plain draw, 1 - shift^-1(0.875) = 1 - 0.583 = 0.417 at shift 5
    assert abs(float((mixed >= 0.875).double().mean()) - (1 - 0.875 / (5 - 4 * 0.875))) < 0.015


def test_the_side_is_the_same_for_the_same_shared_seed_and_refused_outside_the_range():
    draws = [side_draw(SHIFT, BOUNDARY, T_MIN, T_MAX, torch.Generator().manual_seed(9)) for _ in range(2)]
    assert draws[0] == draws[1]
    with pytest.raises(ValueError, match="boundary 990 is outside the critic's timestep range"):
        side_draw(SHIFT, 0.99, T_MIN, T_MAX, torch.Generator())
