"""Run a Python script as `__main__` and write its wall time and peak memory to a JSON file.

    python -m scripts.peak_memory --out stage.json -- train.py --config ... key=value ...

Recorded: wall seconds, the exit status, the peak resident host memory of this process (GiB) and, when CUDA was
used, the peak allocated and reserved GPU memory (GiB) and the device name. Used by scripts/gpu_rehearsal.sh.
"""

from __future__ import annotations

import argparse
import json
import resource
import runpy
import sys
import time
from pathlib import Path
from typing import Any

GIB = 2**30


def peak_memory() -> dict[str, Any]:
    """Peak host RSS of this process and, if CUDA was initialised, its peak GPU memory (GiB)."""
    out: dict[str, Any] = {"peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out.update(device=torch.cuda.get_device_name(), peak_cuda_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                   peak_cuda_reserved_gib=torch.cuda.max_memory_reserved() / GIB)
    return out


def run(script: str, args: list[str], out: Path) -> int:
    """Run `script args` in this process; write {script, args, exit_code, wall_s, peak memory} to `out`."""
    if not Path(script).is_file():
        raise FileNotFoundError(f"script not found: {script}")
    sys.argv = [script, *args]
    t0, code = time.perf_counter(), 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:  # argparse errors and explicit exits keep their status
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        code = 1
        raise
    finally:
        record = {"script": script, "args": args, "exit_code": code, "wall_s": time.perf_counter() - t0,
                  **peak_memory()}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument("script", help="the Python script to run (e.g. train.py)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments (after --)")
    ns = parser.parse_args(argv)
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    return run(ns.script, args, ns.out)


if __name__ == "__main__":
    sys.exit(main())
