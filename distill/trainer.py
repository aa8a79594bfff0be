"""The training loop shared by all tasks: accelerate, checkpoints, resume, logging, non-finite guard.

A task subclasses `Trainer` and provides `build()` (networks, optimizers, data), `train_step(step)` (returns
scalar metrics) and `export()` (the inference artefact). The loop, checkpointing and logging live here once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from distill.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from distill.config import TrainConfig, to_yaml
from distill.logger import MetricsLogger

MAX_NONFINITE = 5  # consecutive non-finite losses before the run stops (checkpoint left intact)


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    """Owns the accelerator, the run directory, the step counter and the checkpoint/resume logic."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.accelerator = Accelerator(gradient_accumulation_steps=1, mixed_precision=cfg.mixed_precision)
        set_seed(cfg.seed, device_specific=True)
        self.device = self.accelerator.device
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.step = 0
        self.nonfinite = 0
        self.networks: dict[str, nn.Module] = {}  # trainable networks saved in checkpoints
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.extra_state: dict[str, Any] = {}  # e.g. EMA, by name -> object with state_dict/load_state_dict
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        self.logger = MetricsLogger(self.run_dir, cfg, enabled=self.is_main)
        self.build()

    # ---- to be provided by tasks ----------------------------------------------------------------------------
    def build(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define build()")

    def train_step(self, step: int) -> dict[str, float]:
        raise NotImplementedError(f"{type(self).__name__} must define train_step()")

    def export(self) -> Path | None:
        """Write the inference artefact of the run (rank 0). Default: nothing."""
        return None

    def sample(self, step: int) -> None:
        """Write sample videos (rank 0). Default: nothing."""

    # ---- machinery ------------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def unwrap(self, net: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(net)

    def lr_at(self, step: int, base_lr: float) -> float:
        """Linear warm-up then constant (no decay: DMD and our pretraining use a constant rate)."""
        warm = self.cfg.optim.warmup_steps
        return base_lr * min(1.0, (step + 1) / warm) if warm > 0 else base_lr

    def clip_and_step(self, name: str, loss_scale: float = 1.0) -> float:
        """Clip the gradient norm of network `name`, step its optimizer, zero grads; returns the norm."""
        net, opt = self.networks[name], self.optimizers[name]
        norm = self.accelerator.clip_grad_norm_(net.parameters(), self.cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(norm)

    def check_finite(self, loss: torch.Tensor, what: str) -> bool:
        """False (skip the update) on a non-finite loss; raise after MAX_NONFINITE in a row."""
        if torch.isfinite(loss).all():
            self.nonfinite = 0
            return True
        self.nonfinite += 1
        self.logger.event(self.step, f"non-finite {what} loss ({loss.item()}); step skipped "
                          f"({self.nonfinite}/{MAX_NONFINITE} in a row)")
        if self.nonfinite >= MAX_NONFINITE:
            raise NonFiniteLossError(
                f"{MAX_NONFINITE} non-finite {what} losses in a row at step {self.step}: stopping. The latest "
                f"checkpoint in {self.ckpt_dir} is intact; lower the learning rate or check the data.")
        return False

    def state_for_checkpoint(self) -> tuple[dict, dict, dict]:
        nets = {k: self.unwrap(v).state_dict() for k, v in self.networks.items()}
        nets.update({k: v.state_dict() for k, v in self.extra_state.items()})
        optim = {k: v.state_dict() for k, v in self.optimizers.items()}
        return nets, optim, {"data_position": self.step}

    def save(self) -> None:
        self.accelerator.wait_for_everyone()
        if self.is_main:
            nets, optim, state = self.state_for_checkpoint()
            path = save_checkpoint(self.ckpt_dir, self.step, nets, optim, state, self.cfg.checkpoint.keep)
            self.logger.event(self.step, f"checkpoint written: {path}")
        self.accelerator.wait_for_everyone()

    def resume(self) -> None:
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return
        path = latest_checkpoint(self.ckpt_dir) if mode == "auto" else Path(mode)
        if path is None:
            return
        names = list(self.networks) + list(self.extra_state)
        nets, optim, state = load_checkpoint(path, names)
        for k, net in self.networks.items():
            self.unwrap(net).load_state_dict(nets[k])
        for k, obj in self.extra_state.items():
            obj.load_state_dict(nets[k])
        for k, opt in self.optimizers.items():
            opt.load_state_dict(optim[k])
        self.step = int(state["step"])
        self.logger.event(self.step, f"resumed from {path}")

    def train(self) -> Path | None:
        """Run until max_steps; checkpoint every N steps and at the end; export the final model."""
        self.resume()
        cfg = self.cfg
        self.logger.start(self.step, cfg.max_steps)
        try:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                metrics = self.train_step(self.step)
                self.step += 1
                metrics["step_time"] = time.perf_counter() - t0
                self.logger.log(self.step, metrics)
                if self.step % cfg.checkpoint.every == 0 and self.step < cfg.max_steps:
                    self.save()
                if cfg.logging.sample_every and self.step % cfg.logging.sample_every == 0 and self.is_main:
                    self.sample(self.step)
            if latest_checkpoint(self.ckpt_dir) is None or \
                    int(json.loads((latest_checkpoint(self.ckpt_dir) / "state.json").read_text())["step"]) \
                    != self.step:
                self.save()
            out = None
            if self.is_main:
                self.sample(self.step)
                out = self.export()
            self.accelerator.wait_for_everyone()
            return out
        finally:
            self.logger.close()
            self.accelerator.end_training()

