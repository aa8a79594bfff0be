"""How long each stage of the tiny recipe takes on this machine, from a short run of each stage.

    python -m benchmarks.recipe_time [--steps 30] [--out benchmarks/results/recipe_time_cpu]

Each training stage of `scripts/tiny_recipe.sh` runs `--steps` iterations of its own config in a scratch run
directory (the first 5 are not timed: warm-up); the mean step time times the config's `max_steps` is the stage's
projected time. The ODE stage adds its trajectory generation: one shard is generated and timed (the ODE run's time
before its first step minus the DMD run's, which loads the same models), times the number of shards.
Prints a Markdown table and writes it as `<out>.md`/`.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distill.config import load_train_config

REPO = Path(__file__).resolve().parents[1]
QUIET = ["logging.every=1", "logging.sample_every=0", "logging.sample_prompts=[]", "checkpoint.every=100000",
         "checkpoint.resume=never"]
# stage -> (config, extra overrides that do not change the step's cost)
STAGES = {
    "t2v_teacher": ("configs/train/tiny/t2v_teacher.yaml", []),
    "i2v_teacher": ("configs/train/tiny/i2v_teacher.yaml", ["model.path=checkpoints/tiny-t2v-teacher"]),
    "t2v_dmd": ("configs/train/tiny/t2v_dmd.yaml", []),
    "t2v_ode": ("configs/train/tiny/t2v_ode.yaml", []),  # after t2v_dmd: its start-up time is the baseline
    "t2v_lora_mode": ("configs/train/tiny/t2v_dmd_lora.yaml", []),
    "i2v_dmd": ("configs/train/tiny/i2v_dmd.yaml", []),
}
WARMUP = 5


def run_stage(config: str, overrides: list[str], run_dir: Path, steps: int) -> tuple[float, float]:
    """(mean step seconds after warm-up, seconds before the first step) of a short run."""
    t0 = time.time()
    cmd = [sys.executable, "train.py", "--config", config, f"run_dir={run_dir}", f"max_steps={steps}",
           f"output_model={run_dir / 'model'}", *QUIET, *overrides]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{config} failed:\n{res.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time"] for r in rows if r["step"] > WARMUP]
    first = rows[0]["time"] - rows[0]["step_time"] - t0
    return sum(times) / len(times), first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--out", default=None)
    a = p.parse_args()
    rows, startup = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.stages.split(","):
            config, extra = STAGES[name]
            cfg = load_train_config(REPO / config, [])
            overrides = list(extra)
            gen_min = 0.0
            if name == "t2v_ode":  # time one shard of trajectories, then regress on it
                shards = math.ceil(cfg.ode.num_trajectories / cfg.ode.shard_size)
                overrides += [f"ode.trajectories={tmp}/traj", f"ode.num_trajectories={cfg.ode.shard_size}"]
            step_s, before = run_stage(config, overrides, Path(tmp) / name, a.steps)
            if name == "t2v_dmd":
                startup = before
            if name == "t2v_ode":
                gen_min = max(before - startup, 0.0) * shards / 60
            minutes = step_s * cfg.max_steps / 60 + gen_min
            rows.append({"stage": name, "config": config, "s_per_step": step_s, "max_steps": cfg.max_steps,
                         "generation_min": gen_min, "minutes": minutes})
            print(f"{name:<14s} {step_s:.3f} s/step x {cfg.max_steps} steps"
                  + (f" + trajectories {gen_min:.1f} min" if gen_min else "") + f" = {minutes:.1f} min", flush=True)
    lines = ["| stage | config | s/step | steps | + trajectories | projected |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | `{r['config']}` | {r['s_per_step']:.3f} | {r['max_steps']} | "
              f"{r['generation_min']:.1f} min | {r['minutes']:.1f} min |" for r in rows]
    print("\n".join(lines))
    if a.out:
        out = Path(a.out)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
