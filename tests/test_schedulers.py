"""inference/flow.py, inference/schedulers.py, inference/sampling.py: formulas, grids, parity, the loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from inference.flow import add_noise, eps_from_v, expand_sigma, shift_sigma, v_from_x0_eps, x0_from_v
from inference.sampling import Cancelled, gaussian_noise, sample
from inference.schedulers import DistillScheduler, FlowEulerScheduler, FlowUniPCScheduler, wan_grid


def unshift(sp, shift):
    """Inverse of shift_sigma: s = s' / (shift - (shift - 1) s')."""
    return sp / (shift - (shift - 1) * sp)


# ---- flow.py -----------------------------------------------------------------------------------------------
def test_shift_sigma_warps_the_distill_step_list():
    s = shift_sigma(np.array([1000, 750, 500, 250]) / 1000, 5.0)
    np.testing.assert_allclose(s, [1.0, 0.9375, 5 / 6, 0.625], rtol=0, atol=1e-12)
    assert shift_sigma(0.0, 5.0) == 0.0 and shift_sigma(1.0, 5.0) == 1.0
    assert shift_sigma(0.3, 1.0) == pytest.approx(0.3)
    assert torch.allclose(shift_sigma(torch.tensor([0.5]), 3.0), torch.tensor([0.75]))  # 1.5 / 2
    with pytest.raises(ValueError, match="shift"):
        shift_sigma(0.5, 0.0)


def test_conversions_round_trip_and_sign_convention():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 5, generator=g), torch.randn(3, 4, 2, 5, generator=g)
    s = torch.tensor([0.1, 0.5, 0.9])
    v = v_from_x0_eps(x0, eps)
    assert torch.equal(v, eps - x0)  # v = eps - x0, not x0 - eps
    x_t = add_noise(x0, eps, s)
    torch.testing.assert_close(x_t[1], 0.5 * x0[1] + 0.5 * eps[1])  # per-sample sigma broadcast
    torch.testing.assert_close(x_t[2], 0.1 * x0[2] + 0.9 * eps[2])
    torch.testing.assert_close(x0_from_v(x_t, v, s), x0)
    torch.testing.assert_close(eps_from_v(x_t, v, s), eps)
    # v is the velocity of the path: x_{s2} - x_{s1} = (s2 - s1) v
    torch.testing.assert_close(add_noise(x0, eps, 0.7) - add_noise(x0, eps, 0.2), 0.5 * v)
    assert torch.equal(add_noise(x0, eps, 0.0), x0) and torch.equal(add_noise(x0, eps, 1.0), eps)
    assert torch.equal(add_noise(x0, eps, torch.tensor(1.0)), eps)
    # floats and 0-d tensors
    torch.testing.assert_close(x0_from_v(x_t[:1], v[:1], 0.1), x0[:1])
    torch.testing.assert_close(eps_from_v(x_t[:1], v[:1], torch.tensor(0.1)), eps[:1])


def test_expand_sigma_shapes():
    assert expand_sigma(torch.ones(3), 5).shape == (3, 1, 1, 1, 1)
    assert expand_sigma(0.5, 5) == 0.5
    assert expand_sigma(torch.tensor(0.5), 5).shape == ()
    with pytest.raises(ValueError, match="sigma"):
        expand_sigma(torch.ones(3, 1), 5)


# ---- grids ------------------------------------------------------------------------------------------------
def test_wan_grid_golden_n50_shift5():
    """Hand values of Wan's grid: s = linspace(0.999, 0, 51)[:-1], s' = 5s / (1 + 4s), t = int(1000 s')."""
    sched = FlowUniPCScheduler(shift=5.0)
    sched.set_timesteps(50)
    t, s = sched.timesteps, sched.sigmas
    assert t.dtype == torch.float32 and s.dtype == torch.float32 and t.shape == (50,) and s.shape == (51,)
    assert t[:5].tolist() == [999, 995, 991, 987, 982]
    assert t[-3:].tolist() == [241, 172, 92]
    # s'_0 = 5 * 0.999 / 4.996;  s'_49 = 5 * 0.01998 / 1.07992;  s'_48 = 5 * 0.03996 / 1.15984
    assert s[0].item() == pytest.approx(4.995 / 4.996, abs=1e-6)
    assert s[49].item() == pytest.approx(0.0999 / 1.07992, abs=1e-6)
    assert s[48].item() == pytest.approx(0.1998 / 1.15984, abs=1e-6)
    assert s[-1].item() == 0.0
    assert torch.all(s[1:] < s[:-1])


def test_wan_grid_golden_n4_and_validation():
    sigmas, t = wan_grid(4, 5.0)
    assert t.tolist() == [999, 937, 833, 624]  # trunc, e.g. 1000 * 5 * 0.24975 / 1.999 = 624.69
    hand = [4.995 / 4.996, 3.74625 / 3.997, 2.4975 / 2.998, 1.24875 / 1.999, 0]  # 5s / (1 + 4s)
    np.testing.assert_allclose(sigmas.numpy(), hand, atol=1e-6)
    for bad in (0, None, 2.5, True):
        with pytest.raises(ValueError, match="num_steps"):
            wan_grid(bad, 5.0)
    for cls in (FlowUniPCScheduler, FlowEulerScheduler):
        with pytest.raises(ValueError, match="shift"):
            cls(shift=0.0)
        with pytest.raises(RuntimeError, match="set_timesteps"):
            cls().step(torch.zeros(1), 0, torch.zeros(1))
    with pytest.raises(ValueError, match="order"):
        FlowUniPCScheduler(order=0)


def test_distill_grid():
    sched = DistillScheduler()
    assert sched.num_steps == 4
    np.testing.assert_allclose(sched.sigmas.numpy(), [1.0, 0.9375, 5 / 6, 0.625, 0.0], atol=1e-7)
    np.testing.assert_allclose(sched.timesteps.numpy(), [1000.0, 937.5, 833.3333, 625.0], atol=1e-4)
    assert sched.timesteps.dtype == torch.float32 and sched.sigmas.dtype == torch.float32
    sched.set_timesteps(None)
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match="denoising_step_list"):
        sched.set_timesteps(50)
    assert DistillScheduler([1000, 500], shift=1.0).timesteps.tolist() == [1000.0, 500.0]


@pytest.mark.parametrize("kwargs", [
    dict(denoising_step_list=[1000, 1000, 500]), dict(denoising_step_list=[500, 750]),
    dict(denoising_step_list=[1001, 500]), dict(denoising_step_list=[1000, 0]), dict(denoising_step_list=[]),
    dict(denoising_step_list=["1000"]), dict(shift=-1.0), dict(shift=float("nan")), dict(mode="ddim"),
])
def test_distill_validation(kwargs):
    with pytest.raises(ValueError):
        DistillScheduler(**kwargs)


# ---- solvers ----------------------------------------------------------------------------------------------
def _run(sched, x, v_fn):
    for i in range(sched.num_steps):
        eps = torch.randn_like(x) if sched.needs_noise and i < sched.num_steps - 1 else None
        x = sched.step(v_fn(x, i), i, x, noise=eps)
    return x


@pytest.mark.parametrize("make", [
    lambda: FlowEulerScheduler(shift=5.0), lambda: FlowEulerScheduler(shift=1.0),
    lambda: FlowUniPCScheduler(shift=3.0), lambda: DistillScheduler(),
    lambda: DistillScheduler([1000, 900, 300, 10], shift=8.0, mode="lcm"),
])
@pytest.mark.parametrize("n", [1, 3, 50])
def test_linear_ode_is_solved_exactly(make, n):
    """Point mass: the exact v = eps - x0 = (x - x0) / s is constant on the path; any grid lands on x0."""
    sched = make()
    if not isinstance(sched, DistillScheduler):
        sched.set_timesteps(n)
    g = torch.Generator().manual_seed(n)
    x0, eps = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    x = add_noise(x0, eps, sched.sigmas[0].item())
    s = sched.sigmas.tolist()
    out = _run(sched, x, lambda x, i: (x - x0) / s[i])  # the exact velocity field of the point mass
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    if getattr(sched, "mode", "euler") == "euler":  # deterministic: constant v = eps - x0 is exact
        torch.testing.assert_close(_run(sched, x, lambda x, i: eps - x0), x0, atol=1e-5, rtol=0)


def _gaussian_flow(mu, c):
    """1-D data N(mu, c^2): marginal std(s) = sqrt((1-s)^2 c^2 + s^2); exact ODE x_s = (1-s) mu + std(s) z."""
    std = lambda s: math.sqrt((1 - s) ** 2 * c**2 + s**2)  # noqa: E731

    def v(x, s):
        z = (x - (1 - s) * mu) / std(s)
        return -mu + z * (s - (1 - s) * c**2) / std(s)

    return std, v


def test_unipc_is_higher_order_than_euler():
    """Gaussian data (curved exact ODE): halving the step halves Euler's error, UniPC's drops by > 3.5x.
    Measured at s ~ 0.3 (7/8 of the run), before the final x0-prediction step both solvers share."""
    mu, c = torch.linspace(-1, 1, 7, dtype=torch.float64), 0.2
    std, v = _gaussian_flow(mu, c)
    z = torch.linspace(-2, 2, 7, dtype=torch.float64)
    errs = {}
    for cls in (FlowEulerScheduler, FlowUniPCScheduler):
        for n in (16, 32):
            sched = cls(shift=3.0)
            sched.set_timesteps(n)
            s, k = sched.sigmas.double().tolist(), 7 * n // 8
            x = (1 - s[0]) * mu + std(s[0]) * z
            for i in range(k):
                x = sched.step(v(x, s[i]), i, x)
            errs[cls.__name__, n] = (x - ((1 - s[k]) * mu + std(s[k]) * z)).abs().max().item()
    assert 1.6 < errs["FlowEulerScheduler", 16] / errs["FlowEulerScheduler", 32] < 2.5
    assert errs["FlowUniPCScheduler", 16] / errs["FlowUniPCScheduler", 32] > 3.5
    assert errs["FlowUniPCScheduler", 32] * 5 < errs["FlowEulerScheduler", 32]


def test_unipc_first_step_is_euler_and_last_step_is_x0():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(6, 6, generator=g) / 3
    v_fn = lambda x, i: torch.tanh(x @ W) + 0.5 * x  # noqa: E731
    x = torch.randn(2, 6, generator=g)
    uni, eul = FlowUniPCScheduler(shift=5.0), FlowEulerScheduler(shift=5.0)
    uni.set_timesteps(5)
    eul.set_timesteps(5)
    torch.testing.assert_close(uni.step(v_fn(x, 0), 0, x), eul.step(v_fn(x, 0), 0, x))
    for i in range(1, 4):
        x = uni.step(v_fn(x, i), i, x)
    v = v_fn(x, 4)
    assert torch.equal(uni.step(v, 4, x), x0_from_v(x, v, uni.sigmas[4].item()))


def test_unipc_state_resets_and_order_is_enforced():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(5, 5, generator=g)
    v_fn = lambda x, i: torch.sin(x @ W)  # noqa: E731
    x = torch.randn(3, 5, generator=g)
    sched = FlowUniPCScheduler()
    sched.set_timesteps(6)
    a = _run(sched, x, v_fn)
    b = _run(sched, x, v_fn)  # step 0 restarts
    sched.set_timesteps(6)
    c = _run(sched, x, v_fn)
    assert torch.equal(a, b) and torch.equal(a, c)
    sched.step(v_fn(x, 0), 0, x)
    with pytest.raises(ValueError, match="expected step 1"):
        sched.step(v_fn(x, 0), 2, x)
    with pytest.raises(IndexError):
        sched.step(v_fn(x, 0), 6, x)


# ---- parity with diffusers' UniPCMultistepScheduler as configured by diffusers' Wan pipelines --------------
def _diffusers_unipc(shift):
    diffusers = pytest.importorskip("diffusers")
    # WanPipeline's default scheduler config (Wan-AI/Wan2.1-*-Diffusers): flow_prediction, use_flow_sigmas,
    # solver_order 2, bh2, predict_x0, lower_order_final, final_sigmas_type "zero".
    return diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, num_train_timesteps=1000,
        solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero")


@pytest.mark.parametrize("n,shift", [(50, 5.0), (4, 5.0), (20, 3.0)])
def test_unipc_matches_diffusers_on_the_wan_grid(n, shift):
    ref = _diffusers_unipc(shift)
    # diffusers' own grid is linspace(1, 1/1000) (see the next test); hand it Wan's unshifted grid instead.
    ref.set_timesteps(sigmas=np.linspace(float(np.float32(0.999)), 0.0, n + 1)[:-1])
    ours = FlowUniPCScheduler(shift=shift)
    ours.set_timesteps(n)
    assert torch.equal(ref.timesteps.float(), ours.timesteps)
    assert torch.equal(ref.sigmas, ours.sigmas)

    g = torch.Generator().manual_seed(n)
    W, x0 = torch.randn(8, 8, generator=g) / 3, torch.randn(2, 8, generator=g)
    noise = torch.randn(2, 8, generator=g)

    def model(x, t):  # point-mass velocity seen through the integer timestep, plus a nonlinear part
        return (x - x0) / (t.float()[:, None] / 1000) + 0.3 * torch.tanh(x @ W)

    x_ref, x_ours = noise.clone(), noise.clone()
    for i, t in enumerate(ref.timesteps):
        x_ref = ref.step(model(x_ref, t.expand(2)), t, x_ref, return_dict=False)[0]
        x_ours = ours.step(model(x_ours, ours.timesteps[i].expand(2)), i, x_ours)
        torch.testing.assert_close(x_ours, x_ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [50, 4])
def test_diffusers_default_grid_offset(n):
    """Known difference: diffusers uses unshifted s = linspace(1, 0.001, N+1)[:-1] (the first set to
    1 - 1e-6 after the shift), Wan linspace(0.999, 0, N+1)[:-1]: the same spacing, diffusers' 0.001 higher,
    so its timesteps are up to 4 higher at N=50 (1 at N=4)."""
    ref = _diffusers_unipc(5.0)
    ref.set_timesteps(n)
    ours = FlowUniPCScheduler(shift=5.0)
    ours.set_timesteps(n)
    d_un = unshift(ref.sigmas[:-1].double(), 5.0)
    o_un = unshift(ours.sigmas[:-1].double(), 5.0)
    assert ref.sigmas[0].item() == pytest.approx(1 - 1e-6, abs=1e-7)
    torch.testing.assert_close(d_un[1:] - o_un[1:], torch.full((n - 1,), 1e-3, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    dt = ref.timesteps.float() - ours.timesteps
    assert dt.min() >= 0 and dt.max() <= (4 if n == 50 else 1) and dt[0] == 0


# ---- distill updates --------------------------------------------------------------------------------------
def test_distill_euler_and_lcm_updates():
    g = torch.Generator().manual_seed(3)
    x, v = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    eul, lcm = DistillScheduler(mode="euler"), DistillScheduler(mode="lcm")
    s, s1 = eul.sigmas[1].item(), eul.sigmas[2].item()
    x0 = x - s * v
    torch.testing.assert_close(eul.step(v, 1, x), x + (s1 - s) * v)  # = x0 + s_next v
    eps_new = torch.randn(2, 4, generator=torch.Generator().manual_seed(7))
    out = lcm.step(v, 1, x, noise=eps_new)
    torch.testing.assert_close(out, (1 - s1) * x0 + s1 * eps_new)
    assert lcm.needs_noise and not eul.needs_noise
    with pytest.raises(ValueError, match="fresh Gaussian noise"):
        lcm.step(v, 1, x)
    # the last step returns x0 exactly, in both modes, and needs no noise
    for sched in (eul, lcm):
        assert torch.equal(sched.step(v, 3, x), x - sched.sigmas[3].item() * v)


def test_sample_draws_lcm_noise_per_video_and_only_between_steps():
    """gaussian_noise with one generator per video: video j's result does not depend on the batch."""
    sched = DistillScheduler(mode="lcm")
    denoise = lambda x, t: torch.tanh(x)  # noqa: E731
    x = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(0))
    gens = lambda: [torch.Generator().manual_seed(10 + j) for j in range(3)]  # noqa: E731
    both = sample(denoise, x, sched, gaussian_noise(gens()))
    alone = sample(denoise, x[1:2], sched, gaussian_noise(gens()[1:2]))
    torch.testing.assert_close(both[1:2], alone, rtol=1e-6, atol=1e-6)
    draws = []
    sample(denoise, x, sched, lambda i, y: draws.append(i) or torch.zeros_like(y))
    assert draws == [0, 1, 2]  # 4 steps: fresh noise after steps 0-2, none after the last
    with pytest.raises(ValueError, match="step_noise"):
        sample(denoise, x, sched)


# ---- sample() ---------------------------------------------------------------------------------------------
def test_sample_loop_callback_and_timesteps():
    sched = DistillScheduler(mode="lcm")
    seen_t, progress = [], []

    def denoise(x, t):
        seen_t.append(t.clone())
        return torch.tanh(x) - 0.1 * t[:, None, None] / 1000

    x = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(0))
    out = sample(denoise, x, sched, gaussian_noise(torch.Generator().manual_seed(5)),
                 callback=lambda i, n: progress.append((i, n)))
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(t.shape == (3,) and t.dtype == torch.float32 for t in seen_t)
    assert [t[0].item() for t in seen_t] == sched.timesteps.tolist()
    # same as the hand-written loop with the same generator
    gen, y = torch.Generator().manual_seed(5), x
    for i in range(4):
        eps = torch.randn(y.shape, generator=gen) if i < 3 else None
        y = sched.step(denoise(y, sched.timesteps[i].expand(3)), i, y, noise=eps)
    assert torch.equal(out, y)


def test_sample_cancel_raises_at_the_requested_step():
    sched = FlowUniPCScheduler()
    sched.set_timesteps(10)
    calls, polls, progress = [], [], []

    def cancel():
        polls.append(1)
        return len(polls) == 4  # cancel before the 4th step (index 3)

    with pytest.raises(Cancelled) as info:
        sample(lambda x, t: calls.append(1) or -x, torch.ones(1, 3), sched, cancel=cancel,
               callback=lambda i, n: progress.append(i))
    assert info.value.step == 3 and info.value.num_steps == 10
    assert len(calls) == 3 and progress == [1, 2, 3]
    # a scheduler that was interrupted can run a full new sample
    out = sample(lambda x, t: x * 0 + 1.0, torch.ones(1, 3), sched)
    torch.testing.assert_close(out, torch.ones(1, 3) - sched.sigmas[0].item())
