"""FSDP2 engine for the DMD networks (`distributed.engine=fsdp|hybrid`; the engine family: distill/engines.py).

`fully_shard` on every DiT block and on the root (one all-gather per block), FULL_SHARD or HYBRID_SHARD over a 2-D
mesh; rank 0 reads the weights and `set_model_state_dict(broadcast_from_rank0=True)` gives each rank its shard;
optional CPU offload of parameters, gradients and optimizer states; checkpoints as one DCP folder.
"""


from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor, nn

from distill.engine_base import ShardedEngine


class FSDP2Engine(ShardedEngine):
    """torch.distributed.fsdp.fully_shard on every DiT block and the root (one all-gather per block)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from torch.distributed.device_mesh import init_device_mesh

        kind = self.device.type
        if self.name == "fsdp":
            self.mesh = init_device_mesh(kind, (self.world,), mesh_dim_names=("shard",))
        else:  # HSDP: shard inside a group of `shard` ranks (a node), replicate across groups
            shard = self.shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
            if self.world % shard:
                raise ValueError(f"distributed.shard_size={shard} must divide the number of processes {self.world}")
            self.mesh = init_device_mesh(kind, (self.world // shard, shard), mesh_dim_names=("replicate", "shard"))

    def _shard(self, skeleton: nn.Module, state: dict[str, Tensor] | None, dtype: torch.dtype,
               policy=None) -> nn.Module:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import fully_shard

        skeleton = skeleton.to(dtype)  # still on meta: free
        extra = {} if policy is None else {"mp_policy": policy}
        if self.cpu_offload:  # sharded parameters, gradients and optimizer states live in CPU memory
            from torch.distributed.fsdp import CPUOffloadPolicy

            extra["offload_policy"] = CPUOffloadPolicy(pin_memory=self.device.type == "cuda")
        # a two-expert pair (distill/moe_sharded.py): each expert's blocks, then the expert, then the pair
        experts = getattr(skeleton, "experts", None) or (skeleton,)
        for dit in experts:
            for block in dit.blocks:
                fully_shard(block, mesh=self.mesh, **extra)
            if dit is not skeleton:
                fully_shard(dit, mesh=self.mesh, **extra)
        fully_shard(skeleton, mesh=self.mesh, **extra)
        skeleton.to_empty(device="cpu" if self.cpu_offload else self.device)
        # rank 0 holds the full state dict; every rank receives and keeps only its shard
        set_model_state_dict(skeleton, state if self.is_loader else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        return skeleton

    def trainable(self, name, skeleton, state, make_opt, grad_clip):
        policy = None
        if self.bf16:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        net = self._shard(skeleton, state, torch.float32, policy)
        opt = make_opt([p for p in net.parameters() if p.requires_grad])
        eager_adam_state(opt)
        return net, opt

    def frozen(self, skeleton, state, dtype):
        return self._shard(skeleton.requires_grad_(False), state, dtype).eval()

    def no_sync(self, net, last):
        # skip the reduce-scatter on all but the last micro-batch (gradients accumulate unsharded meanwhile)
        net.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def backward(self, net, loss, last):
        (loss / self.grad_accum).backward()

    def clip_and_step(self, net, opt, grad_clip):
        norm = torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.grad is not None], grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).detach()

    def full_state_dict(self, net):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.float() for k, v in sd.items()} if self.is_loader else {}

    def ema_local(self, param):
        return param.to_local()  # DTensor ops have no _foreach_copy_: the EMA keeps the local shards

    @staticmethod
    def as_dtensors(local: dict[str, Tensor], net: nn.Module) -> dict[str, Tensor]:
        """Local shards (e.g. the EMA's) as DTensors laid out like `net`'s parameters (views, no copy)."""
        from torch.distributed.tensor import DTensor

        params = dict(net.named_parameters())
        return {k: DTensor.from_local(v, params[k].device_mesh, params[k].placements, run_check=False,
                                      shape=params[k].shape, stride=params[k].stride()) for k, v in local.items()}

    def full_ema(self, ema, net):
        full = {k: v.full_tensor().cpu() for k, v in self.as_dtensors(ema.state_dict(), net).items()}
        return full if self.is_loader else {}

    def _state(self, networks, optimizers, extra) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        state = {}
        for name, net in networks.items():
            msd, osd = get_state_dict(net, optimizers[name])
            state[name] = {"model": msd, "optim": osd}
        # extra states (the EMA) hold shards of the generator's parameters
        state.update({name: self.as_dtensors(obj.state_dict(), networks["generator"]) for name, obj in extra.items()})
        return state

    def save(self, folder, networks, optimizers, extra):
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(networks, optimizers, extra), checkpoint_id=str(folder / "dcp"))

    def load(self, folder, networks, optimizers, extra):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if not (folder / "dcp").is_dir():
            raise FileNotFoundError(f"{folder} has no dcp/ folder: not a checkpoint of an fsdp/hybrid run")
        state = self._state(networks, optimizers, extra)
        dcp.load(state, checkpoint_id=str(folder / "dcp"))  # in place (the EMA's DTensors included)
        for name, net in networks.items():
            set_state_dict(net, optimizers[name], model_state_dict=state[name]["model"],
                           optim_state_dict=state[name]["optim"])
        for name, obj in extra.items():
            obj.load_state_dict({k: v.to_local() for k, v in state[name].items()})


def eager_adam_state(opt: torch.optim.Optimizer) -> None:
    """Create Adam(W)'s per-parameter state now, exactly as its first step with a gradient would (zeros, step 0).

    Every checkpoint then holds every parameter's state: a parameter that has had no gradient yet (the expert of a
    pair that no step has reached, distill/moe_sharded.py) would otherwise have none, and a DCP load, which fills
    the state a fresh optimizer reports for all parameters, would find its keys missing. Adam skips a parameter
    without a gradient, so the zeros stay until its first one, as with the lazy state."""
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            if state:
                continue
            on_device = group.get("capturable") or group.get("fused")
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device) if on_device else torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
