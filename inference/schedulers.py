"""Samplers for the flow-matching ODE  dx/ds = v(x, 1000 s)  (conventions: inference/flow.py).

Three small classes with one interface:

    sched.set_timesteps(num_steps)      -> fills sched.sigmas [N+1] (float32, last 0) and sched.timesteps [N]
    x = sched.step(v, i, x, noise)      -> the sample at sigmas[i+1], given v = model(x, timesteps[i]);
                                          `noise` (fresh N(0, I) like x) only where sched.needs_noise

- `FlowUniPCScheduler`: Wan2.1's teacher solver (FlowUniPCMultistepScheduler, wan/utils/fm_solvers_unipc.py):
  UniPC (Zhao et al. 2023) with B(h) = e^h - 1 ("bh2"), x0-prediction, UniC corrector from step 1 on,
  multistep warm-up and lower order at the final step.
- `FlowEulerScheduler`: Euler on the same grid,  x_next = x + (s_next - s) v.
- `DistillScheduler`: the few-step student's warped `denoising_step_list` (docs/step_distillation.md "Student
  schedule", LightX2V `WanStepDistillScheduler`), deterministic "euler" or re-noising "lcm" update.

All scalar coefficients are Python floats computed on the host from the (CPU) sigma grid, so a step never
synchronises with the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from inference.flow import add_noise, shift_sigma, x0_from_v
from inference.schedule import DEFAULT_STEPS, DEFAULT_UPDATE, NUM_TRAIN_TIMESTEPS, UPDATES, StudentSchedule


def _check_shift(shift: float) -> float:
    if isinstance(shift, bool) or not isinstance(shift, int | float) or not (0 < shift < math.inf):
        raise ValueError(f"shift must be a finite number > 0 (sample_shift), got {shift!r}")
    return float(shift)


def wan_grid(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> tuple[Tensor, Tensor]:
    """Wan's sampling grid -> (sigmas [N+1] float32 ending in 0, timesteps [N] float32, integer-valued).

    As in `FlowUniPCMultistepScheduler(shift=1).set_timesteps(N, shift=shift)`: sigma_max is the float32 value
    of 1 - 1/num_train_timesteps (0.999), sigma_min = 0;  s = linspace(sigma_max, 0, N+1)[:-1] (float64),
    s' = shift(s), timesteps = trunc(1000 s') computed in float64, then a final sigma 0 is appended.
    (diffusers' UniPCMultistepScheduler(use_flow_sigmas=True) instead uses linspace(1, 1/1000, N+1)[:-1],
    i.e. unshifted sigmas larger by ~0.001, and 1 - 1e-6 for the first one.)
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps (infer_steps) must be an integer >= 1, got {num_steps!r}")
    sigma_max = float(np.float32(1.0 - 1.0 / num_train_timesteps))
    s = shift_sigma(np.linspace(sigma_max, 0.0, num_steps + 1)[:-1], _check_shift(shift))
    timesteps = np.trunc(s * num_train_timesteps)
    sigmas = np.append(s, 0.0).astype(np.float32)
    return torch.from_numpy(sigmas), torch.from_numpy(timesteps.astype(np.float32))


class _FlowScheduler:
    """Shared bookkeeping: the grid and the step-index checks."""

    sigmas: Tensor | None = None
    timesteps: Tensor | None = None
    _s: list[float]  # sigmas as Python floats (host-side coefficients)
    needs_noise = False  # True: step() re-noises and takes fresh noise from the caller (the "lcm" update)

    def _set_grid(self, sigmas: Tensor, timesteps: Tensor) -> None:
        self.sigmas, self.timesteps = sigmas, timesteps
        self._s = [float(v) for v in sigmas]

    @property
    def num_steps(self) -> int:
        if self.timesteps is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps(num_steps) first")
        return len(self.timesteps)

    def _check_index(self, i: int) -> None:
        n = self.num_steps
        if not 0 <= i < n:
            raise IndexError(f"step index {i} out of range for {n} steps")


class FlowEulerScheduler(_FlowScheduler):
    """Euler on Wan's grid:  x_{i+1} = x_i + (s_{i+1} - s_i) v_i  (the last step gives x0 = x - s v)."""

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000):
        self.shift = _check_shift(shift)
        self.num_train_timesteps = num_train_timesteps

    def set_timesteps(self, num_steps: int | None = None) -> None:
        self._set_grid(*wan_grid(num_steps, self.shift, self.num_train_timesteps))

    def set_sigmas(self, sigmas: Sequence[float]) -> None:
        """A custom decreasing grid ending in 0 (e.g. one that passes exactly through a student's sigmas)."""
        s = torch.as_tensor(list(sigmas), dtype=torch.float64)
        if s.ndim != 1 or len(s) < 2 or s[-1] != 0 or bool((s[1:] >= s[:-1]).any()) or s[0] > 1:
            raise ValueError(f"sigmas must decrease strictly from <= 1 to a final 0, got {s.tolist()}")
        self._set_grid(s.float(), (s[:-1] * self.num_train_timesteps).float())

    def step(self, v: Tensor, i: int, x: Tensor, noise: Tensor | None = None) -> Tensor:
        self._check_index(i)
        return (x + (self._s[i + 1] - self._s[i]) * v).to(x.dtype)


def _lam(s: float) -> float:
    """Half log-SNR of the flow path:  lambda(s) = log(alpha / sigma) = log(1 - s) - log(s)."""
    if s <= 0.0:
        return math.inf
    if s >= 1.0:
        return -math.inf
    return math.log(1.0 - s) - math.log(s)


def _bh2(h: float, order: int) -> tuple[float, float, list[float]]:
    """UniPC's B(h) terms for x0-prediction (hh = -h):  h phi_1 = e^hh - 1,  B(h) = e^hh - 1 (bh2),
    b_k = h phi_{k+1}(hh) k! / B(h)  (k = 1..order), phi_{k+1} from the recursion phi_{k+1} = phi_k/hh - 1/k!.
    h = +inf (a step to s = 0) is fine: h phi_1 = B(h) = -1."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = h_phi_1
    h_phi_k, fact, b = h_phi_1 / hh - 1.0, 1, []
    for k in range(1, order + 1):
        b.append(h_phi_k * fact / b_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    return h_phi_1, b_h, b


def _solve_rhos(rks: list[float], b: list[float]) -> list[float]:
    """Solve  sum_k rho_k r_k^(j) = b_j  (j = 0..K-1): the Vandermonde system R rho = b of UniPC."""
    R = np.array([[r**j for r in rks] for j in range(len(rks))], dtype=np.float64)
    return [float(r) for r in np.linalg.solve(R, np.asarray(b, dtype=np.float64))]


class FlowUniPCScheduler(_FlowScheduler):
    """Wan2.1's FlowUniPCMultistepScheduler (UniPC bh2, predict-x0, order 2 by default).

    With m_j = x_j - s_j v_j (x0 predictions), lambda_j = log((1 - s_j) / s_j), h = lambda_{i+1} - lambda_i:
      predictor (UniP-p):  x_{i+1} = (s_{i+1}/s_i) x_i - (1-s_{i+1}) (e^{-h} - 1) m_i
                                     - (1-s_{i+1}) B(h) sum_k rho_k (m_{i-k} - m_i) / r_k,
                           r_k = (lambda_{i-k} - lambda_i) / h, rho = [0.5] for p = 2;
      corrector (UniC-p), before the predictor of step i >= 1, with the fresh m_i:
                           x_i <- (s_i/s_{i-1}) x_{i-1} - (1-s_i)(e^{-h} - 1) m_{i-1}
                                  - (1-s_i) B(h) [sum_k rho_k (m_{i-1-k} - m_{i-1}) / r_k
                                                  + rho_p (m_i - m_{i-1})]
                           (h = lambda_i - lambda_{i-1}; rho = [0.5] for p = 1, else R rho = b).
    The order at step i is min(order, i + 1, N - i): warm-up, then lower order at the last step, which thus
    returns m_{N-1}. The state (x0 history, last sample) is reset by `set_timesteps` and by step 0.
    """

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 5.0, order: int = 2):
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise ValueError(f"order must be an integer >= 1, got {order!r}")
        self.num_train_timesteps = num_train_timesteps
        self.shift = _check_shift(shift)
        self.order = order
        self._reset()

    def _reset(self) -> None:
        self._m: list[Tensor] = []  # x0 predictions m_{i-order+1..i}, newest last
        self._last: Tensor | None = None  # the (corrected) sample the last predictor started from
        self._last_order = 0
        self._next = 0

    def set_timesteps(self, num_steps: int | None = None) -> None:
        self._set_grid(*wan_grid(num_steps, self.shift, self.num_train_timesteps))
        self._lams = [_lam(s) for s in self._s]
        self._reset()

    def step(self, v: Tensor, i: int, x: Tensor, noise: Tensor | None = None) -> Tensor:
        self._check_index(i)
        dtype = x.dtype
        if i == 0:
            self._reset()
        elif i != self._next:
            raise ValueError(f"FlowUniPCScheduler is multistep: expected step {self._next}, got {i}")
        m = x0_from_v(x, v, self._s[i])
        if i > 0:
            x = self._correct(m, i)
        self._m = (self._m + [m])[-self.order:]
        p = min(self.order, i + 1, self.num_steps - i)
        x_next = self._predict(x, i, p)
        self._last, self._last_order, self._next = x, p, i + 1
        return x_next.to(dtype)

    def _predict(self, x: Tensor, i: int, p: int) -> Tensor:
        s, lam, m = self._s, self._lams, self._m
        h = lam[i + 1] - lam[i]
        h_phi_1, b_h, b = _bh2(h, p)
        alpha_t = 1.0 - s[i + 1]
        x_next = (s[i + 1] / s[i]) * x - (alpha_t * h_phi_1) * m[-1]
        if p > 1:
            rks = [(lam[i - k] - lam[i]) / h for k in range(1, p)]
            rhos = [0.5] if p == 2 else _solve_rhos(rks, b[:-1])
            pairs = enumerate(zip(rhos, rks, strict=True), 1)
            res = sum(rho * (m[-1 - k] - m[-1]) / rk for k, (rho, rk) in pairs)
            x_next = x_next - (alpha_t * b_h) * res
        return x_next

    def _correct(self, m_t: Tensor, i: int) -> Tensor:
        s, lam, m, p = self._s, self._lams, self._m, self._last_order
        h = lam[i] - lam[i - 1]
        h_phi_1, b_h, b = _bh2(h, p)
        alpha_t = 1.0 - s[i]
        rks = [(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, p)]
        rhos = [0.5] if p == 1 else _solve_rhos(rks + [1.0], b)
        res = rhos[-1] * (m_t - m[-1])
        for k, (rho, rk) in enumerate(zip(rhos[:-1], rks, strict=True), 1):
            res = res + rho * (m[-1 - k] - m[-1]) / rk
        return (s[i] / s[i - 1]) * self._last - (alpha_t * h_phi_1) * m[-1] - (alpha_t * b_h) * res


DISTILL_MODES = UPDATES


class DistillScheduler(_FlowScheduler):
    """Few-step student sampler (docs/step_distillation.md "Student schedule"; LightX2V WanStepDistillScheduler).

    The grid is the `StudentSchedule`'s (inference/schedule.py): sigma_j = shift(d_j / 1000), then 0;
    [1000, 750, 500, 250] @ shift 5 -> [1, 0.9375, 0.8333, 0.625, 0]; timesteps 1000 sigma_j fed as floats.
    Update with x0 = x - s v:  "euler": x_next = x0 + s_next v  (deterministic, = x + (s_next - s) v);
    "lcm": x_next = (1 - s_next) x0 + s_next eps_new, eps_new ~ N(0, I) given by the caller (as in training).
    The last step returns x0.
    """

    def __init__(self, denoising_step_list: Sequence[int] = DEFAULT_STEPS, shift: float = 5.0,
                 mode: str = DEFAULT_UPDATE, num_train_timesteps: int = 1000):
        if num_train_timesteps != NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"the distill scheduler works on {NUM_TRAIN_TIMESTEPS} training timesteps, "
                             f"got {num_train_timesteps}")
        self.schedule = StudentSchedule(tuple(denoising_step_list) if isinstance(denoising_step_list, list)
                                        else denoising_step_list, shift, mode)
        self.denoising_step_list = list(self.schedule.denoising_step_list)
        self.shift = self.schedule.shift
        self.mode = mode
        self.num_train_timesteps = num_train_timesteps
        self.set_timesteps()

    @property
    def needs_noise(self) -> bool:
        return self.mode == "lcm"

    @classmethod
    def from_schedule(cls, schedule: StudentSchedule, mode: str | None = None) -> DistillScheduler:
        """The scheduler of `schedule` (its update rule unless `mode` overrides it)."""
        return cls(schedule.denoising_step_list, schedule.shift, mode or schedule.update)

    def set_timesteps(self, num_steps: int | None = None) -> None:
        n = self.schedule.num_steps
        if num_steps is not None and num_steps != n:
            raise ValueError(f"the distill scheduler runs len(denoising_step_list) = {n} steps, "
                             f"got num_steps={num_steps}; change denoising_step_list instead")
        self._set_grid(self.schedule.sigmas(), self.schedule.timesteps())

    def step(self, v: Tensor, i: int, x: Tensor, noise: Tensor | None = None) -> Tensor:
        self._check_index(i)
        x0 = x0_from_v(x, v, self._s[i])
        s_next = self._s[i + 1]
        if i == self.num_steps - 1:
            return x0.to(x.dtype)
        if self.mode == "euler":
            return (x0 + s_next * v).to(x.dtype)
        if noise is None:
            raise ValueError("the lcm update re-noises with fresh Gaussian noise: pass noise= (drawn by the caller, "
                             "e.g. inference.sampling.gaussian_noise)")
        return add_noise(x0, noise.to(device=x.device, dtype=torch.float32), s_next).to(x.dtype)
