"""Measured peak memory of DMD training steps vs the planner's estimate (distill/plan.py), case by case.

    python -m benchmarks.memory [--steps 3] [--cases "tiny dmd full;tiny dmd LoRA r64"] [--out FILE_STEM]

Each case runs in a fresh process: build the DMD trainer (a random teacher, tiny or Wan2.1-1.3B-sized, with the
committed tiny components), run `--steps` iterations, report the peak. Tiny cases: batch 8, 17x64x64 (320
tokens); 1.3B cases (GPU): batch 1, 9,360 tokens, bf16, per-block checkpointing. CPU: peak resident set size
(ru_maxrss) minus the RSS just before the trainer is built (after imports), or with `--tensors` the peak of live
tensor bytes (tensors alive after the build, by storage, plus the running sum of the profiler's allocation events
over the steps: what the planner models, without the allocator's and Python's own memory); CUDA:
max_memory_allocated(). The planner is called with the same config (engine ddp, 1 process); within +-15% is
the target.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMON = ["logging.sample_prompts=[]", "logging.every=1", "checkpoint.every=1000", "dmd.dfake_gen_update_ratio=1"]
TINY = ["data.num_frames=17", "data.height=64", "data.width=64", "batch_size=8", "num_threads=2"]
# A Wan2.1-1.3B-sized random teacher (text_dim 64 to read the tiny text encoder) on the tiny codec (stride 4):
# 21 frames at 240x416 -> latent 6x60x104 = 9,360 tokens, as 21 frames of 480x832 through the Wan VAE.
BIG = ["data.num_frames=21", "data.height=240", "data.width=416", "batch_size=1", "mixed_precision=bf16",
       "dmd.real_score_dtype=bf16", "model.gradient_checkpointing=true", "num_threads=8"]
CASES = {  # name -> (teacher, overrides)
    "tiny dmd full": ("tiny", TINY),
    "tiny dmd full + ckpt": ("tiny", [*TINY, "model.gradient_checkpointing=true"]),
    "tiny dmd LoRA r64": ("tiny", [*TINY, "lora.enabled=true"]),
    "tiny dmd LoRA r64 + ckpt": ("tiny", [*TINY, "lora.enabled=true", "model.gradient_checkpointing=true"]),
    "1.3B dmd full + ckpt, bf16": ("1.3b", BIG),
    "1.3B dmd LoRA r64 + ckpt, bf16": ("1.3b", [*BIG, "lora.enabled=true"]),
}
TEACHERS = {"tiny": ("tiny-t2v", {}), "1.3b": ("wan2.1-t2v-1.3b", {"text_dim": 64})}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _live_cpu_tensor_bytes() -> int:
    """Bytes of the CPU storages that live tensors (parameters included) refer to, each storage counted once."""
    import torch

    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
            st = obj.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


def _profiled_peak_bytes(run) -> int:
    """Peak of (created - destroyed) CPU tensor bytes while `run()` executes, from the profiler's memory timeline
    (tensors that existed before are not counted: they are in `_live_cpu_tensor_bytes()`). The timeline is a
    private torch API (torch.profiler._memory_profiler), the one that `export_memory_timeline` is built on."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        run()
    live = peak = 0
    for _, action, (key, _), size in sorted(MemoryProfileTimeline(prof._memory_profile()).timeline,
                                            key=lambda e: e[0]):
        if key.device.type != "cpu":
            continue
        live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, live)
    return peak


def child(teacher: str, run_dir: str, steps: int, overrides: list[str], tensors: bool = False) -> dict:
    import torch

    import distill.dmd  # noqa: F401  (imported before the baseline: module memory is not training memory)
    import distill.engine_deepspeed  # noqa: F401
    import distill.engine_fsdp  # noqa: F401
    from distill.config import load_train_config
    from distill.plan import estimate
    from train import trainer_for

    cfg = load_train_config(REPO / "configs/train/tiny/t2v_dmd.yaml",
                            [f"model.path={teacher}", f"run_dir={run_dir}", f"max_steps={steps}", *COMMON, *overrides])
    plan = estimate(cfg)
    cuda = torch.cuda.is_available()
    base = _rss_bytes()
    trainer = trainer_for(cfg)

    def run() -> None:
        for step in range(steps):
            trainer.train_step(step)

    if tensors and not cuda:
        gc.collect()
        measured = _live_cpu_tensor_bytes() + _profiled_peak_bytes(run)
        trainer.logger.close()
        return {"measured_gib": measured / 2**30, "estimate_gib": plan.peak, "device": "cpu (tensors)",
                "items": plan.memory}
    run()
    if cuda:
        measured = torch.cuda.max_memory_allocated()
    else:
        measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    trainer.logger.close()
    return {"measured_gib": measured / 2**30, "estimate_gib": plan.peak, "device": "cuda" if cuda else "cpu",
            "items": plan.memory}


def plan_case(name: str) -> float:
    """The planner's peak (GiB) for a case, without running it (the teacher's config.json written to a temp dir)."""
    from distill.config import load_train_config
    from distill.plan import estimate
    from models.registry import get_spec

    kind, overrides = CASES[name]
    spec, changes = TEACHERS[kind]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps({**get_spec(spec).dit, **changes}))
        cfg = load_train_config(REPO / "configs/train/tiny/t2v_dmd.yaml", [f"model.path={tmp}", *COMMON, *overrides])
        return estimate(cfg).peak


def write_tables(rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    lines = ["| case | device | measured peak | planner | planner / measured |", "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['device']} | {r['measured_gib']:.3f} GiB | {r['estimate_gib']:.3f} GiB | "
              f"{r['ratio']:.2f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    p.add_argument("--cases", default=";".join(c for c in CASES if c.startswith("tiny")),
                   help=f"semicolon-separated case names, of: {'; '.join(CASES)}")
    p.add_argument("--replan", default=None,
                   help="a results .json of an earlier run: recompute the planner column (measurements kept), "
                        "write it back (and its .md)")
    p.add_argument("--tensors", action="store_true",
                   help="CPU: measure live tensor bytes (profiler memory events) instead of the resident set size")
    p.add_argument("--child", nargs=3, metavar=("TEACHER", "RUN_DIR", "OVERRIDES_JSON"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.steps, json.loads(a.child[2]), a.tensors)))
        return
    if a.replan:
        rows = json.loads(Path(a.replan).read_text())
        for r in rows:
            r["estimate_gib"] = plan_case(r["case"])
            r["ratio"] = r["estimate_gib"] / r["measured_gib"]
            r.pop("items", None)
            print(f"{r['case']:<32s} measured {r['measured_gib']:.3f} GiB ({r['device']}), planner "
                  f"{r['estimate_gib']:.3f} GiB, planner/measured {r['ratio']:.2f}")
        write_tables(rows, Path(a.replan))
        return
    from models.components import make_tiny_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        teachers: dict[str, Path] = {}
        for name in a.cases.split(";"):
            kind, overrides = CASES[name]
            if kind not in teachers:
                spec, changes = TEACHERS[kind]
                teachers[kind] = make_tiny_model(Path(tmp) / kind, spec, seed=0, **changes)
            cmd = [sys.executable, "-m", "benchmarks.memory", "--steps", str(a.steps), "--child", str(teachers[kind]),
                   str(Path(tmp) / f"run{len(rows)}"), json.dumps(overrides), *(["--tensors"] if a.tensors else [])]
            res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(f"case {name!r} failed:\n{res.stderr[-3000:]}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            r["case"], r["ratio"] = name, r["estimate_gib"] / r["measured_gib"]
            rows.append(r)
            print(f"{name:<32s} measured {r['measured_gib']:.3f} GiB ({r['device']}), estimate "
                  f"{r['estimate_gib']:.3f} GiB, estimate/measured {r['ratio']:.2f}", flush=True)
    if a.out:
        write_tables(rows, Path(a.out))


if __name__ == "__main__":
    main()
