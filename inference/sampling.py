"""The sampling loop: one function for every scheduler (k-diffusion style)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from inference.flow import x0_from_v


class Cancelled(Exception):
    """Raised by `sample` when its `cancel()` returns True; `.step` is the step that was not run."""

    def __init__(self, step: int, num_steps: int):
        super().__init__(f"sampling cancelled before step {step + 1}/{num_steps}")
        self.step = step
        self.num_steps = num_steps


def sample(denoise: Callable[[Tensor, Tensor], Tensor], x: Tensor, scheduler,
           generator: torch.Generator | None = None, callback: Callable[[int, int], None] | None = None,
           cancel: Callable[[], bool] | None = None) -> Tensor:
    """Integrate from the noise `x` (at scheduler.sigmas[0]) to the clean sample over the scheduler's steps.

    denoise(x [B, ...], t [B] float32 on x.device) -> v [B, ...]  (CFG, if any, lives inside `denoise`).
    `scheduler` must have had `set_timesteps` called (the distill one sets itself up).
    `generator` goes to `scheduler.step` (fresh noise of the distill "lcm" update).
    `callback(done, n)` runs after each step with done = 1..n steps completed (progress bars, servers).
    `cancel()` is polled before every step; True raises `Cancelled` (x is left as it was).
    """
    n = scheduler.num_steps
    # One host->device copy of the whole [n, B] timestep table; rows are ready-made [B] tensors.
    t_all = scheduler.timesteps.to(device=x.device, dtype=torch.float32)[:, None].expand(n, x.shape[0])
    t_all = t_all.contiguous()
    for i in range(n):
        if cancel is not None and cancel():
            raise Cancelled(i, n)
        v = denoise(x, t_all[i])
        x = scheduler.step(v, i, x, generator=generator)
        if callback is not None:
            callback(i + 1, n)
    return x


def backward_simulation(denoise: Callable[[Tensor, Tensor], Tensor], noise: Tensor, scheduler, exit_step: int,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The student's rollout as trained by DMD (docs/step_distillation.md "Generator update", step 1).

    Runs the few-step `scheduler` from `noise` (at sigmas[0]) like `sample`, but stops at `exit_step`: steps
    0..exit_step-1 run under no_grad (the scheduler's update; with mode "lcm" the re-noising uses fresh noise
    from `generator`), and step `exit_step` runs with the caller's grad mode. Gradients therefore never flow
    through earlier steps. Returns (x0 prediction of the exit step [B, ...], its input x [B, ...], its
    timestep [B]).
    """
    n = scheduler.num_steps
    if not 0 <= exit_step < n:
        raise ValueError(f"exit_step must be in [0, {n}), got {exit_step}")
    t_all = scheduler.timesteps.to(device=noise.device, dtype=torch.float32)[:, None].expand(n, noise.shape[0])
    x = noise
    with torch.no_grad():
        for i in range(exit_step):
            x = scheduler.step(denoise(x, t_all[i]), i, x, generator=generator)
    t = t_all[exit_step].contiguous()
    v = denoise(x, t)
    return x0_from_v(x, v.float(), scheduler.sigmas[exit_step].item()), x, t
