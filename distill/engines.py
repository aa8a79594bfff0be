"""Sharded training engines for the DMD networks: FSDP2 (full or hybrid shard) and DeepSpeed ZeRO-2 / ZeRO-3.

`ddp` (the default) is accelerate's DistributedDataParallel and lives in distill/trainer.py; this module chooses
among the engines that split the model states over the processes and consolidates their checkpoints; their
interface (`ShardedEngine`) is distill/engine_base.py and the engines are `distill/engine_fsdp.py` and
`distill/engine_deepspeed.py`:

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
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from distill.config import ENGINES, SHARDED_ENGINES
from distill.engine_base import ShardedEngine

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


# ---- engines ----------------------------------------------------------------------------------------------------
def make_engine(name: str, device: torch.device, grad_accum: int, batch_size: int, bf16: bool,
                shard_size: int = 0, cpu_offload: bool = False) -> ShardedEngine:
    if name in ("fsdp", "hybrid"):
        from distill.engine_fsdp import FSDP2Engine

        return FSDP2Engine(name, device, grad_accum, batch_size, bf16, shard_size, cpu_offload)
    if name in ("zero2", "zero3"):
        from distill.engine_deepspeed import DeepSpeedEngine

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


__all__ = ["ENGINES", "SHARDED_ENGINES", "ShardedEngine", "consolidate", "engine_from_launch", "launcher_only",
           "make_engine", "resolve_engine"]
