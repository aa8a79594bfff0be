"""Flow-matching conventions: the ONE place for the timestep shift and the prediction-type conversions.

Rectified flow as trained by Wan2.1 (docs/wan_architecture.md, "Sampling defaults of the teacher"):

    x_s = (1 - s) x0 + s eps            s in [0, 1] (sigma), s = 0 clean, s = 1 pure noise
    v   = dx_s/ds = eps - x0            what the network predicts
    t   = 1000 s                        the timestep fed to the network (float)

so  x0 = x_s - s v  and  eps = x_s + (1 - s) v.

`sigma` arguments accept a Python float, a 0-d tensor, or a [B] tensor (one sigma per sample) that is
broadcast over the remaining dims of the data tensor (`expand_sigma`). Results follow torch type promotion.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
from torch import Tensor

Sigma = float | Tensor
S = TypeVar("S", float, np.ndarray, Tensor)


def shift_sigma(s: S, shift: float) -> S:
    """Timestep shift of Wan / SD3:  s' = shift * s / (1 + (shift - 1) * s).

    Monotone map of [0, 1] onto itself (0 -> 0, 1 -> 1); shift > 1 moves the grid towards high noise.
    Works on floats, numpy arrays and tensors (the operation order matches Wan's and diffusers' code, so
    float64 grids are bit-identical).
    """
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * s / (1 + (shift - 1) * s)


def expand_sigma(sigma: Sigma, ndim: int) -> Sigma:
    """Broadcast sigma against a tensor with `ndim` dims: [B] -> [B, 1, ..., 1]; floats / 0-d unchanged."""
    if isinstance(sigma, Tensor) and sigma.ndim > 0:
        if sigma.ndim != 1:
            raise ValueError(f"sigma must be a float, a 0-d or a [B] tensor, got shape {tuple(sigma.shape)}")
        return sigma.reshape(-1, *([1] * (ndim - 1)))
    return sigma


def x0_from_v(x_t: Tensor, v: Tensor, sigma: Sigma) -> Tensor:
    """Clean-sample prediction:  x0 = x_s - s v."""
    return x_t - expand_sigma(sigma, x_t.ndim) * v


def eps_from_v(x_t: Tensor, v: Tensor, sigma: Sigma) -> Tensor:
    """Noise prediction:  eps = x_s + (1 - s) v."""
    return x_t + (1 - expand_sigma(sigma, x_t.ndim)) * v


def v_from_x0_eps(x0: Tensor, eps: Tensor) -> Tensor:
    """Flow-matching target (velocity):  v = eps - x0."""
    return eps - x0


def add_noise(x0: Tensor, eps: Tensor, sigma: Sigma) -> Tensor:
    """Forward process:  x_s = (1 - s) x0 + s eps  (s = 0 -> x0, s = 1 -> eps)."""
    s = expand_sigma(sigma, x0.ndim)
    return (1 - s) * x0 + s * eps


NUM_TRAIN_TIMESTEPS = 1000  # t = 1000 s: the timestep scale the Wan DiT was trained on


def timestep_of(sigma: S) -> S:
    """Timestep fed to the network:  t = 1000 s  (float, not rounded)."""
    return NUM_TRAIN_TIMESTEPS * sigma


def sigma_of(t: S) -> S:
    """Inverse of `timestep_of`:  s = t / 1000."""
    return t / NUM_TRAIN_TIMESTEPS


def unshift_sigma(s: S, shift: float) -> S:
    """Inverse of `shift_sigma`:  s = s' / (shift - (shift - 1) s')."""
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return s / (shift - (shift - 1) * s)
