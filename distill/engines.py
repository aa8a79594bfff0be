"""Sharded training engines for the DMD networks: FSDP2 (full or hybrid shard) and DeepSpeed ZeRO-2 / ZeRO-3.

`ddp` (the default) is accelerate's DistributedDataParallel and lives in distill/trainer.py; this module holds
the engines that split the model states over the processes:

| engine | trainable weights | grads + AdamW states | EMA | frozen teacher (real_score) |
|---|---|---|---|---|
| `fsdp` (FSDP2, FULL_SHARD) | sharded | sharded | sharded (DTensor) | sharded |
| `hybrid` (FSDP2, HYBRID_SHARD) | sharded in a node, replicated across | same | same | same |
| `zero2` (DeepSpeed) | whole on every rank | partitioned | partitioned (flat chunks) | ZeRO-3 partitioned |
| `zero3` (DeepSpeed) | partitioned | partitioned | partitioned (the params' partitions) | partitioned |

Weights are read once: rank 0 reads the safetensors file(s), every other rank builds the network on the `meta`
device; FSDP2 shards the meta skeleton and `set_model_state_dict(broadcast_from_rank0=True)` sends each rank its
shard; DeepSpeed broadcasts rank 0's weights while it partitions (ranks > 0 hold untouched `to_empty` pages).

Why not accelerate's own FSDP / DeepSpeed wrapping: accelerate ignores its FSDP plugin on a CPU (the tests'
gloo processes) and drives one DeepSpeed engine per plugin, while DMD trains two networks and shards a third.
So accelerate launches the processes and names the engine (`configs/accelerate/*.yaml`, read by
`engine_from_launch`), and this module wraps the networks the same way on CPU and GPU: `fully_shard` per DiT
block + root, and one `deepspeed.initialize` per network (AdamW passed in, clipping and accumulation in the
DeepSpeed config).

Checkpoints (inside the trainer's atomic `step_*` folder): FSDP writes one torch.distributed.checkpoint (DCP)
folder `dcp/` (models, optimizers, EMA; loadable at another world size); DeepSpeed writes `deepspeed/<net>/`
(engine.save_checkpoint) and `ema/rank<r>-of-<w>.safetensors`. `python -m distill.engines consolidate CKPT
--out DIR` turns any checkpoint (ddp too) into one safetensors file per network (generator, critic, ema) in the
DDP layout, which `models.components.load_dit(..., explicit=...)` and `python -m distill.export` read.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from distill.config import ENGINES, SHARDED_ENGINES

# accelerate's FSDP_SHARDING_STRATEGY: names, or FSDP1's enum numbers in older configs
FSDP_STRATEGIES = {"FULL_SHARD": "fsdp", "1": "fsdp", "HYBRID_SHARD": "hybrid", "4": "hybrid"}
LAUNCH_FLAGS = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")


# ---- which engine ---------------------------------------------------------------------------------------------
def engine_from_launch(env: dict[str, str] | os._Environ = os.environ) -> str | None:
    """The engine an `accelerate launch --config_file configs/accelerate/<x>.yaml` asked for (None: plain DDP).

    Raises ValueError for settings this module does not implement (FSDP1, CPU offload, ZeRO-1)."""
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        if env.get("FSDP_VERSION", "1") != "2":
            raise ValueError("the accelerate config asks for FSDP1; set fsdp_version: 2 (FSDP2 shards full or "
                             "hybrid; see configs/accelerate/fsdp.yaml)")
        strategy = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
        if strategy not in FSDP_STRATEGIES:
            raise ValueError(f"fsdp_sharding_strategy {strategy} is not supported; use FULL_SHARD or HYBRID_SHARD")
        if env.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
            raise ValueError("fsdp_offload_params in the accelerate config is not read: set it to false and pass "
                             "distributed.cpu_offload=true (FSDP2 CPUOffloadPolicy) in the training config")
        return FSDP_STRATEGIES[strategy]
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        if stage not in ("2", "3"):
            raise ValueError(f"zero_stage {stage} is not supported; use 2 or 3 (configs/accelerate/zero*.yaml)")
        for key in ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"):
            if env.get(key, "none") not in ("none", ""):
                raise ValueError(f"{key}={env[key]}: DeepSpeed offload is not supported here; set it to none")
        return f"zero{stage}"
    return None


def resolve_engine(configured: str, env: dict[str, str] | os._Environ = os.environ) -> str:
    """`distributed.engine` (auto: the launch config's engine, else ddp); an explicit one must match the launch."""
    launched = engine_from_launch(env)
    if configured == "auto":
        return launched or "ddp"
    if launched is not None and launched != configured:
        raise ValueError(f"distributed.engine={configured} but the accelerate launch config asks for {launched}; "
                         f"set distributed.engine=auto (or {launched}), or launch with another --config_file")
    return configured


@contextlib.contextmanager
def launcher_only() -> Iterator[None]:
    """Hide the FSDP / DeepSpeed launch flags while the Accelerator is built, so that accelerate sets up plain
    multi-process state (device, process group) and leaves the wrapping to this module on GPU as on CPU."""
    saved = {k: os.environ.pop(k) for k in LAUNCH_FLAGS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


# ---- flat chunks: the DeepSpeed partition layout ----------------------------------------------------------------
def chunk_bounds(numel: int, rank: int, world: int) -> tuple[int, int, int]:
    """(lo, hi, size) of rank's chunk of a flattened tensor split in `world` equal, end-padded chunks.

    This is ZeRO-3's partition of a parameter (`ds_tensor` holds elements [lo, hi) then padding up to size)."""
    size = math.ceil(numel / world)
    lo = min(numel, rank * size)
    return lo, min(numel, lo + size), size


def gather_chunks(chunks: dict[str, Tensor], shapes: dict[str, torch.Size], rank: int, world: int
                  ) -> dict[str, Tensor]:
    """Full fp32 CPU tensors from every rank's flat chunks (one all_gather; a collective on every rank)."""
    sizes = {k: chunk_bounds(math.prod(shapes[k]), rank, world)[2] for k in chunks}
    buf = torch.cat([torch.nn.functional.pad(c.detach().float().reshape(-1).cpu(), (0, sizes[k] - c.numel()))
                     for k, c in chunks.items()])  # [sum of sizes]
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf)
    out, offset = {}, 0
    for k, size in sizes.items():
        flat = torch.cat([p[offset:offset + size] for p in parts])
        out[k] = flat[: math.prod(shapes[k])].view(shapes[k]).clone()
        offset += size
    return out


# ---- engines ----------------------------------------------------------------------------------------------------
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
        for block in skeleton.blocks:
            fully_shard(block, mesh=self.mesh, **extra)
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
        return net, make_opt([p for p in net.parameters() if p.requires_grad])

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


class DeepSpeedEngine(ShardedEngine):
    """One `deepspeed.initialize` per network: ZeRO-2/3 for the trainable ones, ZeRO-3 (no optimizer) for the
    frozen teacher. Gradient accumulation and clipping are DeepSpeed's (set per network in its config)."""

    @property
    def stage(self) -> int:
        return int(self.name[-1])

    def config(self, stage: int, grad_clip: float | None, bf16: bool) -> dict:
        cfg = {"train_micro_batch_size_per_gpu": self.batch_size, "gradient_accumulation_steps": self.grad_accum,
               "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16},
               "zero_allow_untested_optimizer": True,  # our torch AdamW (DeepSpeed partitions its states)
               "steps_per_print": 2**31, "wall_clock_breakdown": False}
        if grad_clip is not None:
            cfg["gradient_clipping"] = grad_clip
        return cfg

    def _materialize(self, skeleton: nn.Module, state: dict[str, Tensor] | None, dtype: torch.dtype) -> nn.Module:
        """Rank 0: the weights; others: uninitialised CPU pages (untouched until DeepSpeed broadcasts rank 0's
        weights into them one parameter at a time and keeps only the partition)."""
        from models.loading import load_into

        if self.is_loader:
            return load_into(skeleton, {k: v.to(dtype) for k, v in state.items()}, "DeepSpeed rank 0 weights")
        return skeleton.to(dtype).to_empty(device="cpu")

    def trainable(self, name, skeleton, state, make_opt, grad_clip):
        import deepspeed

        net = self._materialize(skeleton, state, torch.float32)
        opt = make_opt([p for p in net.parameters() if p.requires_grad])
        engine, opt, _, _ = deepspeed.initialize(model=net, optimizer=opt,
                                                 config=self.config(self.stage, grad_clip, self.bf16))
        return engine, opt

    def frozen(self, skeleton, state, dtype):
        import deepspeed

        net = self._materialize(skeleton.requires_grad_(False), state, dtype).eval()
        engine, *_ = deepspeed.initialize(model=net, config=self.config(3, None, dtype == torch.bfloat16))
        return engine

    def module(self, net):
        return net.module

    def backward(self, net, loss, last):
        net.set_gradient_accumulation_boundary(last)
        net.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself

    def clip_and_step(self, net, opt, grad_clip):
        net.step()  # clips (config gradient_clipping), steps, zeroes the gradients
        norm = net.get_global_grad_norm()
        return float(norm if norm is not None else float("nan"))

    def _chunk(self, p: nn.Parameter) -> Tensor:
        if self.stage == 3:
            lo, hi, _ = chunk_bounds(p.ds_numel, self.rank, self.world)
            return p.ds_tensor.view(-1)[: hi - lo]
        lo, hi, _ = chunk_bounds(p.numel(), self.rank, self.world)
        return p.detach().view(-1)[lo:hi]

    def ema_local(self, param):
        return self._chunk(param)

    def _shape(self, p: nn.Parameter) -> torch.Size:
        return p.ds_shape if self.stage == 3 else p.shape

    def full_state_dict(self, net):
        import deepspeed

        out = {}
        for k, p in net.module.named_parameters():
            ctx = deepspeed.zero.GatheredParameters([p]) if self.stage == 3 else contextlib.nullcontext()
            with ctx:  # one parameter gathered at a time
                if self.is_loader:
                    out[k] = p.detach().float().cpu().clone()
        if self.is_loader:
            out.update({k: b.detach().cpu().clone() for k, b in net.module.named_buffers()})
        return out

    def full_ema(self, ema, net):
        shapes = {k: self._shape(p) for k, p in net.module.named_parameters() if k in ema.shadow}
        full = gather_chunks(ema.state_dict(), shapes, self.rank, self.world)
        return full if self.is_loader else {}

    def save(self, folder, networks, optimizers, extra):
        for name, net in networks.items():
            net.save_checkpoint(str(folder / "deepspeed"), tag=name, save_latest=False)
        for name, obj in extra.items():
            path = folder / name / f"rank{self.rank:05d}-of-{self.world:05d}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in obj.state_dict().items()}, str(path))

    def load(self, folder, networks, optimizers, extra):
        for name, net in networks.items():
            if not (folder / "deepspeed" / name).is_dir():
                raise FileNotFoundError(f"{folder} has no deepspeed/{name}: not a checkpoint of a zero2/zero3 run")
            path, _ = net.load_checkpoint(str(folder / "deepspeed"), tag=name, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load {folder / 'deepspeed' / name}")
        for name, obj in extra.items():
            path = folder / name / f"rank{self.rank:05d}-of-{self.world:05d}.safetensors"
            if not path.is_file():
                found = sorted(p.name for p in (folder / name).glob("*.safetensors"))
                raise FileNotFoundError(f"{path} not found ({found}): resume a DeepSpeed run with the number of "
                                        f"processes it was saved with")
            obj.load_state_dict(load_file(str(path)))


def make_engine(name: str, device: torch.device, grad_accum: int, batch_size: int, bf16: bool,
                shard_size: int = 0, cpu_offload: bool = False) -> ShardedEngine:
    if name in ("fsdp", "hybrid"):
        return FSDP2Engine(name, device, grad_accum, batch_size, bf16, shard_size, cpu_offload)
    if name in ("zero2", "zero3"):
        return DeepSpeedEngine(name, device, grad_accum, batch_size, bf16, shard_size)
    raise ValueError(f"no sharded engine {name!r}; expected one of {list(SHARDED_ENGINES)}")


# ---- offline consolidation ---------------------------------------------------------------------------------------
def consolidate(checkpoint: str | Path, out: str | Path) -> list[Path]:
    """One fp32 safetensors file per network of a checkpoint folder (any engine) -> `out/<name>.safetensors`.

    ddp: a copy; fsdp/hybrid: DCP -> full tensors; zero2/zero3: DeepSpeed's zero_to_fp32 for the trainable
    networks, the EMA's per-rank flat chunks concatenated (shapes from the generator)."""
    checkpoint, out = Path(checkpoint), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (checkpoint / "dcp").is_dir():
        state = _read_dcp(checkpoint / "dcp")
        nets = {k: (v["model"] if isinstance(v, dict) and "model" in v else v) for k, v in state.items()}
    elif (checkpoint / "deepspeed").is_dir():
        nets = _read_deepspeed(checkpoint)
    else:
        nets = {p.stem: load_file(str(p)) for p in checkpoint.glob("*.safetensors")}
    if not nets:
        raise FileNotFoundError(f"{checkpoint} holds no networks (expected dcp/, deepspeed/ or *.safetensors)")
    written = []
    for name, sd in nets.items():
        path = out / f"{name}.safetensors"
        save_file({k: v.detach().float().contiguous() for k, v in sd.items()}, str(path))
        written.append(path)
    return written


def _read_dcp(folder: Path) -> dict:
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(folder), f"{tmp}/full.pt")
        return torch.load(f"{tmp}/full.pt", map_location="cpu", weights_only=True)


def _read_deepspeed(checkpoint: Path) -> dict[str, dict[str, Tensor]]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ds = checkpoint / "deepspeed"
    nets = {p.name: dict(get_fp32_state_dict_from_zero_checkpoint(str(ds), tag=p.name))
            for p in sorted(ds.iterdir()) if p.is_dir()}
    for folder in sorted(p for p in checkpoint.iterdir() if p.is_dir() and p.name not in ("deepspeed",)):
        files = sorted(folder.glob("rank*-of-*.safetensors"))
        if not files:
            continue
        chunks = [load_file(str(f)) for f in files]
        shapes = {k: v.shape for k, v in nets["generator"].items()}
        nets[folder.name] = {k: torch.cat([c[k].float() for c in chunks])[: math.prod(shapes[k])].view(shapes[k])
                             for k in chunks[0]}
    return nets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Consolidate a (sharded) training checkpoint into one "
                                                 "safetensors file per network.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("consolidate", help="CHECKPOINT (a step_* folder) -> OUT/<network>.safetensors")
    c.add_argument("checkpoint")
    c.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    for path in consolidate(args.checkpoint, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["ENGINES", "SHARDED_ENGINES", "ShardedEngine", "chunk_bounds", "consolidate", "engine_from_launch",
           "gather_chunks", "launcher_only", "make_engine", "resolve_engine"]
