"""The memory planner (distill/plan.py) against measurements, and its activation tracing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import distill.plan as plan
from distill.config import load_train_config
from distill.plan import ENGINES, activation_memory, estimate, implemented, min_gpus, narrowed

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 0.15  # the bar: planner within 15% of the measured peak


# CUDA adds memory the planner does not model as tensors of the run (cuBLAS workspaces, allocator rounding): a
# constant of a few tens of MiB that only the tiny cases notice
CUDA_CONSTANT_GIB = 64 / 1024


@pytest.mark.parametrize("results", ["memory_plan_cpu_tensors.json", "memory_plan_h200.json"])
def test_planner_matches_the_measured_peaks(results):
    """Peaks measured by `python -m benchmarks.memory` (tiny DMD, full and LoRA, with and without checkpointing:
    live tensor bytes on this CPU with `--tensors`; on an H200 also Wan2.1-1.3B-sized, max_memory_allocated),
    re-planned with the current code: within 15% (on CUDA: or within its constant)."""
    from benchmarks.memory import plan_case

    rows = json.loads((REPO / "benchmarks/results" / results).read_text())
    assert len(rows) >= 4
    for r in rows:
        planned = plan_case(r["case"])
        slack = CUDA_CONSTANT_GIB if r["device"] == "cuda" else 0.0
        ok = abs(planned / r["measured_gib"] - 1) <= TOLERANCE or abs(planned - r["measured_gib"]) <= slack
        assert ok, (r["case"], planned, r["measured_gib"])


def test_narrowed_tracing_equals_full_width(monkeypatch):
    config = dict(model_type="t2v", patch_size=[1, 2, 2], text_len=32, in_dim=16, dim=1024, ffn_dim=4096,
                  freq_dim=256, text_dim=64, out_dim=16, num_heads=8, num_layers=3, eps=1e-6)
    small, k = narrowed(config, max_dim=256)
    assert k == 4 and small["dim"] == 256 and small["num_heads"] == 2
    monkeypatch.setattr(plan, "narrowed", lambda c, max_dim=768: narrowed(c, 256))  # trace 4x narrower
    fast = {ckpt: activation_memory(config, 640, 2, ckpt, autocast=True) for ckpt in (False, True)}
    monkeypatch.setattr(plan, "narrowed", lambda c, max_dim=768: (c, 1))  # trace at the full width
    for ckpt, value in fast.items():
        exact = activation_memory(config, 640, 2, ckpt, autocast=True)
        assert abs(value / exact - 1) < 0.05, (ckpt, value, exact)


def test_planner_items_and_engines():
    cfg = load_train_config(REPO / "configs/wan_distill/t2v_14b_dmd.yaml")
    ddp, fsdp8 = estimate(cfg, "ddp", 1), estimate(cfg, "fsdp", 8)
    gib = 1024**3
    assert ddp.memory["trainable parameters (fp32)"] == pytest.approx(2 * 4 * ddp.params / gib)
    assert ddp.memory["frozen parameters (teacher / shared base)"] == pytest.approx(2 * ddp.params / gib)  # bf16
    assert fsdp8.memory["AdamW states (2 x fp32)"] == pytest.approx(ddp.memory["AdamW states (2 x fp32)"] / 8)
    assert fsdp8.memory["activations"] == pytest.approx(ddp.memory["activations"])  # not sharded
    ckpt_off = load_train_config(REPO / "configs/wan_distill/t2v_14b_dmd.yaml", ["model.gradient_checkpointing=false"])
    assert estimate(ckpt_off).memory["activations"] > 3 * ddp.memory["activations"]
    lora = load_train_config(REPO / "configs/wan_distill/t2v_14b_dmd.yaml", ["lora.enabled=true"])
    plan = estimate(lora)
    assert 250e6 < plan.trainable < 350e6  # rank-64 adapters on the attention and FFN linears of 40 blocks
    assert plan.memory["trainable parameters (fp32)"] < 0.05 * ddp.memory["trainable parameters (fp32)"]
    off = estimate(cfg, "fsdp", 1, offload=True)
    assert off.memory["AdamW states (2 x fp32)"] == 0 and off.cpu_memory["AdamW states (2 x fp32)"] > 100
    p, _ = min_gpus(cfg, "fsdp", 80.0)
    assert p is not None and p > 8  # full-parameter 14B DMD at 81x480x832 needs more than one node here
    assert implemented("fsdp", False, True) and not implemented("fsdp", True, False) and implemented("ddp", True, False)
    with pytest.raises(ValueError, match="engine must be one of"):
        estimate(cfg, "fsdp1")
    assert set(ENGINES) == {"ddp", "zero2", "fsdp", "zero3", "hybrid"}


def test_tensor_level_cpu_measurement_sees_a_transient_peak():
    """benchmarks/memory.py --tensors: live storages are counted once (views share them), and a transient
    allocation inside the profiled region shows in the peak even though it is freed before the end."""
    import torch

    from benchmarks.memory import _live_cpu_tensor_bytes, _profiled_peak_bytes

    before = _live_cpu_tensor_bytes()
    keep = torch.ones(1 << 20)  # 4 MiB
    view = keep[::2]  # noqa: F841  (shares keep's storage)
    assert _live_cpu_tensor_bytes() - before == 4 << 20

    def run() -> None:
        a = torch.ones(1 << 21)  # 8 MiB, freed before b exists
        del a
        b = torch.ones(1 << 20)  # 4 MiB
        del b

    peak = _profiled_peak_bytes(run)
    assert 8 << 20 <= peak < 12 << 20
