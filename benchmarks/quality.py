"""Quality table of inference configs on the shapes world, measured with the evaluator (data/evaluate.py).

    python -m benchmarks.quality --config configs/infer/tiny/t2v_teacher.json \
        --config "configs/infer/tiny/t2v_teacher.json:infer_steps=4,enable_cfg=false" --prompts 96 --seeds 2 \
        --out benchmarks/results/t2v_teacher

A config may carry per-run overrides after a colon (`key=value` pairs, comma-separated, JSON values such as
`sample_guide_interval=[300,850]`).
Prints a Markdown table (NFE, wall time per video, per-attribute and joint accuracy, validity, diversity vs
the data; I2V also first-frame PSNR and identity), writes it as `<out>.json`/`<out>.md` and a PNG grid of
sample frames (one row per config, the same prompts and seeds in every row).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import imageio.v2 as imageio
import numpy as np

from data.evaluate import diversity, evaluate_set, ground_truth_results
from data.shapes import PROMPTS, SHAPES, ShapesWorld, first_frame

EVAL_SEED = 900_000  # far from the training seeds (distill/data.py starts at data.seed * 1_000_003)


@dataclass
class RunSpec:
    label: str
    path: str
    overrides: dict


def parse_spec(text: str) -> RunSpec:
    """`path.json[:key=value,key=value]` -> RunSpec; values are parsed as JSON when possible."""
    path, _, rest = text.partition(":")
    overrides = {}
    for item in filter(None, re.split(r",(?=\s*[A-Za-z_][\w.]*\s*=)", rest)):  # commas inside [..] stay
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"override {item!r} in {text!r} is not key=value")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return RunSpec(text, path, overrides)


def pick_prompts(n: int) -> list[str]:
    """n prompts spread over the 96 (all of them for n >= 96)."""
    if n >= len(PROMPTS):
        return list(PROMPTS)
    idx = np.linspace(0, len(PROMPTS) - 1, n).round().astype(int)
    return [PROMPTS[i] for i in idx]


def run_config(spec: RunSpec, prompts: list[str], seeds: int, batch: int) -> tuple[dict, list[np.ndarray]]:
    """Generate prompts x seeds with one config; returns (metrics row, videos in (seed, prompt) order)."""
    from inference.loader import load_pipeline

    pipe = load_pipeline(spec.path, **spec.overrides)
    cfg = pipe.cfg
    world = ShapesWorld(cfg.target_video_length, cfg.target_height, cfg.target_width)
    videos, all_prompts, images, nfe, seconds = [], [], [], 0, 0.0
    for s in range(seeds):
        for start in range(0, len(prompts), batch):
            chunk = prompts[start: start + batch]
            base = EVAL_SEED + s * len(PROMPTS) + start
            image = None
            if cfg.task == "i2v":
                image = [first_frame(world.render(p, base + i)) for i, p in enumerate(chunk)]
                images += image
            t0 = time.perf_counter()
            out = pipe.generate(chunk, seed=base, image=image)
            seconds += time.perf_counter() - t0
            nfe += pipe.timings.nfe
            videos += list(out)
            all_prompts += chunk
    metrics = evaluate_set(videos, all_prompts, images if cfg.task == "i2v" else None)
    # The data's own spread over the same number of seeds per prompt (same estimator, same noise level).
    reference = ground_truth_results(world, prompts, [EVAL_SEED + s * len(PROMPTS) for s in range(seeds)])
    div = diversity(metrics.pop("results"), reference)
    row = {"config": spec.label, "task": cfg.task, "nfe": nfe / len(videos), "sec_per_video": seconds / len(videos),
           **{k: v for k, v in metrics.items()}, "diversity": div["ratio"], "diversity_detail": div}
    return row, videos


def markdown(rows: list[dict]) -> str:
    i2v = any(r["task"] == "i2v" for r in rows)
    head = ["config", "NFE", "s/video", "colour", "shape", "direction", "joint", "valid", "diversity",
            "shape by prompt (" + " / ".join(SHAPES) + ")"]
    head += ["PSNR f0 (dB)", "identity"] if i2v else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['config']}`", f"{r['nfe']:.0f}", f"{r['sec_per_video']:.2f}"]
        cells += [f"{100 * r[k]:.1f}%" for k in ("colour_acc", "shape_acc", "direction_acc", "joint_acc", "valid_rate")]
        by_shape = r["shape_acc_by_prompt"]
        cells += [f"{r['diversity']:.2f}",
                  " / ".join(f"{100 * by_shape[s]:.0f}%" if s in by_shape else "-" for s in SHAPES)]
        if i2v:
            cells += [f"{r.get('first_frame_psnr', float('nan')):.1f}", f"{100 * r.get('identity_rate', 0):.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid(rows_videos: list[list[np.ndarray]], n_videos: int = 6, frames: tuple[int, ...] = (0, -1)) -> np.ndarray:
    """One row per config: for each of the first `n_videos` videos, the chosen frames side by side."""
    out = []
    for videos in rows_videos:
        tiles = [np.concatenate([v[f] for f in frames], axis=1) for v in videos[:n_videos]]
        sep = lambda t: np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=80)  # noqa: E731
        out.append(np.concatenate([sep(t) for t in tiles], axis=1))
    return np.concatenate(out, axis=0)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", required=True, help="inference JSON[:key=value,...]")
    p.add_argument("--prompts", type=int, default=96)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="videos per forward")
    p.add_argument("--out", help="write <out>.json, <out>.md and <out>.png")
    args = p.parse_args(argv)
    prompts = pick_prompts(args.prompts)
    rows, all_videos = [], []
    for text in args.config:
        row, videos = run_config(parse_spec(text), prompts, args.seeds, args.batch)
        rows.append(row)
        all_videos.append(videos)
        print(markdown([row]).splitlines()[-1], flush=True)
    table = markdown(rows)
    print(f"\n{len(prompts)} prompts x {args.seeds} seeds\n{table}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"prompts": len(prompts), "seeds": args.seeds, "batch": args.batch}
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=float))
        out.with_suffix(".md").write_text(f"{len(prompts)} prompts x {args.seeds} seeds\n\n{table}\n")
        imageio.imwrite(out.with_suffix(".png"), grid(all_videos))
    return rows


if __name__ == "__main__":
    main()
