"""Wan2.2 A14B's mixture of two experts (docs/wan22.md): a high-noise expert for timesteps t >= boundary * 1000 and
a low-noise expert below. Both are full DiTs of the same architecture; at each timestep exactly one of them runs.

`ExpertPair` routes each sample of a batch to its expert, so one module serves the sampler (one timestep per step,
one expert per call) and training (a batch of random timesteps: DMD's critic and real score, ODE regression).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

EXPERTS = ("high_noise_model", "low_noise_model")  # the official folder names, also the state-dict prefixes


class ExpertPair(nn.Module):
    """Two DiT experts and the boundary between them.

    boundary: a fraction of 1000 (Wan2.2 T2V-A14B 0.875, I2V-A14B 0.900); sample i goes to `high_noise_model`
    when t_i >= boundary * 1000, else to `low_noise_model`. Per-token timesteps [B, L] route by their maximum
    (the noisy tokens' timestep).
    """

    def __init__(self, high_noise_model: nn.Module, low_noise_model: nn.Module, boundary: float) -> None:
        super().__init__()
        if not 0.0 < boundary < 1.0:
            raise ValueError(f"the expert boundary is a fraction of 1000 in (0, 1), got {boundary}")
        self.high_noise_model, self.low_noise_model, self.boundary = high_noise_model, low_noise_model, boundary

    @property
    def boundary_t(self) -> float:
        return self.boundary * 1000.0

    def is_high(self, t: Tensor) -> Tensor:
        """t: [B] or [B, L] (or a scalar) in [0, 1000] -> bool [B]: which samples the high-noise expert serves."""
        t = torch.as_tensor(t)
        t = t.reshape(1) if t.ndim == 0 else t
        return (t.amax(dim=-1) if t.ndim == 2 else t) >= self.boundary_t

    def expert_for(self, t: float) -> nn.Module:
        """The expert of one timestep (the sampler's case)."""
        return self.high_noise_model if float(t) >= self.boundary_t else self.low_noise_model

    def forward(self, x: Tensor, t: Tensor, context: Any, **kwargs: Any) -> Tensor:
        """The expert of each sample's timestep; same arguments and output as the DiT ([B, C, F, H, W]).

        A batch on one side of the boundary is one call; a mixed batch is split, each part run by its expert, and
        the outputs put back in the batch order."""
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        high = self.is_high(t)
        if bool(high.all()):
            return self.high_noise_model(x, t, context, **kwargs)
        if not bool(high.any()):
            return self.low_noise_model(x, t, context, **kwargs)
        out = torch.empty(0)
        for mask, expert in ((high, self.high_noise_model), (~high, self.low_noise_model)):
            idx = mask.nonzero().squeeze(1)
            part = expert(x[idx], t[idx], _select(context, idx), **{k: _select(v, idx) for k, v in kwargs.items()})
            if out.numel() == 0:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out[idx] = part
        return out


def _select(value: Any, idx: Tensor) -> Any:
    """Rows `idx` of a per-sample argument (tensor [B, ...] or list of per-sample tensors); None stays None."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        return value[idx]
    return [value[i] for i in idx.tolist()]
