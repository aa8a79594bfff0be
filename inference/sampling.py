"""The sampling loop: one function for every scheduler (k-diffusion style)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


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
