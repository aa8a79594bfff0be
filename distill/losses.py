"""Training losses as plain functions of (networks, tensors): read them against dmd.md and wan21.md.

Convention (inference/flow.py): x_s = (1 - s) x0 + s eps, v = eps - x0, timestep t = 1000 s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from inference.flow import add_noise, shift_sigma, v_from_x0_eps


@dataclass
class Cond:
    """Conditioning passed to every DiT call: context [B, text_len, text_dim]; I2V clip_fea and y."""

    context: Tensor
    clip_fea: Tensor | None = None
    y: Tensor | None = None

    def to(self, device: torch.device | str) -> Cond:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Cond(move(self.context), move(self.clip_fea), move(self.y))

    def __call__(self, net, x: Tensor, t: Tensor) -> Tensor:
        return net(x, t, self.context, clip_fea=self.clip_fea, y=self.y)


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
    v = cond(net, x_s, 1000.0 * s)
    return (v.float() - v_from_x0_eps(x0, eps).float()).pow(2).mean()
