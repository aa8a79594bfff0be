"""Training losses as plain functions of (networks, tensors): read them against docs/step_distillation.md and
docs/wan_architecture.md.

Convention (inference/flow.py): x_s = (1 - s) x0 + s eps, v = eps - x0, timestep t = 1000 s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from inference.flow import add_noise, shift_sigma, sigma_of, timestep_of, unshift_sigma, v_from_x0_eps, x0_from_v
from inference.guidance import Cond, Guidance, guided_velocity

__all__ = ["Cond", "ExpertSide", "critic_loss", "critic_sigmas", "dmd_loss", "flow_matching_loss", "guided_x0",
           "ode_regression_loss", "sample_sigmas", "side_draw"]


def sample_sigmas(batch: int, shift: float, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> Tensor:
    """s = shift(u), u ~ U(0, 1): the shifted timestep sampling of Wan/SD3 (more mass at high noise). [B]."""
    u = torch.rand(batch, generator=generator).to(device)
    return shift_sigma(u, shift)


def flow_matching_loss(net, x0: Tensor, cond: Cond, shift: float,
                       generator: torch.Generator | None = None) -> Tensor:
    """Teacher pretraining loss  E_{s, eps} || v_theta(x_s, 1000 s) - (eps - x0) ||^2.

    x0: clean latent [B, C, F, H, W]; returns a scalar (mean over all elements).
    """
    s = sample_sigmas(x0.shape[0], shift, generator, x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0)
    x_s = add_noise(x0, eps, s)
    v = cond(net, x_s, timestep_of(s))
    return (v.float() - v_from_x0_eps(x0, eps).float()).pow(2).mean()


@dataclass(frozen=True)
class ExpertSide:
    """Critic timesteps of one call drawn on one side of a two-expert boundary (a fraction of 1000): every sample
    of the call then reaches the same teacher / critic expert. See `side_draw`."""

    high: bool
    boundary: float


def side_draw(shift: float, boundary: float, t_min: float, t_max: float, shared: torch.Generator) -> ExpertSide:
    """Which side of `boundary` a call's critic timesteps lie on, high with probability P(t >= boundary) under
    `critic_sigmas`. `shared` must give the same draw on every rank: sharded experts (FSDP2) then all-gather the
    same expert on every rank. With the per-sample draw of `critic_sigmas(..., side=...)` inside the chosen side,
    each sample's timestep keeps exactly the distribution of the unrestricted draw (a two-part mixture)."""
    if not t_min <= boundary * 1000.0 <= t_max:
        raise ValueError(f"the expert boundary {boundary * 1000:g} is outside the critic's timestep range "
                         f"[{t_min:g}, {t_max:g}]: one expert would never be reached")
    u_b = float(unshift_sigma(torch.tensor(boundary, dtype=torch.float64), shift))
    return ExpertSide(bool(torch.rand((), generator=shared) >= u_b), boundary)


def critic_sigmas(batch: int, shift: float, t_min: float, t_max: float, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu", side: ExpertSide | None = None) -> Tensor:
    """Critic timestep (docs/step_distillation.md step 2): u ~ U[0,1), s' = shift(u), t = 1000 s' clamped to
    [t_min, t_max]. [B]. `side`: u ~ U[u_b, 1) (high) or U[0, u_b) (low), u_b = shift^-1(boundary), the same u
    draws remapped, so every sample is on that side of the boundary."""
    u = torch.rand(batch, generator=generator).to(device)
    if side is not None:
        u_b = float(unshift_sigma(torch.tensor(side.boundary, dtype=torch.float64), shift))
        u = u_b + u * (1 - u_b) if side.high else u * u_b
    return shift_sigma(u, shift).clamp(sigma_of(t_min), sigma_of(t_max))


def guided_x0(net, x_t: Tensor, s: Tensor, cond: Cond, uncond: Cond | None, guidance: float | Guidance,
              interval: Sequence[float] | None = None) -> Tensor:
    """x0 [B, C, F, H, W] (fp32) of the CFG-guided prediction at x_t [B, C, F, H, W], sigmas s [B]
    (inference/guidance.py, per sample: `interval` [t_min, t_max] gives w = 1 to samples outside it). `guidance`: a
    scale, or a `Guidance` whose per-sample scales are used as they are (e.g. one scale per expert, distill/moe.py)."""
    g = guidance if isinstance(guidance, Guidance) else Guidance(guidance, interval)
    v = guided_velocity(net, x_t, timestep_of(s), cond, uncond, g, per_sample=True)
    return x0_from_v(x_t.float(), v.float(), s)


def dmd_loss(x: Tensor, real_score, fake_score, cond: Cond, uncond: Cond | None, guidance: float, shift: float,
             t_min: float = 20.0, t_max: float = 980.0,
             generator: torch.Generator | None = None,
             interval: Sequence[float] | None = None, mask: Tensor | None = None,
             side: ExpertSide | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """DMD generator loss on the generator's sample x [B, C, F, H, W] (with grad), docs/step_distillation.md steps 2-4.

        x_t = (1 - s) x + s eps                            (no grad, s from `critic_sigmas`)
        real = x0 of the teacher with CFG w, fake = x0 of the critic (conditional only)
        grad = (fake - real) / mean_{C,F,H,W} |x - real|   (one normaliser per sample)
        loss = 0.5 * mean((x - stopgrad(x - grad))^2)      => d loss / d x = grad / N

    so descent moves x towards the teacher's guided distribution and away from the generator's own.
    `mask` [B, 1, F, H, W] of 0/1 (TI2V, distill/ti2v.py): grad and normaliser over the entries where it is 1 only
    (frame 0 of an I2V sample is the given image, not generated). `side`: the timesteps on one side of a
    two-expert boundary (`side_draw`; sharded two-expert runs).
    """
    b = x.shape[0]
    with torch.no_grad():
        s = critic_sigmas(b, shift, t_min, t_max, generator, x.device, side)
        eps = torch.randn(x.shape, generator=generator).to(x.device)
        x_t = add_noise(x.detach().float(), eps, s)
        real = guided_x0(real_score, x_t, s, cond, uncond, guidance, interval)
        fake = guided_x0(fake_score, x_t, s, cond, None, 1.0)
        dims = tuple(range(1, x.ndim))
        if mask is None:
            norm = (x.detach().float() - real).abs().mean(dim=dims, keepdim=True)
        else:
            m = mask.float().expand_as(real)
            norm = ((x.detach().float() - real).abs() * m).sum(dims, keepdim=True) / m.sum(dims, keepdim=True)
            fake = torch.lerp(real, fake, m)  # fake - real = 0 off the mask: no gradient to frame 0 of I2V
        # norm = 0 (x == real exactly): 0/0 and c/0 both give 0 (the default +-float max for c/0 would make the
        # loss inf and overflow the gradient norm / Adam's second moment)
        grad = torch.nan_to_num((fake - real) / norm, nan=0.0, posinf=0.0, neginf=0.0)
    x64 = x.double()
    loss = 0.5 * (x64 - (x64 - grad.double()).detach()).pow(2).mean()
    # metrics stay 0-dim device tensors: the trainer copies them to the host only at logging steps
    return loss.float(), {"dmd_grad_norm": grad.pow(2).mean().sqrt(), "critic_t": timestep_of(s.mean())}


def critic_loss(fake_score, x: Tensor, cond: Cond, shift: float, t_min: float = 20.0, t_max: float = 980.0,
                generator: torch.Generator | None = None, mask: Tensor | None = None,
                side: ExpertSide | None = None) -> Tensor:
    """Critic (fake score) flow loss on generator samples x (no grad), docs/step_distillation.md "Critic update":
    mean((v_fake(x_t, t) - (eps - x))^2) with x_t = (1 - s) x + s eps and the critic's timestep sampling.
    `mask` [B, 1, F, H, W] of 0/1 (TI2V): the mean over the entries where it is 1 (generated frames) only."""
    x = x.detach().float()
    s = critic_sigmas(x.shape[0], shift, t_min, t_max, generator, x.device, side)
    eps = torch.randn(x.shape, generator=generator).to(x.device)
    v = cond(fake_score, add_noise(x, eps, s), timestep_of(s))
    err = (v.float() - v_from_x0_eps(x, eps)).pow(2)
    if mask is None:
        return err.mean()
    m = mask.float().expand_as(err)
    return (err * m).sum() / m.sum()


def ode_regression_loss(net, x_k: Tensor, s_k: Tensor, x0: Tensor, cond: Cond) -> Tensor:
    """ODE initialisation (docs/step_distillation.md): regress the generator's x0 prediction from a stored teacher
    state x_k at the student's warped sigma s_k [B] onto the trajectory's clean endpoint x0:
    mean((x_k - s_k v - x0)^2)."""
    v = cond(net, x_k, timestep_of(s_k))
    return (x0_from_v(x_k.float(), v.float(), s_k) - x0.float()).pow(2).mean()
