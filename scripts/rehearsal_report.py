"""Summarise a GPU rehearsal (scripts/gpu_rehearsal.sh) into JSON + Markdown under benchmarks/results/.

    python -m scripts.rehearsal_report --work WORK_DIR --out benchmarks/results/gpu_rehearsal_1.3b

Reads WORK_DIR/stages/<stage>.json (scripts/peak_memory.py) and the DMD run's metrics.jsonl and events.log:
- the time per DMD iteration is the difference of consecutive rows' wall-clock `time` (logging.every=1 writes one
  row per iteration after a device sync), reported without the iterations that also wrote samples or checkpoints;
- generator and critic-only iterations apart: the median of the rows' `step_time` (the step alone, no sampling),
  rows with a `generator_loss` being generator iterations, the first (warm-up) left out;
- on CUDA, the peak memory of the training iterations (rows' `cuda_peak_gib`) and of sampling (events.log).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any

STAGES = ("make_model", "ode", "dmd", "infer_export")


def iteration_times(metrics: Path) -> dict[int, float]:
    """step -> seconds since the previous row, from a metrics.jsonl written with logging.every=1."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "step" in r and "time" in r]
    if len(rows) < 2:
        raise ValueError(f"{metrics}: need at least two rows with step and time, got {len(rows)}")
    return {b["step"]: b["time"] - a["time"] for a, b in zip(rows[:-1], rows[1:], strict=True)}


def phase_times(metrics: Path) -> dict[str, float]:
    """Median `step_time` of generator iterations and of critic-only iterations (warm-up step 1 left out)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "step_time" in r and r.get("step") != 1]
    out = {}
    for name, keep in (("generator", True), ("critic_only", False)):
        times = [r["step_time"] for r in rows if ("generator_loss" in r) == keep]
        if times:
            out[f"{name}_iteration_s"] = statistics.median(times)
    return out


SAMPLING_PEAK = re.compile(r"sampling peak CUDA memory allocated: ([0-9.]+) GiB")


def peaks(run: Path) -> dict[str, float]:
    """Peak CUDA memory (GiB) of the training rows and of sampling; {} when the run was not on CUDA."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out = {}
    training = [r["cuda_peak_gib"] for r in rows if "cuda_peak_gib" in r]
    if training:
        out["training_peak_gib"] = max(training)
    events = run / "events.log"
    sampling = [float(m) for m in SAMPLING_PEAK.findall(events.read_text())] if events.is_file() else []
    if sampling:
        out["sampling_peak_gib"] = max(sampling)
    return out


def summarize(work: Path, skip_steps: set[int] = frozenset()) -> dict[str, Any]:
    """Stage records + DMD iteration times (median/max over the steps not in `skip_steps`)."""
    stages = {}
    for name in STAGES:
        path = work / "stages" / f"{name}.json"
        if path.is_file():
            stages[name] = json.loads(path.read_text())
    times = iteration_times(work / "runs" / "dmd" / "metrics.jsonl")
    plain = [t for s, t in times.items() if s not in skip_steps] or list(times.values())
    config = json.loads((work / "rehearsal.json").read_text()) if (work / "rehearsal.json").is_file() else {}
    recorded = config.pop("work", None)  # the machine's work folder: written as WORK, so no machine path is kept
    if recorded:
        stages = json.loads(json.dumps(stages).replace(recorded, "WORK"))
        config = json.loads(json.dumps(config).replace(recorded, "WORK"))
    run = work / "runs" / "dmd"
    return {"config": config, "stages": stages, "dmd_iteration_s": {str(k): v for k, v in times.items()},
            "dmd_iteration_median_s": statistics.median(plain), "dmd_iteration_max_s": max(plain),
            **phase_times(run / "metrics.jsonl"), **peaks(run)}


def markdown(summary: dict[str, Any]) -> str:
    """A small table: stage, wall time, exit code, peak GPU and host memory."""
    lines = [f"GPU rehearsal ({json.dumps(summary['config'])})", "",
             "| stage | wall s | exit | peak GPU allocated GiB | peak GPU reserved GiB | peak host RSS GiB |",
             "|---|---|---|---|---|---|"]
    for name, s in summary["stages"].items():
        gpu = [f"{s[k]:.1f}" if k in s else "-" for k in ("peak_cuda_allocated_gib", "peak_cuda_reserved_gib")]
        lines.append(f"| {name} | {s['wall_s']:.1f} | {s['exit_code']} | {gpu[0]} | {gpu[1]} | "
                     f"{s['peak_host_rss_gib']:.1f} |")
    lines += ["", f"DMD iteration: median {summary['dmd_iteration_median_s']:.2f} s, "
                  f"max {summary['dmd_iteration_max_s']:.2f} s (iterations without sampling or checkpointing)"]
    phases = [f"{name.replace('_', ' ')} {summary[key]:.2f} s" for name, key in
              (("generator iteration", "generator_iteration_s"), ("critic-only iteration", "critic_only_iteration_s"))
              if key in summary]
    if phases:
        lines.append(f"Median step time: {', '.join(phases)}")
    mem = [f"{name} {summary[key]:.1f} GiB" for name, key in
           (("training iterations", "training_peak_gib"), ("sampling", "sampling_peak_gib")) if key in summary]
    if mem:
        lines.append(f"Peak CUDA memory allocated: {', '.join(mem)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="output path without extension (.json, .md)")
    parser.add_argument("--skip-steps", type=int, nargs="*", default=[],
                        help="DMD steps that also sampled or checkpointed (left out of the median)")
    ns = parser.parse_args(argv)
    summary = summarize(ns.work, set(ns.skip_steps))
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    for ext, text in ((".json", json.dumps(summary, indent=2) + "\n"), (".md", markdown(summary))):
        ns.out.with_name(ns.out.name + ext).write_text(text)  # not with_suffix: "gpu_rehearsal_1.3b" has a dot
    print(markdown(summary))


if __name__ == "__main__":
    main()
