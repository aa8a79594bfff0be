"""DMD correctness (distill/losses.py, inference/sampling.py): a 2-D world with an exact teacher, and the
gradient bookkeeping of the generator / critic updates on tiny networks.

The toy (distill/toy.py): data = an asymmetric 5-mode Gaussian mixture whose noised posterior mean, hence v and
x0, is analytic, so real_score is exact; generator and fake_score are small MLPs with the DiT call signature.
`train_dmd` is the production recipe (distill/dmd.py) in miniature: `backward_simulation` with a random exit step
for both updates, `dmd_loss` for the generator, `critic_loss` for the fake score, two AdamW with betas (0, 0.999),
generator (every `ratio` iterations) then critic (every iteration). "Covers every mode" = >= 95% of the samples
within 4 std of a mode and every mode with at least half its weight; flipping the sign of the DMD gradient
(test-side) must fail that check, so the check can fail.

Keep the whole file fast (< 40 s on 2 busy CPU cores, OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.losses import (
    Cond,
    critic_loss,
    critic_sigmas,
    dmd_loss,
    guided_x0,
    ode_regression_loss,
)
from distill.toy import ExactFlowModel, GaussianMixture, ToyMLP
from inference.flow import add_noise, shift_sigma, x0_from_v
from inference.sampling import backward_simulation, gaussian_noise, sample
from inference.schedulers import DistillScheduler, FlowEulerScheduler

# Five modes on a ring, unequal weights and widths: dropping the 8% mode is as visible as dropping the 35% one.
MIX = GaussianMixture.ring(weights=[0.35, 0.25, 0.2, 0.12, 0.08], stds=[0.3, 0.35, 0.3, 0.4, 0.3], radius=2.5)
NEAR = 4.0  # "near a mode" = within 4 std of its mean (an exact sampler: 99.97%)
ONE_STEP = ([1000], 5.0)  # (denoising_step_list, shift)
FOUR_STEP = ([1000, 750, 500, 250], 1.0)


def ctx(batch: int) -> Cond:
    return Cond(torch.zeros(batch, 1, 1))  # dummy text context: the toy networks ignore it


def denoiser(net, batch: int):
    c = ctx(batch)
    return lambda x, t: c(net, x, t)


def train_dmd(step_list: list[int], shift: float, sign: float = 1.0, seed: int = 0, iters: int = 700,
              warmup: int = 200, batch: int = 512, ratio: int = 1, lr_g: float = 3e-3, lr_c: float = 5e-3,
              timestep_shift: float = 1.0, hidden: int = 64,
              n_eval: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """DMD-train a fresh generator on MIX -> (n_eval samples of the few-step sampler, n_eval samples of the
    exit-step outputs, n_eval / n per exit step: the distribution the critic is trained on).

    `sign` multiplies the generator loss (test-side only: -1 ascends the DMD objective). fake_score first fits
    the initial generator for `warmup` critic steps; both learning rates drop 5x after 60% of the iterations.
    """
    torch.manual_seed(seed)  # network initialisation
    g = torch.Generator().manual_seed(seed)  # everything drawn during training
    gen, fake, real = ToyMLP(hidden=hidden, act=nn.ReLU), ToyMLP(hidden=hidden), ExactFlowModel(MIX)
    sched = DistillScheduler(step_list, shift=shift, mode="lcm")
    n, cond = sched.num_steps, ctx(batch)
    opt_g = torch.optim.AdamW(gen.parameters(), lr=lr_g, betas=(0.0, 0.999), weight_decay=0.0)
    opt_c = torch.optim.AdamW(fake.parameters(), lr=lr_c, betas=(0.0, 0.999), weight_decay=0.0)

    def rollout(exit_step):
        noise = torch.randn(batch, 2, generator=g)
        return backward_simulation(denoiser(gen, batch), noise, sched, exit_step, gaussian_noise(g))[0]

    def critic_step():  # on the generator's samples at a random exit step, like the generator step (dmd.py)
        with torch.no_grad():
            x = rollout(int(torch.randint(n, (), generator=g)))
        loss = critic_loss(fake, x, cond, timestep_shift, generator=g)
        opt_c.zero_grad(set_to_none=True)
        loss.backward()
        opt_c.step()

    for _ in range(warmup):
        critic_step()
    for it in range(iters):
        if it == int(0.6 * iters):
            for group in opt_g.param_groups + opt_c.param_groups:
                group["lr"] *= 0.2
        if it % ratio == 0:  # generator first, then the critic (DMDTrainer.train_step)
            x = rollout(int(torch.randint(n, (), generator=g)))
            loss, _ = dmd_loss(x, real, fake, cond, None, 1.0, timestep_shift, generator=g)
            opt_g.zero_grad(set_to_none=True)
            (sign * loss).backward()
            opt_g.step()
        critic_step()
    with torch.no_grad():
        final = sample(denoiser(gen, n_eval), torch.randn(n_eval, 2, generator=g), sched, gaussian_noise(g))
        m = n_eval // n
        exits = [backward_simulation(denoiser(gen, m), torch.randn(m, 2, generator=g), sched, k, gaussian_noise(g))[0]
                 for k in range(n)]
    return final, torch.cat(exits)


def report(x: torch.Tensor) -> str:
    near, share = MIX.coverage(x, NEAR)
    return f"near={near:.3f} share/weight={[round(float(r), 2) for r in share]}"


# ---- the toy world itself -------------------------------------------------------------------------------------
def test_exact_teacher_matches_tweedie_and_samples_the_mixture():
    g = torch.Generator().manual_seed(0)
    real = ExactFlowModel(MIX)
    # Tweedie for x_s = (1 - s) x0 + s eps: (1 - s) E[x0 | x_s] = x_s + s^2 grad log p_s(x_s), with p_s in closed form
    x = (3 * torch.randn(64, 2, generator=g)).double().requires_grad_(True)
    for s in (0.05, 0.3, 0.7, 0.95):
        (score,) = torch.autograd.grad(MIX.log_prob(x, s).sum(), x)
        tweedie = (x.detach() + s * s * score) / (1 - s)
        torch.testing.assert_close(MIX.posterior_mean(x.detach(), s), tweedie, rtol=1e-9, atol=1e-9)
        t = torch.full((64,), 1000.0 * s)
        torch.testing.assert_close(x0_from_v(x.detach().float(), real(x.detach().float(), t, None), s),
                                   tweedie.float(), rtol=1e-4, atol=1e-4)  # v = (x_s - E[x0 | x_s]) / s
    # limits: s -> 0 gives x back, s = 1 the mixture mean
    torch.testing.assert_close(MIX.posterior_mean(x.detach(), 1e-7), x.detach(), atol=1e-5, rtol=0)
    mean = (MIX.weights[:, None] * MIX.means).sum(0)
    torch.testing.assert_close(MIX.posterior_mean(x.detach(), 1.0), mean.expand(64, 2), atol=1e-9, rtol=0)
    x0 = MIX.sample(20000, g)
    # the teacher's ODE (sample + Euler) reproduces the mixture, and the coverage check accepts it
    sched = FlowEulerScheduler(shift=3.0)
    sched.set_timesteps(60)
    xs = sample(denoiser(real, 4000), torch.randn(4000, 2, generator=g), sched)
    assert MIX.covers_all_modes(xs, NEAR), report(xs)
    assert MIX.covers_all_modes(x0, NEAR), report(x0)
    # ... and rejects a dropped mode and an unconverged (standard normal) generator
    nearest = ((x0[:, None].double() - MIX.means[None]).norm(dim=-1) / MIX.stds).argmin(1)
    assert not MIX.covers_all_modes(x0[nearest != 4], NEAR)  # the 8% mode dropped
    assert not MIX.covers_all_modes(torch.randn(4000, 2, generator=g), NEAR)


# ---- 1. DMD learns every mode; the flipped gradient does not -----------------------------------------------------
def test_dmd_one_step_generator_covers_every_mode_and_flipped_sign_fails():
    x, _ = train_dmd(*ONE_STEP)
    assert torch.isfinite(x).all()
    assert MIX.covers_all_modes(x, NEAR), f"DMD: {report(x)}"
    x_flipped, _ = train_dmd(*ONE_STEP, sign=-1.0)
    assert not MIX.covers_all_modes(x_flipped, NEAR), f"flipped sign passed: {report(x_flipped)}"


def test_dmd_four_step_generator_covers_every_mode_and_flipped_sign_fails():
    """4 steps ("lcm", exit step uniform). One critic for all exit steps (dmd.py, Self-Forcing) models the
    MIXTURE of the exit-step output distributions, so DMD's fixed point is "mixture == data": that is what must
    cover every mode. The inference output (the last exit) must be sharp (>= 95% near a mode) but its mode
    weights are not pinned by the objective: in this toy its smallest share/weight ranges 0.01-0.95 over seeds
    (1 of 4 seeds under half) while the first exit step over-weights what the last one lacks."""
    final, exits = train_dmd(*FOUR_STEP)
    assert torch.isfinite(final).all()
    assert MIX.covers_all_modes(exits, NEAR), f"DMD exit-step mixture: {report(exits)}"
    assert MIX.coverage(final, NEAR)[0] >= 0.95, f"DMD 4-step output: {report(final)}"
    final_flipped, exits_flipped = train_dmd(*FOUR_STEP, sign=-1.0)
    assert not MIX.covers_all_modes(exits_flipped, NEAR), f"flipped sign passed: {report(exits_flipped)}"
    assert MIX.coverage(final_flipped, NEAR)[0] < 0.95, f"flipped sign passed: {report(final_flipped)}"


# ---- 2. gradients reach only the network being updated ------------------------------------------------------------
def grads(net: nn.Module) -> list:
    return [p.grad for p in net.parameters()]


def test_gradients_reach_only_the_updated_network_and_real_score_never_changes():
    torch.manual_seed(0)
    gen, fake, real = ToyMLP(hidden=16), ToyMLP(hidden=16), ToyMLP(hidden=16)  # real left trainable on purpose
    real_before = {k: v.clone() for k, v in real.state_dict().items()}
    sched = DistillScheduler(*FOUR_STEP, mode="lcm")
    opt_g = torch.optim.AdamW(gen.parameters(), lr=1e-2, betas=(0.0, 0.999))
    opt_c = torch.optim.AdamW(fake.parameters(), lr=1e-2, betas=(0.0, 0.999))
    g, b = torch.Generator().manual_seed(0), 8
    cond, uncond = Cond(torch.zeros(b, 1, 1)), Cond(torch.ones(b, 1, 1))
    for exit_step in range(sched.num_steps):
        # generator step (with CFG on the real score: the batched cond/uncond path)
        noise = torch.randn(b, 2, generator=g)
        x = backward_simulation(denoiser(gen, b), noise, sched, exit_step, gaussian_noise(g))[0]
        loss, info = dmd_loss(x, real, fake, cond, uncond, 4.0, 5.0, generator=g)
        loss.backward()
        assert all(gr is None for gr in grads(fake) + grads(real))
        assert all(gr is not None and gr.abs().sum() > 0 for gr in grads(gen))
        assert torch.isfinite(loss) and set(info) == {"dmd_grad_norm", "critic_t"}
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        # critic step on a sample that still carries the generator's graph: critic_loss must cut it
        noise = torch.randn(b, 2, generator=g)
        x = backward_simulation(denoiser(gen, b), noise, sched, sched.num_steps - 1, gaussian_noise(g))[0]
        assert x.requires_grad
        critic_loss(fake, x, cond, 5.0, generator=g).backward()
        assert all(gr is None for gr in grads(gen) + grads(real))
        assert all(gr is not None and gr.abs().sum() > 0 for gr in grads(fake))
        opt_c.step()
        opt_c.zero_grad(set_to_none=True)
    for k, v in real.state_dict().items():
        assert torch.equal(v, real_before[k]), k


def test_backward_simulation_only_the_exit_step_has_a_graph():
    torch.manual_seed(0)
    gen = ToyMLP(hidden=16)
    sched = DistillScheduler(*FOUR_STEP, mode="lcm")
    calls = []

    def denoise(x, t):
        v = gen(x, t, None)
        calls.append((torch.is_grad_enabled(), x.requires_grad, v.requires_grad, float(t[0])))
        return v

    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    for k in range(sched.num_steps):
        calls.clear()
        step_noise = gaussian_noise(torch.Generator().manual_seed(2))
        x0, x_in, t = backward_simulation(denoise, noise, sched, k, step_noise)
        assert [c[0] for c in calls] == [False] * k + [True]  # exactly one forward with grad, the exit step
        assert [c[2] for c in calls] == [False] * k + [True]
        assert not any(c[1] for c in calls) and not x_in.requires_grad  # no earlier output carries a graph
        assert [c[3] for c in calls] == sched.timesteps[: k + 1].tolist()
        assert t.shape == (8,) and torch.all(t == sched.timesteps[k])
        assert x0.requires_grad
        # the whole graph is the exit step: d x0 / d params == that of one recomputed step from its input
        gen.zero_grad(set_to_none=True)
        x0.pow(2).sum().backward()
        g_sim = [p.grad.clone() for p in gen.parameters()]
        gen.zero_grad(set_to_none=True)
        x0_from_v(x_in, gen(x_in, t, None), float(sched.sigmas[k])).pow(2).sum().backward()
        for a, b in zip(g_sim, grads(gen)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="exit_step"):
        backward_simulation(denoise, noise, sched, sched.num_steps, gaussian_noise(torch.Generator()))
    # the full rollout (exit at the last step) is the inference loop: same noise draws, same sample
    with torch.no_grad():
        last = sched.num_steps - 1
        full = backward_simulation(denoise, noise, sched, last, gaussian_noise(torch.Generator().manual_seed(3)))[0]
        ref = sample(denoise, noise, sched, gaussian_noise(torch.Generator().manual_seed(3)))
    torch.testing.assert_close(full, ref, rtol=0, atol=0)


# ---- 3. the DMD gradient value ----------------------------------------------------------------------------------
class Spy(nn.Module):
    """A fixed nonlinear v(x, t) that records its inputs: v = a x + b sin(3 x) s + c."""

    def __init__(self, a: float, b: float, c: float):
        super().__init__()
        self.a, self.b, self.c, self.seen = a, b, c, []

    def forward(self, x, t, context, clip_fea=None, y=None):
        self.seen.append((x.clone(), t.clone()))
        s = (t / 1000.0).reshape(-1, *([1] * (x.ndim - 1)))
        return self.a * x + self.b * torch.sin(3 * x) * s + self.c


def test_dmd_loss_gradient_is_grad_over_numel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 1, 2, 2, generator=g, requires_grad=True)  # [B, C, F, H, W]
    real, fake = Spy(0.5, 1.0, 0.1), Spy(-0.3, 0.5, -0.2)
    loss, info = dmd_loss(x, real, fake, ctx(3), None, 1.0, 5.0, generator=g)
    loss.backward()
    (x_t, t), (x_t2, t2) = real.seen[0], fake.seen[0]
    assert torch.equal(x_t, x_t2) and torch.equal(t, t2)  # both scores see the same noisy input
    assert t.shape == (3,) and bool(((t >= 20) & (t <= 980)).all())
    s = (t.double() / 1000).reshape(-1, 1, 1, 1, 1)
    xd, x_t = x.detach().double(), x_t.double()
    r = x_t - s * (0.5 * x_t + torch.sin(3 * x_t) * s + 0.1)
    f = x_t - s * (-0.3 * x_t + 0.5 * torch.sin(3 * x_t) * s - 0.2)
    grad = (f - r) / (xd - r).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(x.grad.double(), grad / x.numel(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(loss.double(), 0.5 * grad.pow(2).mean(), rtol=1e-5, atol=0)
    assert info["dmd_grad_norm"] == pytest.approx(float(grad.pow(2).mean().sqrt()), rel=1e-5)
    # descent moves x towards real and away from fake: a small step lowers |x - real| - |x - fake| on average
    assert float(((f - r) * x.grad).sum()) > 0


def test_dmd_loss_is_finite_when_the_sample_equals_the_teacher_prediction():
    # t pinned to 500 (s = 0.5); the real score maps every x_t to x0 = x_t - 0.5 (2 x_t) = 0 exactly,
    # so sample 0 (x = 0) has norm 0; sample 1 is an ordinary sample
    real = lambda x, t, c, **_: 2 * x  # noqa: E731
    x = torch.tensor([[0.0, 0.0], [1.0, -2.0]], requires_grad=True)
    for fake, fake_x0 in ((real, 0.0), (lambda x, t, c, **_: 2 * x + 1, -0.5)):  # fake == real (0/0), != (c/0)
        x.grad = None
        loss, info = dmd_loss(x, real, fake, ctx(2), None, 1.0, 5.0, t_min=500.0, t_max=500.0)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and info["critic_t"] == 500.0
        assert torch.equal(x.grad[0], torch.zeros(2))
        torch.testing.assert_close(x.grad[1], torch.full((2,), fake_x0 / 1.5 / 4))  # (fake - 0) / mean|x| / N
        assert float(loss.detach()) == pytest.approx(0.5 * (fake_x0 / 1.5) ** 2 / 2)


# ---- 4. CFG convention of the real score --------------------------------------------------------------------------
class CtxNet(nn.Module):
    """v depends on x, t, the text context and the I2V inputs, so a cond/uncond or batching mix-up shows."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, context, clip_fea=None, y=None):
        self.calls.append(x.shape[0])
        e = lambda v: v.reshape(x.shape[0], *([1] * (x.ndim - 1)))  # noqa: E731
        v = torch.tanh(x) * e(t / 1000.0) + e(context.sum(dim=(1, 2)))
        if clip_fea is not None:
            v = v + e(clip_fea.mean(dim=(1, 2))) * x
        if y is not None:
            v = v + y[:, : x.shape[1]]
        return v


def test_guided_x0_standard_cfg_convention():
    g = torch.Generator().manual_seed(0)
    b = 3
    x_t = torch.randn(b, 4, 1, 2, 2, generator=g)
    s = torch.tensor([0.9, 0.5, 0.1])
    cond = Cond(torch.randn(b, 5, 6, generator=g), torch.randn(b, 7, 8, generator=g),
                torch.randn(b, 4, 1, 2, 2, generator=g))
    uncond = Cond(torch.randn(b, 5, 6, generator=g), cond.clip_fea, cond.y)
    net = CtxNet()
    v_c, v_u = cond(net, x_t, 1000 * s), uncond(net, x_t, 1000 * s)  # two separate calls
    se = s.reshape(-1, 1, 1, 1, 1)
    net.calls.clear()
    # w = 1 (and no uncond): the conditional prediction alone, one batch-B call
    for unc in (uncond, None):
        torch.testing.assert_close(guided_x0(net, x_t, s, cond, unc, 1.0), x_t - se * v_c, rtol=1e-6, atol=1e-6)
    assert net.calls == [b, b]
    # w = 4: uncond + 4 (cond - uncond) from one batched call equals the two separate calls
    out = guided_x0(net, x_t, s, cond, uncond, 4.0)
    assert net.calls[-1] == 2 * b
    torch.testing.assert_close(out, x_t - se * (v_u + 4.0 * (v_c - v_u)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, x_t - se * v_c, atol=1e-3)  # guidance did something
    # interval [300, 850]: only the sample at t = 500 is guided; t = 900 and t = 100 take the conditional x0
    out = guided_x0(net, x_t, s, cond, uncond, 4.0, interval=[300, 850])
    torch.testing.assert_close(out[1], (x_t - se * (v_u + 4.0 * (v_c - v_u)))[1], rtol=1e-5, atol=1e-5)
    for i in (0, 2):
        torch.testing.assert_close(out[i], (x_t - se * v_c)[i], rtol=1e-5, atol=1e-5)


# ---- 5. ODE-regression loss ----------------------------------------------------------------------------------------
class PointModel(nn.Module):
    """Exact flow model of the point mass at x_star: v = (x_s - x_star) / s (+ an optional error)."""

    def __init__(self, x_star, err: float = 0.0):
        super().__init__()
        self.x_star, self.err = x_star, err

    def forward(self, x, t, context, clip_fea=None, y=None):
        return (x - self.x_star) / (t / 1000.0).reshape(-1, *([1] * (x.ndim - 1))) + self.err


def test_ode_regression_loss_zero_for_the_exact_model_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    x_star = torch.tensor([[0.75, -1.5]])
    sched = DistillScheduler(FOUR_STEP[0], shift=5.0, mode="euler")
    b = 4
    eps = torch.randn(b, 2, generator=g)
    # teacher trajectories of a point mass are straight lines: the states at the student's warped sigmas
    for k in range(sched.num_steps):
        s_k = torch.full((b,), float(sched.sigmas[k]))
        x_k = add_noise(x_star.expand(b, 2), eps, s_k)
        x0 = x_star.expand(b, 2)
        assert float(ode_regression_loss(PointModel(x_star), x_k, s_k, x0, ctx(b))) < 1e-12
        wrong = ode_regression_loss(PointModel(x_star, err=0.1), x_k, s_k, x0, ctx(b))
        assert float(wrong) == pytest.approx(float(sched.sigmas[k]) ** 2 * 0.01, rel=1e-4)
        assert float(ode_regression_loss(PointModel(x_star), x_k, s_k, x0 + 0.2, ctx(b))) == pytest.approx(0.04)
    # the exact model's own ODE lands on x_star (the endpoint the regression targets), and a learnable net
    # gets a positive loss with gradients
    with torch.no_grad():
        end = sample(denoiser(PointModel(x_star), b), eps, DistillScheduler(FOUR_STEP[0], shift=5.0, mode="euler"))
    torch.testing.assert_close(end, x_star.expand(b, 2), rtol=0, atol=1e-5)
    net = ToyMLP(hidden=16)
    s_k = torch.full((b,), float(sched.sigmas[1]))
    loss = ode_regression_loss(net, add_noise(x_star.expand(b, 2), eps, s_k), s_k, x_star.expand(b, 2), ctx(b))
    loss.backward()
    assert float(loss.detach()) > 0 and all(p.grad is not None for p in net.parameters())


# ---- critic timestep sampling --------------------------------------------------------------------------------------
def test_critic_sigmas_shifted_and_clamped():
    s = critic_sigmas(20000, 5.0, 20.0, 980.0, torch.Generator().manual_seed(0))
    assert s.shape == (20000,) and float(s.min()) >= 0.02 - 1e-7 and float(s.max()) <= 0.98 + 1e-7
    assert float(s.median()) == pytest.approx(float(shift_sigma(0.5, 5.0)), abs=0.01)  # 5/6
    # the clamp at 980 catches shift(u) > 0.98, i.e. u > 0.98 / (5 - 4 * 0.98) = 0.907
    assert float((s == 0.98).double().mean()) == pytest.approx(1 - 0.98 / (5 - 4 * 0.98), abs=0.01)
    same = critic_sigmas(20000, 5.0, 20.0, 980.0, torch.Generator().manual_seed(0))
    assert torch.equal(s, same)
