"""Classifier-free guidance, written once: used by the sampler (inference/pipeline.py) and the DMD loss
(distill/losses.py).

Standard convention (Ho & Salimans 2022), w = 1 meaning no guidance:

    v = v_uncond + w (v_cond - v_uncond)

computed as ONE batched forward of [cond; uncond]. An optional interval [t_min, t_max] on the 0-1000
timestep scale applies guidance only to timesteps inside it and uses the conditional prediction alone (w = 1)
elsewhere (guidance in a limited interval, Kynkaanniemi et al. 2024). The sampler decides this per step on the
host from its schedule (so unguided steps skip the unconditional half of the batch entirely); the DMD loss,
whose critic timestep differs per sample, decides it per sample on the device (no host sync).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Cond:
    """Conditioning passed to every DiT call: context [B, L, text_dim]; I2V clip_fea [B, 257, clip_dim] and
    y [B, C_y, F, H, W] (None for T2V)."""

    context: Tensor
    clip_fea: Tensor | None = None
    y: Tensor | None = None

    def to(self, device: torch.device | str) -> Cond:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Cond(move(self.context), move(self.clip_fea), move(self.y))

    def __call__(self, net, x: Tensor, t: Tensor) -> Tensor:
        return net(x, t, self.context, clip_fea=self.clip_fea, y=self.y)


def cfg_pair(cond: Cond, uncond: Cond) -> Cond:
    """[cond; uncond] along the batch for one forward; I2V image conditioning is shared by both halves."""
    cat = lambda a, b: None if a is None else torch.cat([a, b])  # noqa: E731
    return Cond(torch.cat([cond.context, uncond.context]), cat(cond.clip_fea, cond.clip_fea), cat(cond.y, cond.y))


@dataclass(frozen=True)
class Guidance:
    """Guidance scale w and optional timestep interval [t_min, t_max] (0-1000, 1000 = noise)."""

    scale: float = 1.0
    interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, int | float) or not math.isfinite(self.scale):
            raise ValueError(f"guidance scale must be a finite number, got {self.scale!r}")
        if self.interval is not None:
            iv = self.interval
            if (isinstance(iv, str) or not isinstance(iv, Sequence) or len(iv) != 2
                    or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in iv)
                    or not 0 <= iv[0] <= iv[1] <= 1000):
                raise ValueError(f"guidance interval must be [t_min, t_max] with 0 <= t_min <= t_max <= 1000, "
                                 f"got {iv!r}")
            object.__setattr__(self, "interval", (float(iv[0]), float(iv[1])))

    @property
    def enabled(self) -> bool:
        return self.scale != 1.0

    def applies_at(self, t: float) -> bool:
        """Host-side decision for one timestep shared by the whole batch (the sampler's steps)."""
        return self.enabled and (self.interval is None or self.interval[0] <= t <= self.interval[1])

    def scales(self, t: Tensor) -> Tensor:
        """Per-sample w [B] for per-sample timesteps t [B] (on t's device): w inside the interval, 1 outside."""
        w = torch.full_like(t, self.scale, dtype=torch.float32)
        if self.interval is None:
            return w
        inside = (t >= self.interval[0]) & (t <= self.interval[1])
        return torch.where(inside, w, torch.ones_like(w))


def combine(v_cond: Tensor, v_uncond: Tensor, w: float | Tensor) -> Tensor:
    """Standard CFG:  v = v_uncond + w (v_cond - v_uncond)  (w a float or broadcastable per-sample tensor)."""
    return v_uncond + w * (v_cond - v_uncond)


def guided_velocity(net, x: Tensor, t: Tensor, cond: Cond, uncond: Cond | None, guidance: Guidance,
                    per_sample: bool, apply: bool = True) -> Tensor:
    """The guided prediction v [B, C, F, H, W] (fp32 when guided) at x [B, C, F, H, W], timesteps t [B].

    per_sample=False (the sampler): `apply` is this step's host-side decision (`Guidance.applies_at`); a
    step without guidance runs the conditional branch alone. per_sample=True (the DMD loss): w per sample from
    `Guidance.scales(t)`, one batched forward for the whole batch.
    """
    if uncond is None or not guidance.enabled or (not per_sample and not apply):
        return cond(net, x, t)
    v_c, v_u = cfg_pair(cond, uncond)(net, torch.cat([x, x]), torch.cat([t, t])).float().chunk(2)
    w: float | Tensor = guidance.scale
    if per_sample:
        w = guidance.scales(t).view(-1, *[1] * (v_u.ndim - 1))
    return combine(v_c, v_u, w)
