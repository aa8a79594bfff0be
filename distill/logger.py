"""Run logging for people with and without wandb: metrics.jsonl, events.log, a progress bar, and wandb.

wandb runs `disabled` by default; `offline` writes a local run directory; `online` is used only when a
WANDB_API_KEY is present (otherwise it falls back to offline), so a run never waits on the network.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg, enabled: bool = True) -> None:
        self.enabled, self.cfg, self.run_dir = enabled, cfg, Path(run_dir)
        self.bar: tqdm | None = None
        self.wandb = None
        if not enabled:
            return
        self.metrics = open(self.run_dir / "metrics.jsonl", "a")
        self.events = open(self.run_dir / "events.log", "a")
        mode = cfg.logging.wandb_mode
        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            mode = "offline"
        if mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity,
                                    name=cfg.logging.run_name, dir=str(self.run_dir), mode=mode,
                                    config=json.loads(json.dumps(_asdict(cfg), default=str)))

    def start(self, step: int, total: int) -> None:
        if self.enabled:
            self.bar = tqdm(total=total, initial=step, desc=self.cfg.task, dynamic_ncols=True, mininterval=5)

    def tick(self) -> None:
        """One training step done (the progress bar)."""
        if self.enabled and self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Write one row: `metrics` are already the means since the previous row (Trainer.log_metrics)."""
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if "loss" in k})
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def truncate(self, step: int) -> None:
        """Keep only the metrics.jsonl rows up to `step` (a resumed run rewrites the later ones; a row cut short
        by a kill is dropped too). The file is replaced atomically."""
        if not self.enabled:
            return
        self.metrics.close()
        path = self.run_dir / "metrics.jsonl"
        kept = [line for line in path.read_text().splitlines() if _row_step(line) <= step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
        self.metrics = open(path, "a")

    def video(self, step: int, key: str, path: Path) -> None:
        """Record a sample video written to `path` (logged to wandb by path)."""
        if not self.enabled:
            return
        self.event(step, f"sample {key}: {path}")
        if self.wandb is not None and path.suffix in (".mp4", ".gif"):  # raw .npy frames stay on disk only
            import wandb

            self.wandb.log({key: wandb.Video(str(path), format=path.suffix[1:])}, step=step)

    def event(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        line = f"[step {step}] {text}"
        self.events.write(line + "\n")
        self.events.flush()
        (self.bar.write if self.bar is not None else print)(line)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()
        self.events.close()
        if self.wandb is not None:
            self.wandb.finish()


def _row_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a line that is not a complete row (dropped on truncation)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _asdict(cfg) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))
