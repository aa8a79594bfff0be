"""The sampling loop: one function for every scheduler (k-diffusion style)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from inference.flow import x0_from_v

NoiseFn = Callable[[int, Tensor], Tensor]  # (step index, x [B, ...]) -> fresh N(0, I) noise like x, float32


def gaussian_noise(generators: torch.Generator | Sequence[torch.Generator]) -> NoiseFn:
    """Fresh noise for re-noising updates, drawn on each generator's device and moved to x's device.

    One generator draws the whole batch (training); a list draws video j's rows from generator j alone, so a
    video's noise does not depend on the batch it is generated in (inference: video j uses seed + j)."""
    def draw(_: int, x: Tensor) -> Tensor:
        if isinstance(generators, torch.Generator):
            g = generators
            return torch.randn(x.shape, generator=g, device=g.device, dtype=torch.float32).to(x.device)
        if len(generators) != x.shape[0]:
            raise ValueError(f"{len(generators)} generators for a batch of {x.shape[0]}")
        rows = [torch.randn((1, *x.shape[1:]), generator=g, device=g.device, dtype=torch.float32) for g in generators]
        return torch.cat([r.to(x.device) for r in rows])

    return draw


def _check_noise(scheduler, step_noise: NoiseFn | None) -> None:
    if scheduler.needs_noise and step_noise is None:
        raise ValueError(f"{type(scheduler).__name__} (mode {getattr(scheduler, 'mode', '?')!r}) re-noises between "
                         f"steps: pass step_noise (e.g. gaussian_noise(generator))")


def _step(scheduler, v: Tensor, i: int, x: Tensor, step_noise: NoiseFn | None) -> Tensor:
    last = i == scheduler.num_steps - 1  # the last step returns x0 and draws nothing
    eps = step_noise(i, x) if scheduler.needs_noise and not last else None
    return scheduler.step(v, i, x, noise=eps)


class Cancelled(Exception):
    """Raised by `sample` when its `cancel()` returns True; `.step` is the step that was not run."""

    def __init__(self, step: int, num_steps: int):
        super().__init__(f"sampling cancelled before step {step + 1}/{num_steps}")
        self.step = step
        self.num_steps = num_steps


def sample(denoise: Callable[[Tensor, Tensor], Tensor], x: Tensor, scheduler,
           step_noise: NoiseFn | None = None, callback: Callable[[int, int], None] | None = None,
           cancel: Callable[[], bool] | None = None) -> Tensor:
    """Integrate from the noise `x` (at scheduler.sigmas[0]) to the clean sample over the scheduler's steps.

    denoise(x [B, ...], t [B] float32 on x.device) -> v [B, ...]  (CFG, if any, lives inside `denoise`).
    `scheduler` must have had `set_timesteps` called (the distill one sets itself up).
    `step_noise(i, x)` draws the fresh noise of re-noising updates (the distill "lcm" update; required there).
    `callback(done, n)` runs after each step with done = 1..n steps completed (progress bars, servers).
    `cancel()` is polled before every step; True raises `Cancelled` (x is left as it was).
    """
    _check_noise(scheduler, step_noise)
    n = scheduler.num_steps
    # One host->device copy of the whole [n, B] timestep table; rows are ready-made [B] tensors.
    t_all = scheduler.timesteps.to(device=x.device, dtype=torch.float32)[:, None].expand(n, x.shape[0])
    t_all = t_all.contiguous()
    for i in range(n):
        if cancel is not None and cancel():
            raise Cancelled(i, n)
        v = denoise(x, t_all[i])
        x = _step(scheduler, v, i, x, step_noise)
        if callback is not None:
            callback(i + 1, n)
    return x


def backward_simulation(denoise: Callable[[Tensor, Tensor], Tensor], noise: Tensor, scheduler, exit_step: int,
                        step_noise: NoiseFn | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The student's rollout as trained by DMD (docs/step_distillation.md "Generator update", step 1).

    Runs the few-step `scheduler` from `noise` (at sigmas[0]) like `sample`, but stops at `exit_step`: steps
    0..exit_step-1 run under no_grad (the scheduler's update; with mode "lcm" the re-noising uses fresh noise
    from `step_noise`), and step `exit_step` runs with the caller's grad mode. Gradients therefore never flow
    through earlier steps. Returns (x0 prediction of the exit step [B, ...], its input x [B, ...], its
    timestep [B]).
    """
    _check_noise(scheduler, step_noise)
    n = scheduler.num_steps
    if not 0 <= exit_step < n:
        raise ValueError(f"exit_step must be in [0, {n}), got {exit_step}")
    t_all = scheduler.timesteps.to(device=noise.device, dtype=torch.float32)[:, None].expand(n, noise.shape[0])
    x = noise
    with torch.no_grad():
        for i in range(exit_step):
            x = _step(scheduler, denoise(x, t_all[i]), i, x, step_noise)
    t = t_all[exit_step].contiguous()
    v = denoise(x, t)
    return x0_from_v(x, v.float(), scheduler.sigmas[exit_step].item()), x, t
