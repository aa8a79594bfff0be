"""The few-step student's sampling schedule: the one owner of its step list, shift and update rule.

A distilled student is trained on, and must be sampled at, exactly the same timesteps
(docs/step_distillation.md "Student schedule"):

    sigma_j = shift(d_j / 1000)  for d_j in denoising_step_list, then a final 0      (inference/flow.py shift)
    t_j     = 1000 sigma_j                                                           (fed to the DiT as floats)

e.g. [1000, 750, 500, 250] at shift 5 -> sigmas [1, 0.9375, 0.8333, 0.625, 0], timesteps [1000, 937.5, 833.3, 625].

`StudentSchedule` is used by the training config (`distill.denoising_step_list`, `distill.sample_shift`), the
inference config (LightX2V's `denoising_step_list`, `sample_shift`, plus `distill_update`), the distill
scheduler, ODE initialisation and the exports, which write it next to the weights as `schedule.json` so that
an exported folder loads with no hand-written config (`read_schedule`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from inference.flow import shift_sigma

NUM_TRAIN_TIMESTEPS = 1000
UPDATES = ("euler", "lcm")  # deterministic x0 + s_next v | fresh noise (1 - s_next) x0 + s_next eps, as in training
SCHEDULE_FILE = "schedule.json"
DEFAULT_STEPS = (1000, 750, 500, 250)
DEFAULT_SHIFT = 5.0
DEFAULT_UPDATE = "lcm"  # measured: docs/results.md "Euler vs fresh noise"


def _check_steps(steps: Sequence[Any]) -> tuple[int, ...]:
    if isinstance(steps, str | bytes) or not isinstance(steps, Sequence) or not steps:
        shown = list(steps) if isinstance(steps, tuple) else steps
        raise ValueError(f"denoising_step_list must be a non-empty list of integers, got {shown!r}")
    if any(isinstance(d, bool) or not isinstance(d, int | float) or d != int(d) for d in steps):
        raise ValueError(f"denoising_step_list must hold integers (timesteps 1-1000), got {list(steps)}")
    out = tuple(int(d) for d in steps)
    if any(not 0 < d <= NUM_TRAIN_TIMESTEPS for d in out):
        raise ValueError(f"denoising_step_list values must lie in (0, {NUM_TRAIN_TIMESTEPS}], got {list(out)}")
    if any(a <= b for a, b in zip(out[:-1], out[1:], strict=True)):
        raise ValueError(f"denoising_step_list must be strictly decreasing, got {list(out)}")
    return out


@dataclass(frozen=True)
class StudentSchedule:
    """Steps, shift and update rule of a few-step student; validated on construction.

    `update` is how inference moves between steps; `trained_with` records the rollout the student was trained
    with (DMD's backward simulation re-noises with fresh noise: "lcm"), so a table can compare the two.
    """

    denoising_step_list: tuple[int, ...] = DEFAULT_STEPS
    shift: float = DEFAULT_SHIFT
    update: str = DEFAULT_UPDATE
    trained_with: str = "lcm"

    def __post_init__(self) -> None:
        object.__setattr__(self, "denoising_step_list", _check_steps(self.denoising_step_list))
        shift = self.shift
        if isinstance(shift, bool) or not isinstance(shift, int | float) or not 0 < shift < math.inf:
            raise ValueError(f"the schedule's shift (sample_shift) must be a finite number > 0, got {shift!r}")
        object.__setattr__(self, "shift", float(shift))
        for name in ("update", "trained_with"):
            if getattr(self, name) not in UPDATES:
                raise ValueError(f"the schedule's {name} must be one of {UPDATES}, got {getattr(self, name)!r}")

    @property
    def num_steps(self) -> int:
        return len(self.denoising_step_list)

    def sigmas(self) -> Tensor:
        """[n + 1] float32: shift(d_j / 1000) for each step, then 0 (computed in float64 on the host)."""
        s = shift_sigma(np.asarray(self.denoising_step_list, dtype=np.float64) / NUM_TRAIN_TIMESTEPS, self.shift)
        return torch.from_numpy(np.append(s, 0.0).astype(np.float32))

    def timesteps(self) -> Tensor:
        """[n] float32: 1000 sigma_j, fed to the DiT as they are (not rounded)."""
        s = shift_sigma(np.asarray(self.denoising_step_list, dtype=np.float64) / NUM_TRAIN_TIMESTEPS, self.shift)
        return torch.from_numpy((s * NUM_TRAIN_TIMESTEPS).astype(np.float32))

    def replace(self, **changes: Any) -> StudentSchedule:
        return StudentSchedule(**{**asdict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["denoising_step_list"] = list(self.denoising_step_list)
        return d

    def describe(self) -> str:
        return f"denoising_step_list {list(self.denoising_step_list)}, shift {self.shift:g}"

    def same_timesteps(self, other: StudentSchedule) -> bool:
        """True when both sample at the same timesteps (the update rule may differ)."""
        return self.denoising_step_list == other.denoising_step_list and self.shift == other.shift


def write_schedule(folder: str | Path, schedule: StudentSchedule) -> Path:
    """Write `schedule.json` into an exported model folder."""
    path = Path(folder) / SCHEDULE_FILE
    path.write_text(json.dumps(schedule.to_dict(), indent=2) + "\n")
    return path


def read_schedule(folder: str | Path) -> StudentSchedule | None:
    """The schedule an exported student folder was trained with, or None when the folder has none."""
    path = Path(folder) / SCHEDULE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return StudentSchedule(**data)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a valid student schedule ({e})") from e
