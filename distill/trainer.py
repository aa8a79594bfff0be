"""The training loop shared by all tasks: accelerate, checkpoints, resume, logging, non-finite guard.

A task subclasses `Trainer` and provides `build()` (networks, optimizers, data), `train_step(step)` (returns
scalar metrics) and `export()` (the inference artefact). The loop, checkpointing and logging live here once.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch import nn

from distill.checkpoint import (
    CheckpointError,
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    resume_candidate,
    save_checkpoint,
    staging_dir,
    verify_checkpoint,
)
from distill.config import SHARDED_ENGINES, TrainConfig, to_yaml
from distill.engines import ShardedEngine, launcher_only, make_engine, resolve_engine
from distill.logger import MetricsLogger
from distill.preflight import preflight
from distill.sampling import TrainingSamples

MAX_NONFINITE = 5  # consecutive skipped updates (non-finite loss, or bad update) before the run stops
TRAIN_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Metrics = dict[str, float | torch.Tensor]  # one step's metrics: 0-dim device tensors until a logging step


class NonFiniteLossError(RuntimeError):
    """MAX_NONFINITE updates in a row were skipped (non-finite losses, or non-finite / exploding updates)."""


class Trainer(TrainingSamples):
    """Owns the accelerator, the run directory, the step counter and the checkpoint/resume logic."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        # `accelerate launch --multi_gpu` on a machine without CUDA: DDP over gloo on the CPU (otherwise every
        # process silently runs as its own single-process job, all writing the same run directory)
        cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        engine = resolve_engine(cfg.distributed.engine)  # auto: the accelerate launch config's engine
        if engine != cfg.distributed.engine:
            cfg.distributed.engine = engine
            cfg.validate()  # e.g. a sharded engine with task pretrain or LoRA mode
        # sharded engines wrap the networks themselves (distill/engines.py): accelerate only sets up the processes
        with launcher_only() if engine in SHARDED_ENGINES else contextlib.nullcontext():
            self.accelerator = Accelerator(gradient_accumulation_steps=1, mixed_precision=cfg.mixed_precision,
                                           cpu=cpu)
        set_seed(cfg.seed, device_specific=True)
        self.device = self.accelerator.device
        self.train_peak_gib = 0.0  # training peak (GiB) carried over a sampling pass to the next metrics row
        self.engine: ShardedEngine | None = None
        if engine in SHARDED_ENGINES:
            self.engine = make_engine(engine, self.device, cfg.grad_accum, cfg.batch_size,
                                      cfg.mixed_precision == "bf16", cfg.distributed.shard_size,
                                      cfg.distributed.cpu_offload)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        preflight(cfg)
        self.step = 0
        self.pending: dict[str, tuple[torch.Tensor | float, int]] = {}  # metric sums and counts since the last row
        self.nonfinite: dict[str, int] = {}  # consecutive skipped updates, per loss and per network's update
        self.networks: dict[str, nn.Module] = {}  # trainable networks saved in checkpoints
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.extra_state: dict[str, Any] = {}  # e.g. EMA, by name -> object with state_dict/load_state_dict
        self.trainable_only = False  # checkpoints keep only parameters that train (LoRA mode: the adapters)
        self.step_flags: Metrics = {}  # metrics set outside train_step (skipped updates), merged into the step's
        self.sample_images: list | None = None  # I2V sample conditioning images, resolved before step 0
        self.sampling_modules: dict[str, nn.Module] = {}  # VAE / image encoder copies on the training device
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.ckpt_dir.mkdir(exist_ok=True)  # a path that cannot be a folder fails here, before step 0
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        self.logger = MetricsLogger(self.run_dir, cfg, enabled=self.is_main)
        self.resume_from = self.resume_path()  # checked before any model is built: a bad choice fails early
        self.build()

    # ---- to be provided by tasks ----------------------------------------------------------------------------
    def build(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define build()")

    def train_step(self, step: int) -> Metrics:
        raise NotImplementedError(f"{type(self).__name__} must define train_step()")

    def export(self) -> Path | None:
        """Write the inference artefact of the run (rank 0). Default: nothing."""
        return None

    def sample(self, step: int) -> None:
        """Write sample videos (rank 0). Default: nothing."""

    @property
    def train_dtype(self) -> torch.dtype:
        """The dtype the networks compute in (mixed_precision): samples are generated in it too."""
        return TRAIN_DTYPES[self.cfg.mixed_precision]

    # ---- machinery ------------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def exports_here(self) -> bool:
        """Whether sample() / export() run on this rank: rank 0, or every rank with a sharded engine (gathering the
        weights is a collective; the tasks write files on rank 0 only)."""
        return self.is_main or self.engine is not None

    def unwrap(self, net: nn.Module) -> nn.Module:
        return self.engine.module(net) if self.engine else self.accelerator.unwrap_model(net)

    def lr_at(self, step: int, base_lr: float) -> float:
        """Warmup-stable-decay: linear warm-up over optim.warmup_steps, constant, then (optim.decay_steps > 0) a
        linear decay to 0 over the last decay_steps of max_steps (a cool-down; 0 keeps the rate constant)."""
        warm, decay = self.cfg.optim.warmup_steps, self.cfg.optim.decay_steps
        scale = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
        if decay > 0:
            scale = min(scale, (self.cfg.max_steps - step) / decay)
        return base_lr * scale

    def clip_and_step(self, name: str, max_norm: float | None = None) -> torch.Tensor | float:
        """Clip the gradient norm of network `name` to `max_norm` (default optim.grad_clip), step its optimizer,
        zero grads; returns the norm before clipping (a device tensor: read it at logging steps only).

        Update guard (optim.max_update > 0, not under sharded engines): the parameters and optimizer state are
        copied before the step; a step whose gradient norm or resulting weights are non-finite, or that moves
        some weight by more than optim.max_update, is undone and counted (`update_guard`)."""
        net, opt = self.networks[name], self.optimizers[name]
        max_norm = self.cfg.optim.grad_clip if max_norm is None else max_norm
        if self.engine:  # DeepSpeed clips with the max_norm given to its config (the same value)
            return self.engine.clip_and_step(net, opt, max_norm)
        norm = self.accelerator.clip_grad_norm_(net.parameters(), max_norm)
        limit = self.cfg.optim.max_update
        params = [p for p in net.parameters() if p.requires_grad]
        backup = _snapshot(params, opt) if limit > 0 else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        if backup is not None:
            self.update_guard(name, norm, params, opt, backup, limit)
        return norm.detach()

    def update_guard(self, name: str, norm: torch.Tensor, params: list[nn.Parameter], opt: torch.optim.Optimizer,
                     backup: tuple[list[torch.Tensor], dict], limit: float) -> None:
        """Undo the step just taken if it was bad (see clip_and_step); raise after MAX_NONFINITE in a row.

        One host sync per optimizer step. Every rank sees the same reduced gradients and weights, so all ranks
        decide alike without communicating."""
        old, _ = backup
        change = torch.stack([(p.detach() - o).abs().max() for p, o in zip(params, old, strict=True)]).max()
        # NaN when the gradient norm is non-finite (inf * 0) or a weight is (NaN propagates through max)
        worst = float(change + norm.detach().float().to(change.device) * 0)
        if math.isfinite(worst) and worst <= limit:
            self.nonfinite[f"{name} update"] = 0
            return
        _restore(params, opt, backup)
        self.step_flags[f"{name}_update_skipped"] = 1.0
        count = self.nonfinite[f"{name} update"] = self.nonfinite.get(f"{name} update", 0) + 1
        self.logger.event(self.step, f"{name} update skipped: gradient norm {float(norm):.4g}, largest weight "
                          f"change {worst:.4g} (non-finite, or above optim.max_update={limit:g}); weights and "
                          f"optimizer state restored ({count}/{MAX_NONFINITE} in a row)")
        if count >= MAX_NONFINITE:
            raise NonFiniteLossError(
                f"{MAX_NONFINITE} {name} updates in a row had a non-finite gradient norm or non-finite / exploding "
                f"weights (change > optim.max_update={limit:g}) at step {self.step}: stopping. The latest "
                f"checkpoint in {self.ckpt_dir} holds the weights before them; lower optim.lr or check the data.")

    def no_sync(self, name: str, last: bool) -> contextlib.AbstractContextManager:
        """Gradient accumulation: skip the gradient reduction of network `name` unless `last` micro-batch."""
        net = self.networks[name]
        if self.engine:
            return self.engine.no_sync(net, last)
        return contextlib.nullcontext() if last else self.accelerator.no_sync(net)

    def backward(self, name: str, loss: torch.Tensor, last: bool = True) -> None:
        """Backward of one micro-batch's mean loss (divided by grad_accum here or by the engine); `last`: the
        step's last micro-batch (DeepSpeed reduces the gradients then)."""
        if self.engine:
            self.engine.backward(self.networks[name], loss, last)
        else:
            self.accelerator.backward(loss / self.cfg.grad_accum)

    def check_finite(self, loss: torch.Tensor, what: str) -> bool:
        """False (skip the update) on a non-finite loss; raise after MAX_NONFINITE in a row.

        The decision is taken jointly by all processes (a loss that is non-finite on one rank skips the update
        everywhere): a rank that skipped alone would leave the others waiting in DDP's gradient all-reduce."""
        local = bool((~torch.isfinite(loss.detach())).any())
        bad = local
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([float(local)], device=self.device)
            bad = bool(self.accelerator.reduce(flag, "sum").item())
        if not bad:
            self.nonfinite[what] = 0
            return True
        count = self.nonfinite[what] = self.nonfinite.get(what, 0) + 1
        value = loss.detach().float().mean().item() if local else "finite here, non-finite on another rank"
        self.logger.event(self.step, f"non-finite {what} loss ({value}); step skipped "
                          f"({count}/{MAX_NONFINITE} in a row)")
        if count >= MAX_NONFINITE:
            raise NonFiniteLossError(
                f"{MAX_NONFINITE} non-finite {what} losses in a row at step {self.step}: stopping. The latest "
                f"checkpoint in {self.ckpt_dir} is intact; lower the learning rate or check the data.")
        return False

    def log_metrics(self, step: int, metrics: Metrics) -> None:
        """Collect one step's metrics (0-dim tensors stay on the device: no host sync per step) and, every
        `logging.every` steps and at the last, write the mean of each metric since the previous row.

        A row's means are one stacked tensor: one all-reduce over the processes (each rank's loss is a mean
        over its own batch, so the average is the loss of the global batch) and one copy to the host. Metrics
        that only some steps produce (the generator's, every dfake_gen_update_ratio steps) average over those
        steps; every rank produces the same keys on the same steps, so the collective lines up."""
        for k, v in metrics.items():
            total, count = self.pending.get(k, (0.0, 0))
            self.pending[k] = (total + (v.detach().float() if torch.is_tensor(v) else float(v)), count + 1)
        self.logger.tick()
        if step % self.cfg.logging.every and step != self.cfg.max_steps:
            return
        keys = list(self.pending)
        means = torch.stack([torch.as_tensor(t / n, dtype=torch.float64, device=self.device).reshape(())
                             for t, n in self.pending.values()])
        self.pending = {}
        if self.accelerator.num_processes > 1:
            means = self.accelerator.reduce(means, "mean")
        row = dict(zip(keys, means.tolist(), strict=True))
        self.logger.log(step, row | self.cuda_peak("cuda_peak_gib", self.train_peak_gib))
        self.train_peak_gib = 0.0

    def cuda_peak(self, key: str, carry: float = 0.0) -> dict[str, float]:
        """{key: max(carry, this rank's peak CUDA memory allocated in GiB since the last reset)}, then the peak is
        reset; {} off CUDA. The allocator's host-side counters: no device sync. Training rows and sampling
        (`write_samples`) report separate peaks, so a rehearsal tells which phase sets a run's memory."""
        if self.device.type != "cuda":
            return {}
        peak = max(carry, torch.cuda.max_memory_allocated(self.device) / 2**30)
        torch.cuda.reset_peak_memory_stats(self.device)
        return {key: peak}

    def pending_state(self) -> dict[str, list]:
        """The unfinished log row's sums for the checkpoint: key -> [sum, count, is_tensor], sums averaged over
        the processes (a collective: every rank calls it). A row's value is mean over ranks of sum / count, and
        every rank has the same counts, so resuming from the averaged sums writes the same row."""
        keys = list(self.pending)
        sums = [self.pending[k][0] for k in keys]
        if self.accelerator.num_processes > 1 and keys:
            stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device).reshape(())
                                   for v in sums])
            sums = self.accelerator.reduce(stacked, "mean").tolist()
        return {k: [float(v), self.pending[k][1], torch.is_tensor(self.pending[k][0])]
                for k, v in zip(keys, sums, strict=True)}

    def load_pending(self, saved: dict[str, list]) -> None:
        """Restore `pending_state` (tensor sums as fp32 device tensors, as log_metrics accumulates them)."""
        self.pending = {k: (torch.tensor(v, dtype=torch.float32, device=self.device) if is_tensor else v, n)
                        for k, (v, n, is_tensor) in saved.items()}

    def network_state(self, net: nn.Module) -> dict[str, torch.Tensor]:
        net = self.unwrap(net)
        if self.trainable_only:
            return {k: p for k, p in net.named_parameters() if p.requires_grad}
        return net.state_dict()

    def load_network_state(self, net: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
        net = self.unwrap(net)
        if not self.trainable_only:
            net.load_state_dict(state)
            return
        want = {k: p.shape for k, p in net.named_parameters() if p.requires_grad}
        got = {k: v.shape for k, v in state.items()}
        if want != got:
            diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
            raise KeyError(f"{where}: the checkpoint's trainable tensors do not match the model's: "
                           + ", ".join(f"{k} {tuple(got[k]) if k in got else 'missing'} vs model "
                                       f"{tuple(want[k]) if k in want else 'absent'}" for k in diff[:4])
                           + f" ({len(diff)} in all); was it written with other lora.rank / lora.target_modules?")
        net.load_state_dict(state, strict=False)

    def state_for_checkpoint(self) -> tuple[dict, dict, dict]:
        nets = {k: self.network_state(v) for k, v in self.networks.items()}
        nets.update({k: v.state_dict() for k, v in self.extra_state.items()})
        optim = {k: v.state_dict() for k, v in self.optimizers.items()}
        return nets, optim, {"data_position": self.step}

    def save(self) -> None:
        self.accelerator.wait_for_everyone()
        pending = self.pending_state()
        if self.engine:
            self.save_sharded(pending)
            return
        if self.is_main:
            nets, optim, state = self.state_for_checkpoint()
            state["metrics_pending"] = pending
            path = save_checkpoint(self.ckpt_dir, self.step, nets, optim, state, self.cfg.checkpoint.keep)
            self.logger.event(self.step, f"checkpoint written: {path}")
        self.accelerator.wait_for_everyone()

    def save_sharded(self, pending: dict[str, list]) -> None:
        """Every rank writes its shards into the staging folder; rank 0 adds state/RNG and renames it."""
        if self.is_main:
            staging_dir(self.ckpt_dir, self.step, fresh=True)
        self.accelerator.wait_for_everyone()
        self.engine.save(staging_dir(self.ckpt_dir, self.step), self.networks, self.optimizers, self.extra_state)
        self.accelerator.wait_for_everyone()
        if self.is_main:
            state = {"data_position": self.step, "engine": self.engine.name, "world_size": self.engine.world,
                     "metrics_pending": pending}
            path = save_checkpoint(self.ckpt_dir, self.step, {}, {}, state, self.cfg.checkpoint.keep, staged=True)
            self.logger.event(self.step, f"checkpoint written: {path}")
        self.accelerator.wait_for_everyone()

    def resume(self) -> None:
        """Continue from a checkpoint (checkpoint.resume: auto = the newest intact one, or a path; never) and cut
        metrics.jsonl back to the resumed step, so the log equals that of an uninterrupted run."""
        path = self.resume_from
        if path is None:
            self.logger.truncate(0)
            return
        saved = json.loads((path / "state.json").read_text()).get("engine", "ddp")  # older checkpoints: ddp
        current = self.engine.name if self.engine else "ddp"
        if saved != current:
            raise ValueError(f"{path} was written by distributed.engine={saved}, this run uses {current}: resume "
                             f"with the same engine, or consolidate it (python -m distill.engines consolidate) and "
                             f"start a new run from the exported weights")
        if self.engine:
            _, _, state = load_checkpoint(path, [])  # state.json + RNG; the shards below
            self.engine.load(path, self.networks, self.optimizers, self.extra_state)
        else:
            state = self.load_networks(path)
        self.step = int(state["step"])
        self.load_pending(state.get("metrics_pending", {}))
        self.logger.truncate(self.step)
        self.logger.event(self.step, f"resumed from {path}")

    def resume_path(self) -> Path | None:
        """The checkpoint to resume from, chosen on rank 0 (which reads and checks the files) and shared."""
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return None
        choice = [None]
        if self.is_main:
            choice = [str(p) if (p := self._pick_checkpoint(mode)) else None]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(choice)
        return None if choice[0] is None else Path(choice[0])

    def _pick_checkpoint(self, mode: str) -> Path | None:
        if mode != "auto":
            reason = verify_checkpoint(mode)
            if reason is not None:
                raise CheckpointError(f"checkpoint.resume={mode}: not an intact checkpoint: {reason}")
            return Path(mode)
        path, skipped = resume_candidate(self.ckpt_dir)
        for bad, why in skipped:
            then = f"falling back to {path.name}" if path else "no intact checkpoint is left"
            self.logger.event(checkpoint_step(bad), f"checkpoint {bad} is not usable ({why}); {then}")
        if path is None and skipped:
            raise CheckpointError(f"no intact checkpoint in {self.ckpt_dir}: "
                               + "; ".join(f"{p.name}: {why}" for p, why in skipped)
                               + ". Set checkpoint.resume=never to start the run again from step 0.")
        return path

    def load_networks(self, path: Path) -> dict[str, Any]:
        """Load networks, EMA and optimizers of a (non-sharded) checkpoint; returns its state.json."""
        names = list(self.networks) + list(self.extra_state)
        nets, optim, state = load_checkpoint(path, names)
        for k, net in self.networks.items():
            self.load_network_state(net, nets[k], f"{path}/{k}.safetensors")
        for k, obj in self.extra_state.items():
            obj.load_state_dict(nets[k])
        for k, opt in self.optimizers.items():
            opt.load_state_dict(optim[k])
        return state

    def train(self) -> Path | None:
        """Run until max_steps; checkpoint every N steps and at the end; export the final model."""
        cfg = self.cfg
        try:
            self.resume()
            if cfg.logging.sample_prompts and getattr(self, "task", "t2v") == "i2v":
                self.sample_conditioning_images()  # a bad sample image fails now, not at the first sample
            self.logger.start(self.step, cfg.max_steps)
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                self.step_flags = {}
                metrics = self.train_step(self.step)
                metrics.update(self.step_flags)
                self.step += 1
                metrics["step_time"] = time.perf_counter() - t0  # launch time on CUDA (no sync here)
                self.log_metrics(self.step, metrics)
                if self.step % cfg.checkpoint.every == 0 and self.step < cfg.max_steps:
                    self.save()
                if cfg.logging.sample_every and self.step % cfg.logging.sample_every == 0 and self.exports_here:
                    self.sample(self.step)
            last = latest_checkpoint(self.ckpt_dir)
            if last is None or checkpoint_step(last) != self.step:
                self.save()
            out = None
            if self.exports_here:
                self.sample(self.step)
                out = self.export()
            self.accelerator.wait_for_everyone()
            return out
        finally:
            self.logger.close()
            self.accelerator.end_training()


def _snapshot(params: list[nn.Parameter], opt: torch.optim.Optimizer) -> tuple[list[torch.Tensor], dict]:
    """Copies of the parameters and of their optimizer state tensors, taken before a step (update guard)."""
    weights = [p.detach().clone() for p in params]
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in opt.state[p].items()}
             for p in params if p in opt.state}
    return weights, state


@torch.no_grad()
def _restore(params: list[nn.Parameter], opt: torch.optim.Optimizer, backup: tuple[list[torch.Tensor], dict]) -> None:
    """Put back what `_snapshot` copied; state created by the undone step (a first step) is dropped."""
    weights, state = backup
    for p, w in zip(params, weights, strict=True):
        p.copy_(w)
        if id(p) in state:
            opt.state[p] = state[id(p)]
        else:
            opt.state.pop(p, None)
