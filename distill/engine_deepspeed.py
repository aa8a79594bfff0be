"""DeepSpeed ZeRO-2 / ZeRO-3 engine for the DMD networks (`distributed.engine=zero2|zero3`; the engine family:
distill/engines.py), and the flat-chunk layout in which it partitions (and the EMA keeps) each tensor.

One `deepspeed.initialize` per trainable network (AdamW passed in; clipping and accumulation in the DeepSpeed
config); the frozen teacher is ZeRO-3 partitioned; rank 0's weights are broadcast while partitioning.
"""


from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from distill.engine_base import ShardedEngine


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
