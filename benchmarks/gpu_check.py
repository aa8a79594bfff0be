"""CUDA-path checks on one GPU (run when a GPU machine is available; CI never needs it).

    python -m benchmarks.gpu_check --out benchmarks/results/gpu_check      # ~3-5 min on one H100/H200

Writes <out>.json and <out>.md:
1. attention: SDPA backends on bf16 Wan2.1-1.3B-shaped q/k/v (flash vs memory-efficient time, error vs math);
2. real-size DiT: Wan2.1-T2V-1.3B (random weights) bf16 forward time and peak memory at 81x480x832;
3. planner at real size: measured peak of a flow-matching training step of the 1.3B DiT (fp32 master weights,
   bf16 autocast, AdamW, EMA; with and without per-block checkpointing) vs `distill.plan.estimate`;
4. the tiny pipelines (shipped checkpoints) in bf16 on the GPU: time per video and evaluator accuracy;
5. int8 / fp8 W8A8 kernels (inference/quantized.py) at Wan2.1-14B linear shapes: time and error vs bf16.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

GB = 2**30


def _time(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def check_attention() -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for tokens in (1024, 32760):
        q, k, v = (torch.randn(1, 12, tokens, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        row = {}
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float()) if tokens == 1024 else None
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            with sdpa_kernel([backend]):
                row[f"{name}_ms"] = 1e3 * _time(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
                if ref is not None:
                    got = F.scaled_dot_product_attention(q, k, v).float()
                    row[f"{name}_rel_err_vs_fp32"] = float((got - ref).norm() / ref.norm())
        out[f"tokens_{tokens}"] = row
    return out


def _wan(spec: str, dtype: torch.dtype):
    from models.registry import get_spec
    from models.wan_model import WanModel

    with torch.device("meta"):
        model = WanModel.from_config(get_spec(spec).dit)
    model = model.to_empty(device="cuda")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.to(dtype)


def check_dit_forward() -> dict:
    model = _wan("wan2.1-t2v-1.3b", torch.bfloat16).eval()
    x = torch.randn(1, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([500.0], device="cuda")
    ctx = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        sec = _time(lambda: model(x, t, ctx), repeats=3)
    return {"model": "wan2.1-t2v-1.3b bf16", "latent": [16, 21, 60, 104], "tokens": 32760,
            "forward_s": sec, "peak_gib": torch.cuda.max_memory_allocated() / GB}


def check_planner(frames: int, checkpointing: bool) -> dict:
    """One pretraining configuration of the 1.3B DiT: measured peak vs the planner."""
    from distill.config import load_train_config
    from distill.ema import EMA
    from distill.losses import Cond, flow_matching_loss
    from distill.plan import estimate

    cfg = load_train_config(None, ["task=pretrain", "model.spec=wan2.1-t2v-1.3b", "model.components_path=x",
                                   f"data.num_frames={frames}", "data.height=480", "data.width=832", "batch_size=1",
                                   "mixed_precision=bf16", f"model.gradient_checkpointing={checkpointing}"])
    plan = estimate(cfg)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = _wan("wan2.1-t2v-1.3b", torch.float32).train()
    model.gradient_checkpointing = checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ema = EMA(model, 0.99)
    f = 1 + (frames - 1) // 4
    x0 = torch.randn(1, 16, f, 60, 104, device="cuda")
    cond = Cond(torch.randn(1, 512, 4096, device="cuda"))
    for step in range(2):
        with torch.autocast("cuda", torch.bfloat16):
            loss = flow_matching_loss(model, x0, cond, 3.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model, step + 1)
    measured = (torch.cuda.max_memory_allocated() - base) / GB
    del model, opt, ema
    torch.cuda.empty_cache()
    return {"frames": frames, "tokens": plan.tokens, "checkpointing": checkpointing, "measured_gib": measured,
            "planner_gib": plan.peak, "planner_over_measured": plan.peak / measured, "planner_items": plan.memory}


def check_tiny_pipelines() -> dict:
    from benchmarks.quality import parse_spec, run_config
    from data.shapes import PROMPTS

    out = {}
    for cfg in ("configs/infer/tiny/t2v_distill_4step.json", "configs/infer/tiny/t2v_teacher.json"):
        row, _ = run_config(parse_spec(f"{cfg}:dtype=bf16,device=cuda"), list(PROMPTS[::4]), 1, 8)
        out[cfg] = {k: v for k, v in row.items() if isinstance(v, int | float | str)}
    return out


def check_quant() -> dict:
    """W8A8 kernels of inference/quantized.py at 14B linear shapes (M = 8192 tokens) vs bf16 and dequantize."""
    from inference.quantized import QuantLinear

    out = {}
    for scheme in ("fp8", "int8"):
        for n, k in ((5120, 5120), (13824, 5120), (5120, 13824)):
            lin = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
            q = QuantLinear.from_linear(lin, scheme)
            x = torch.randn(2, 4096, k, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                ref, fast = lin(x).float(), q(x).float()
                t_fast = _time(lambda q=q, x=x: q(x), 20)
                q.w8a8 = False
                t_deq = _time(lambda q=q, x=x: q(x), 20)
                q.w8a8 = True
                t_bf16 = _time(lambda lin=lin, x=x: lin(x), 20)
            out[f"{scheme}_{n}x{k}"] = {"fast_path_failed": bool(q._fast_failed),
                                         "rel_err_w8a8": float((fast - ref).norm() / ref.norm()),
                                         "ms_bf16": 1e3 * t_bf16, "ms_w8a8": 1e3 * t_fast, "ms_dequant": 1e3 * t_deq}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/gpu_check")
    p.add_argument("--skip", default="", help="comma-separated checks to skip")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu_check needs a CUDA device")
    checks = {
        "attention": check_attention,
        "dit_forward_1.3b": check_dit_forward,
        "planner_1.3b_21f_ckpt": lambda: check_planner(21, True),
        "planner_1.3b_13f": lambda: check_planner(13, False),
        "planner_1.3b_81f_ckpt": lambda: check_planner(81, True),
        "tiny_pipelines": check_tiny_pipelines,
        "quant_kernels": check_quant,
    }
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, fn in checks.items():
        if name in a.skip.split(","):
            continue
        t0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as e:  # one failing check must not hide the others' results
            result[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        print(f"{name} ({time.perf_counter() - t0:.0f}s): {json.dumps(result[name], default=str)[:600]}", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
