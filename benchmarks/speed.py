"""Wall-clock speed of teacher vs few-step configs, measured side by side in one process.

    python -m benchmarks.speed --config configs/infer/tiny/t2v_teacher.json \
        --config configs/infer/tiny/t2v_distill_4step.json [--repeats 5] [--batch 1] \
        [--out benchmarks/results/speed_t2v]

Each config is loaded once, warmed up once, then timed over `--repeats` generations of the same prompt and seed
(end to end: text encoding, sampling, decoding). Ratios are relative to the first config.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks.quality import parse_spec
from data.shapes import ShapesWorld, first_frame


def time_config(text: str, repeats: int, batch: int, prompt: str) -> dict:
    from inference.loader import load_pipeline

    spec = parse_spec(text)
    pipe = load_pipeline(spec.path, **spec.overrides)
    cfg = pipe.cfg
    image = None
    if cfg.task == "i2v":
        image = first_frame(ShapesWorld(cfg.target_video_length, cfg.target_height, cfg.target_width).render(prompt, 0))
    prompts = [prompt] * batch
    pipe.generate(prompts, seed=0, image=image)  # warm-up (allocations, caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pipe.generate(prompts, seed=0, image=image)
        times.append(time.perf_counter() - t0)
    return {"config": text, "nfe_per_video": pipe.timings.nfe / batch, "median_s": statistics.median(times),
            "min_s": min(times), "stages": pipe.timings.stages, "device": str(pipe.device)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", required=True)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", default="a red circle moving left")
    p.add_argument("--out")
    a = p.parse_args(argv)
    rows = [time_config(c, a.repeats, a.batch, a.prompt) for c in a.config]
    base = rows[0]["median_s"]
    print("| config | NFE | median s/generation | speed-up vs first |\n|---|---|---|---|")
    for r in rows:
        r["speedup"] = base / r["median_s"]
        print(f"| `{r['config']}` | {r['nfe_per_video']:.0f} | {r['median_s']:.3f} | {r['speedup']:.1f}x |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).with_suffix(".json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
