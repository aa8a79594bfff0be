"""Exponential moving average of a network's parameters (kept in fp32, on the parameters' device)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class EMA:
    """ema <- decay * ema + (1 - decay) * param, starting at `start_step` (copying the weights then).

    Only trainable floating-point parameters are tracked; `state_dict()` uses the network's own keys so an
    EMA checkpoint loads into the network (and exports) like the raw weights.

    Sharded networks (distill/engines.py): `local(param)` gives what this rank tracks of a parameter (its shard),
    so the EMA is split like the generator's states; FSDP2 parameters are DTensors and need no `local`.
    """

    def __init__(self, net: nn.Module, decay: float, start_step: int = 0,
                 local: Callable[[nn.Parameter], Tensor] | None = None) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay, self.start_step = decay, start_step
        self.local = local or (lambda p: p)
        self.shadow = {k: self.local(p).detach().float().clone() for k, p in net.named_parameters()
                       if p.requires_grad}

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> None:
        # the local views are taken anew each time (DeepSpeed may re-point parameters at new flat buffers)
        params = [self.local(p).float() for k, p in net.named_parameters() if k in self.shadow]
        if params and next(iter(self.shadow.values())).device != params[0].device:
            # the network moved (e.g. accelerate's prepare put it on the GPU after the EMA was made): follow it
            self.shadow = {k: v.to(params[0].device) for k, v in self.shadow.items()}
        shadow = list(self.shadow.values())
        if step <= self.start_step:  # before the start: follow the weights exactly
            torch._foreach_copy_(shadow, params)
        else:
            torch._foreach_lerp_(shadow, params, 1.0 - self.decay)

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
