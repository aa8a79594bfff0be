"""Big-model inference on one GPU: block offload and the student-vs-teacher end-to-end time (issue 16).

    python -m benchmarks.infer_gpu_check --out benchmarks/results/infer_gpu_check_h200    # CUDA, real 14B geometry
    python -m benchmarks.infer_gpu_check --geometry tiny --out runs/check                   # CPU: the same code, tiny

Random weights at the real geometry (Wan2.1-T2V-14B DiT, umT5-XXL, the Wan VAE; nothing is downloaded):
1. `dit`: seconds per denoising step (one batch-1 forward, 81 frames at 480x832 = 32,760 tokens) and peak memory,
   the DiT resident vs block-offloaded (weights pinned on the host, one block copied ahead on a side stream) under a
   24 GiB cap (`torch.cuda.set_per_process_memory_fraction`); the ratio offloaded / resident, and the planner's
   (inference/plan.py) peaks for both next to the measured ones.
2. `end_to_end`: the pipeline with text encoder and VAE decode (tiled), per stage, in the 24 GiB recipe (DiT
   block-offloaded, umT5 and VAE on the GPU for their stage only, the cap kept): the 4-step student (batch 1)
   and the 50-step CFG teacher (batch 2). The teacher's denoising is timed over `--teacher-steps` steps and
   scaled to 50 (every step costs the same); text encoding and VAE decode are measured once each.
Writes <out>.json. The tiny geometry (CPU, seconds) exercises every line except the CUDA memory calls.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

GB = 2**30
TEACHER_STEPS = 50
GEOMETRIES = {
    "real": dict(dit="wan2.1-t2v-14b", frames=81, height=480, width=832, vae={}, text=None, cap_gib=24.0),
    "tiny": dict(dit="tiny-t2v", frames=5, height=32, width=32, cap_gib=None,
                 dit_changes=dict(dim=64, ffn_dim=128, num_heads=2, num_layers=3),
                 vae=dict(dim=4, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
                 text=dict(vocab_size=259, dim=64, dim_attn=64, dim_ffn=128, num_heads=2, num_layers=1,
                           num_buckets=8)),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 2) -> float:
    """Mean seconds of `repeats` calls after one warm-up call."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeats


@torch.no_grad()
def random_init_(module: nn.Module, std: float = 0.02) -> nn.Module:
    """Fill a module materialised with `to_empty` with finite random values: speed only. 1-D norm weights and
    buffers named *std are 1, other buffers (the VAE's latent mean) 0."""
    for name, p in module.named_parameters():
        if "norm" in name and p.ndim == 1:
            p.fill_(1.0)
        elif p.is_floating_point():
            p.normal_(0.0, std)
    for name, b in module.named_buffers():
        if b.is_floating_point():
            b.fill_(1.0 if name.endswith("std") else 0.0)
    return module


def build(cls_or_fn: Callable[[], nn.Module], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Build on meta, cast there (no memory), materialise on `device` in `dtype`, fill with random values."""
    with torch.device("meta"):
        module = cls_or_fn().to(dtype)
    return random_init_(module.to_empty(device=device)).eval().requires_grad_(False)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---- part 1: the DiT, resident vs block offload --------------------------------------------------------------
def dit_inputs(dit, frames: int, height: int, width: int, device: torch.device) -> dict:
    f, h, w = 1 + (frames - 1) // 4, height // 8, width // 8
    return dict(x=torch.randn(1, dit.out_dim, f, h, w, device=device), t=torch.tensor([500.0], device=device),
                context=torch.randn(1, 64, dit.text_dim, device=device, dtype=dit.dtype))


def check_dit(geo: dict, device: torch.device, dtype: torch.dtype) -> tuple[dict, nn.Module]:
    from inference.offload import enable_offload, offloader
    from models.registry import get_spec
    from models.wan_model import WanModel

    config = {**get_spec(geo["dit"]).dit, **geo.get("dit_changes", {})}
    dit = build(lambda: WanModel.from_config(config), device, dtype)
    x = dit_inputs(dit, geo["frames"], geo["height"], geo["width"], device)
    step = lambda: dit(**x)  # noqa: E731  one distill step = one batch-1 forward
    reset_peak(device)
    ref = dit(**x).float()
    resident_s = timed(step, device)
    out = {"params": dit.num_params(), "tokens": x["x"][0, 0].numel() // 4, "resident_s_per_step": resident_s,
           "resident_peak_gib": peak_gib(device)}
    off = enable_offload(dit, device, "block")  # weights to pinned host memory, blocks streamed back
    reset_peak(device)
    if geo["cap_gib"] is not None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(geo["cap_gib"] * GB / total, torch.cuda.current_device()
                                                      if device.index is None else device.index)
        out["cap_gib"] = geo["cap_gib"]
    got = dit(**x).float()
    out["offloaded_s_per_step"] = timed(step, device)
    out["offloaded_peak_gib"] = peak_gib(device)
    out["ratio_offloaded_over_resident"] = out["offloaded_s_per_step"] / resident_s
    out["max_abs_diff_vs_resident"] = float((got - ref).abs().max())
    out["units_copied_ahead"] = off.stats.prefetches
    offloader(dit).release()
    out["planned"] = planned_peaks(geo)
    return out, dit


def planned_peaks(geo: dict) -> dict | None:
    """The planner's DiT-stage peak (GiB) for the checked geometry, resident and block-offloaded (real only)."""
    if geo["dit"] != "wan2.1-t2v-14b" or (geo["height"], geo["width"]) != (480, 832):
        return None
    from inference.plan import estimate

    return {off: estimate("14B", "480p", "bf16", off, 1).device["stage: denoising"] -
            (estimate("14B", "480p", "bf16", off, 1).device["encoders resident"]) for off in ("none", "block")}


# ---- part 2: end to end, student vs teacher ------------------------------------------------------------------
def make_pipeline(geo: dict, dit: nn.Module, device: torch.device, dtype: torch.dtype):
    from inference.config import InferConfig
    from inference.offload import ComponentOffload
    from inference.pipeline import WanPipeline
    from models.registry import get_spec
    from models.t5 import ByteTokenizer, TextEncoder, UMT5Encoder
    from models.vae import WanVAE

    spec = get_spec(geo["dit"])
    text_args = geo["text"] or {k: v for k, v in spec.text_encoder.items() if k != "type"}
    umt5 = build(lambda: UMT5Encoder(**text_args), device, dtype)
    vae = build(lambda: WanVAE(**geo["vae"]), device, torch.float32)
    vae.enable_tiling(*(29, 12) if geo["vae"] else (48, 16))
    cfg = InferConfig(task="t2v", target_video_length=geo["frames"], target_height=geo["height"],
                      target_width=geo["width"], sample_neg_prompt="blurry", seed=0, device=str(device))
    # the byte tokenizer: ids < 259 are valid for any vocabulary, and timing does not depend on the words
    text = TextEncoder(umt5, ByteTokenizer(), text_len=dit.text_len)
    # the 24 GiB recipe: umT5 (11 GiB in bf16) and the VAE visit the GPU for their stage only
    stages = ComponentOffload(device, {"text_encoder": umt5, "vae": vae})
    return WanPipeline(cfg, dit, vae, text, None, device, dtype, offload=stages)


def check_end_to_end(geo: dict, dit: nn.Module, device: torch.device, dtype: torch.dtype,
                     teacher_steps: int) -> dict:
    from inference.schedule import DEFAULT_SHIFT, DEFAULT_STEPS

    pipe = make_pipeline(geo, dit, device, dtype)
    student = dict(denoising_step_list=list(DEFAULT_STEPS), enable_cfg=False, sample_shift=DEFAULT_SHIFT)
    runs = {"student_4step": student,
            "teacher_cfg": dict(infer_steps=teacher_steps, enable_cfg=True, sample_guide_scale=6.0)}
    out = {}
    for name, overrides in runs.items():
        reset_peak(device)
        pipe.generate("a red circle moving left", **overrides)  # warm-up (kernels, RoPE tables, prompt cache)
        pipe.text_encoder._cache.clear()  # time the text encoder too
        t0 = time.perf_counter()
        pipe.generate("a red circle moving left", **overrides)
        _sync(device)
        stages = dict(pipe.timings.stages)
        row = {"stages_s": stages, "nfe": pipe.timings.nfe, "measured_total_s": time.perf_counter() - t0,
               "peak_gib": peak_gib(device)}
        if name == "teacher_cfg":  # scale the denoising stage to 50 steps
            row["stages_s"]["dit"] = stages["dit"] * TEACHER_STEPS / teacher_steps
            row["nfe"] = pipe.timings.nfe * TEACHER_STEPS // teacher_steps
            row["scaled_from_steps"] = teacher_steps
        row["total_s"] = sum(row["stages_s"].values())
        row["dominant_stage"] = max(row["stages_s"], key=row["stages_s"].get)
        out[name] = row
    out["speedup_teacher_over_student"] = out["teacher_cfg"]["total_s"] / out["student_4step"]["total_s"]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output path without extension (<out>.json is written)")
    ap.add_argument("--geometry", choices=list(GEOMETRIES), default="real")
    ap.add_argument("--teacher-steps", type=int, default=2, help="teacher steps timed (scaled to 50)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.teacher_steps < 1:
        raise ValueError(f"--teacher-steps must be >= 1, got {args.teacher_steps}")
    device = torch.device(args.device)
    if args.geometry == "real" and device.type != "cuda":
        raise ValueError("--geometry real needs a CUDA device (a 14B DiT step on a CPU takes hours); "
                         "use --geometry tiny")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    geo = GEOMETRIES[args.geometry]
    result = {"geometry": args.geometry, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or "cpu", "torch": torch.__version__, "frames": geo["frames"],
              "height": geo["height"], "width": geo["width"]}
    t0 = time.perf_counter()
    out = Path(args.out + ".json")  # not with_suffix: a name such as "check_1.3b" keeps its dot
    out.parent.mkdir(parents=True, exist_ok=True)
    result["dit"], dit = check_dit(geo, device, dtype)
    out.write_text(json.dumps(result, indent=2) + "\n")  # kept if the end-to-end part is cut off
    result["end_to_end"] = check_end_to_end(geo, dit, device, dtype, args.teacher_steps)
    result["wall_s"] = time.perf_counter() - t0
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
