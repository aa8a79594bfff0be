"""Classifier-free guidance written once (inference/guidance.py) and the flow timestep helpers."""

from __future__ import annotations

import pytest
import torch

from inference.flow import shift_sigma, sigma_of, timestep_of, unshift_sigma
from inference.guidance import Cond, Guidance, guided_velocity


class Linear:
    """v = a x + context (per-sample scalar) * t / 1000: cond and uncond give different, known predictions."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, x, t, context, clip_fea=None, y=None):
        self.calls.append(x.shape[0])
        return 0.5 * x + context.view(-1, 1, 1, 1, 1) * (t / 1000).view(-1, 1, 1, 1, 1)


def _inputs(b: int = 3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 2, 1, 2, 2, generator=g)
    return x, Cond(torch.full((b,), 2.0)), Cond(torch.full((b,), -1.0))


def test_standard_cfg_convention() -> None:
    net, (x, c, u) = Linear(), _inputs()
    t = torch.full((3,), 500.0)
    v = guided_velocity(net, x, t, c, u, Guidance(4.0), per_sample=False)
    v_c, v_u = 0.5 * x + 2.0 * 0.5, 0.5 * x - 1.0 * 0.5
    torch.testing.assert_close(v, v_u + 4.0 * (v_c - v_u))
    assert net.calls == [6]  # one batched forward of [cond; uncond]


def test_scale_one_or_no_uncond_runs_the_conditional_branch_alone() -> None:
    net, (x, c, u) = Linear(), _inputs()
    t = torch.full((3,), 500.0)
    for guidance, uncond in ((Guidance(1.0), u), (Guidance(5.0), None)):
        torch.testing.assert_close(guided_velocity(net, x, t, c, uncond, guidance, per_sample=True),
                                   0.5 * x + 1.0)
    assert net.calls == [3, 3]


def test_interval_host_and_device_decisions_agree() -> None:
    net, (x, c, u) = Linear(), _inputs()
    g = Guidance(3.0, (300, 850))
    assert [g.applies_at(t) for t in (299.9, 300, 850, 850.1)] == [False, True, True, False]
    t = torch.tensor([200.0, 500.0, 900.0])
    per_sample = guided_velocity(net, x, t, c, u, g, per_sample=True)
    for i in range(3):  # the sampler's path: one timestep for the whole batch, decided on the host
        ti = t[i].repeat(3)
        host = guided_velocity(net, x, ti, c, u, g, per_sample=False, apply=g.applies_at(float(t[i])))
        torch.testing.assert_close(per_sample[i], host[i])
    torch.testing.assert_close(g.scales(t), torch.tensor([1.0, 3.0, 1.0]))


@pytest.mark.parametrize("bad", [(900, 100), (-1, 10), (0, 1001), (1,), "0,1000"])
def test_bad_interval(bad) -> None:
    with pytest.raises(ValueError, match="interval"):
        Guidance(2.0, bad)


def test_bad_scale() -> None:
    with pytest.raises(ValueError, match="finite"):
        Guidance(float("nan"))


def test_timestep_helpers_and_inverse_shift() -> None:
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(timestep_of(s), 1000 * s) and torch.allclose(sigma_of(timestep_of(s)), s)
    for shift in (0.5, 1.0, 3.0, 8.0):
        torch.testing.assert_close(unshift_sigma(shift_sigma(s, shift), shift), s)
    with pytest.raises(ValueError, match="shift"):
        unshift_sigma(s, 0.0)
