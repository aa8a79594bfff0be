"""Shared helpers of the training tests: tiny run configs (5 frames at 32x32, batch 2, one thread), metrics
and checkpoint comparisons."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from distill.config import (
    load_train_config,  # noqa: F811
    )
from train import trainer_for

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = REPO / "checkpoints" / "tiny-components"
SMALL = ["data.num_frames=5", "data.height=32", "data.width=32", "num_threads=1", "logging.every=1",
         "logging.sample_prompts=[]", "checkpoint.every=100", "batch_size=2"]
VOLATILE = {"time", "step_time"}  # metrics that legitimately differ between two identical runs



# ---- helpers ------------------------------------------------------------------------------------------------
def pretrain_cfg(run: Path, *overrides: str):
    return load_train_config(None, ["task=pretrain", f"run_dir={run}", f"output_model={run}/model",
                                    f"model.components_path={COMPONENTS}", "optim.warmup_steps=2", *SMALL,
                                    *overrides])


def dmd_cfg(run: Path, teacher: Path, *overrides: str):
    return load_train_config(REPO / "configs/train/tiny/t2v_dmd.yaml",
                             [f"run_dir={run}", f"output_model={run}/model", f"model.path={teacher}", *SMALL,
                              "dmd.dfake_gen_update_ratio=2", "dmd.ema_start=1", *overrides])


def ode_cfg(run: Path, teacher: Path, trajectories: Path, *overrides: str):
    return load_train_config(REPO / "configs/train/tiny/t2v_ode.yaml",
                             [f"run_dir={run}", f"output_model={run}/model", f"model.path={teacher}", *SMALL,
                              f"ode.trajectories={trajectories}", "ode.num_trajectories=4", "ode.shard_size=2",
                              "ode.teacher_steps=8", "optim.warmup_steps=2", *overrides])


def train(cfg):
    return trainer_for(cfg).train()


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def by_step(rows: list[dict]) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in rows}


def file_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def assert_same_metrics(a: dict, b: dict, rtol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert math.isclose(a[k], b[k], rel_tol=rtol, abs_tol=1e-12), (k, a[k], b[k])


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Every network of two checkpoints (weights, EMA) equal; optimizer states equal."""
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names and names == sorted(p.name for p in b.glob("*.safetensors"))
    for name in names:
        sa, sb = load_file(str(a / name)), load_file(str(b / name))
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=1e-7, msg=f"{name}:{k}")
    oa = torch.load(a / "optim.pt", weights_only=True)
    ob = torch.load(b / "optim.pt", weights_only=True)
    for net in oa:
        for pid, st in oa[net]["state"].items():
            for k, v in st.items():
                torch.testing.assert_close(v, ob[net]["state"][pid][k], rtol=1e-6, atol=1e-7)


