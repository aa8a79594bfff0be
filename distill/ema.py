"""Exponential moving average of a network's parameters (kept in fp32, on the parameters' device)."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """ema <- decay * ema + (1 - decay) * param, starting at `start_step` (copying the weights then).

    Only trainable floating-point parameters are tracked; `state_dict()` uses the network's own keys so an
    EMA checkpoint loads into the network (and exports) like the raw weights.
    """

    def __init__(self, net: nn.Module, decay: float, start_step: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay, self.start_step = decay, start_step
        self.shadow = {k: p.detach().float().clone() for k, p in net.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> None:
        params = [p for k, p in net.named_parameters() if k in self.shadow]
        shadow = list(self.shadow.values())
        if step <= self.start_step:  # before the start: follow the weights exactly
            torch._foreach_copy_(shadow, [p.float() for p in params])
        else:
            torch._foreach_lerp_(shadow, [p.float() for p in params], 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} key(s), e.g. {sorted(missing)[:3]}")
        for k in self.shadow:
            self.shadow[k].copy_(state[k])

    @torch.no_grad()
    def copy_to(self, net: nn.Module) -> None:
        """Write the averaged weights into `net` (e.g. a copy used for sampling or export)."""
        for k, p in net.named_parameters():
            if k in self.shadow:
                p.copy_(self.shadow[k].to(p.dtype))
