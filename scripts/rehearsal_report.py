"""Summarise a GPU rehearsal (scripts/gpu_rehearsal.sh) into JSON + Markdown under benchmarks/results/.

    python -m scripts.rehearsal_report --work WORK_DIR --out benchmarks/results/gpu_rehearsal_1.3b

Reads WORK_DIR/stages/<stage>.json (scripts/peak_memory.py) and the DMD run's metrics.jsonl; the time per DMD
iteration is the difference of consecutive rows' wall-clock `time` (logging.every=1 writes one row per
iteration after a device sync), reported without the iterations that also wrote samples or checkpoints.
"""

from __future__ import annotations

import argparse
import json
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
    return {"config": config, "stages": stages, "dmd_iteration_s": {str(k): v for k, v in times.items()},
            "dmd_iteration_median_s": statistics.median(plain), "dmd_iteration_max_s": max(plain)}


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
    ns.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    ns.out.with_suffix(".md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
