"""Where a T2V model decides an object's shape: its one-step denoised estimate of noised ground-truth clips.

    python -m benchmarks.shape_probe --config configs/infer/tiny/t2v_teacher.json --shape square --swap circle \
        --out benchmarks/results/t2v_teacher_shape_probe

Renders the 32 prompts of `--shape` (one clip each, the evaluation seeds of benchmarks.quality), encodes them,
noises each latent to sigma s (x_s = (1 - s) x0 + s eps, one eps per clip), and decodes the model's x0 estimate
x0_hat = x_s - s v(x_s, 1000 s) under the true prompt and under the prompt with the shape word swapped for
`--swap`. The evaluator reads the shape of each decoded estimate. If the true-prompt row stays right down to
large s and the swapped row follows the swap there, the model reads the shape word; if both rows follow the
latent (or both turn to the swap), the shape is decided by what the noisy latent already shows. The last row is
the config's own sampling from pure noise. Guidance is not applied (conditional predictions only).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from benchmarks.quality import EVAL_SEED, parse_spec
from data.evaluate import evaluate_video
from data.shapes import PROMPTS, SHAPES, ShapesWorld
from inference.flow import add_noise, x0_from_v
from inference.loader import load_pipeline
from inference.pipeline import to_uint8
from models.codec import videos_to_tensor

SIGMAS = (0.3, 0.5, 0.7, 0.85, 0.95)


def read_shapes(videos: np.ndarray, prompts: list[str]) -> tuple[float, float]:
    """(fraction of clips read as the prompt's shape, mean box fill ratio)."""
    rs = [evaluate_video(v, p) for v, p in zip(videos, prompts, strict=True)]
    return float(np.mean([r["shape_correct"] for r in rs])), float(np.nanmean([r["fill"] for r in rs]))


@torch.no_grad()
def probe(pipe, shape: str, swap: str, seed: int = 0, sample: bool = True) -> list[dict]:
    """Rows {label, sigma, acc, fill[, swapped_acc, swapped_fill]}: the codec's own reconstruction (no model),
    one per SIGMAS, then (with `sample`) the pipeline's own generation and its frame 0 alone (motion blur cannot
    round frame 0). `pipe`: a loaded T2V WanPipeline."""
    cfg = pipe.cfg
    if cfg.task != "t2v":
        raise ValueError(f"shape_probe takes a T2V pipeline, got task {cfg.task!r}")
    world = ShapesWorld(cfg.target_video_length, cfg.target_height, cfg.target_width)
    prompts = [p for p in PROMPTS if f" {shape} " in p]
    swapped = [p.replace(f" {shape} ", f" {swap} ") for p in prompts]
    gt = np.stack([world.render(p, EVAL_SEED + i) for i, p in enumerate(prompts)])
    x0 = pipe.vae.encode(videos_to_tensor(gt).to(pipe.device)).float()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)
    contexts = {"true": pipe.encode_text(prompts), "swapped": pipe.encode_text(swapped)}
    acc, fill = read_shapes(to_uint8(pipe.vae.decode(x0)), prompts)
    rows = [{"label": "codec reconstruction (no model)", "sigma": 0.0, "acc": acc, "fill": fill}]
    for s in SIGMAS:
        x_s = add_noise(x0, eps, s)
        t = torch.full((len(prompts),), 1000.0 * s, device=x0.device)
        row = {"label": f"one-step estimate at sigma {s:.2f}", "sigma": s}
        for name, ctx in contexts.items():
            v = pipe.dit(x_s.to(pipe.dtype), t, ctx).float()
            videos = to_uint8(pipe.vae.decode(x0_from_v(x_s, v, s)))
            key = "" if name == "true" else "swapped_"
            row[f"{key}acc"], row[f"{key}fill"] = read_shapes(videos, prompts)
        rows.append(row)
    if not sample:
        return rows
    sampled = pipe.generate(prompts, seed=EVAL_SEED)
    for label, videos in (("sampled from noise", sampled), ("sampled from noise, frame 0 alone", sampled[:, :1])):
        acc, fill = read_shapes(videos, prompts)
        rows.append({"label": label, "sigma": 1.0, "acc": acc, "fill": fill})
    return rows


def markdown(rows: list[dict], shape: str, swap: str) -> str:
    lines = [f"| clips | {shape} prompt: read as {shape} | box fill | '{swap}' prompt: read as {shape} | box fill |",
             "|---|---|---|---|---|"]
    for r in rows:
        swapped = f"{100 * r['swapped_acc']:.1f}% | {r['swapped_fill']:.3f}" if "swapped_acc" in r else " | "
        lines.append(f"| {r['label']} | {100 * r['acc']:.1f}% | {r['fill']:.3f} | {swapped} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="T2V inference JSON[:key=value,...] (as benchmarks.quality)")
    p.add_argument("--shape", choices=SHAPES, default="square")
    p.add_argument("--swap", choices=SHAPES, default="circle")
    p.add_argument("--out", help="write <out>.json and <out>.md")
    args = p.parse_args(argv)
    if args.swap == args.shape:
        raise SystemExit(f"--swap must differ from --shape ({args.shape})")
    spec = parse_spec(args.config)
    rows = probe(load_pipeline(spec.path, **spec.overrides), args.shape, args.swap)
    table = markdown(rows, args.shape, args.swap)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"config": args.config, "shape": args.shape,
                                                        "swap": args.swap, "rows": rows}, indent=2))
        out.with_suffix(".md").write_text(f"`{args.config}`, 32 clips\n\n{table}\n")
    return rows


if __name__ == "__main__":
    main()
