"""The interface every sharded DMD engine implements (`ShardedEngine`); the engines are distill/engine_fsdp.py
and distill/engine_deepspeed.py, the choice among them and checkpoint consolidation distill/engines.py.

Kept in its own module so that the engines depend on the interface only and the factory (distill/engines.py)
depends on the engines: no import cycle.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

# ---- interface ----------------------------------------------------------------------------------------------------
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class ShardedEngine(ABC):
    """Common interface; `make_engine` returns an FSDP2 or DeepSpeed subclass."""

    name = "sharded"

    def __init__(self, name: str, device: torch.device, grad_accum: int, batch_size: int, bf16: bool,
                 shard_size: int = 0, cpu_offload: bool = False) -> None:
        if not dist.is_initialized():
            raise RuntimeError(f"distributed.engine={name} needs a process group: launch with accelerate launch "
                               f"(configs/accelerate/*.yaml) or torchrun")
        self.name, self.device, self.grad_accum, self.batch_size, self.bf16 = name, device, grad_accum, \
            batch_size, bf16
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.shard_size, self.cpu_offload = shard_size, cpu_offload

    @property
    def is_loader(self) -> bool:
        """The rank that reads weight files (the others build meta skeletons)."""
        return self.rank == 0

    # the per-network API used by the trainer; see the subclasses
    @abstractmethod
    def trainable(self, name: str, skeleton: nn.Module, state: dict[str, Tensor] | None, make_opt: OptimizerFactory,
                  grad_clip: float) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Shard a trainable network (meta `skeleton`, full `state` on the loader rank) and build its optimizer."""

    @abstractmethod
    def frozen(self, skeleton: nn.Module, state: dict[str, Tensor] | None, dtype: torch.dtype) -> nn.Module:
        """Shard a frozen network (no optimizer) in `dtype`."""

    def module(self, net: nn.Module) -> nn.Module:
        """The network's own module (DeepSpeed: engine.module; FSDP2 shards in place)."""
        return net

    def no_sync(self, net: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, net: nn.Module, loss: Tensor, last: bool) -> None:
        """Backward of one micro-batch's mean loss; `last`: the step's last micro-batch."""

    @abstractmethod
    def clip_and_step(self, net: nn.Module, opt: torch.optim.Optimizer, grad_clip: float) -> float:
        """Clip the gradient norm to `grad_clip`, step, zero the gradients; the norm before clipping."""

    def ema_local(self, param: nn.Parameter) -> Tensor:
        """What an EMA tracks of `param` on this rank (its shard)."""
        return param

    @abstractmethod
    def full_state_dict(self, net: nn.Module) -> dict[str, Tensor]:
        """Full fp32 CPU state dict on rank 0 ({} elsewhere); a collective."""

    @abstractmethod
    def full_ema(self, ema, net: nn.Module) -> dict[str, Tensor]:
        """The EMA's full tensors on rank 0 ({} elsewhere); a collective."""

    @abstractmethod
    def save(self, folder: Path, networks: dict, optimizers: dict, extra: dict) -> None:
        """Every rank writes its shards of networks, optimizers and EMA into `folder`."""

    @abstractmethod
    def load(self, folder: Path, networks: dict, optimizers: dict, extra: dict) -> None:
        """Read this rank's shards back from a folder written by `save`."""
