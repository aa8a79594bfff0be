"""Fit the tiny PCA latent codec on rendered shapes-world videos and measure how well the world survives it.

    python -m scripts.fit_codec --z-dim 32 --out checkpoints/codec            # writes codec.safetensors
    python -m scripts.fit_codec --sweep 16,24,32,48 --sizes 48,64,128         # prints the measurement table

The reconstruction check renders held-out clips (96 prompts x --eval-seeds seeds, seeds disjoint from the fit
set), encodes and decodes them and runs the evaluator (data/evaluate.py): joint accuracy (valid and colour,
shape, direction right), shape accuracy and PSNR. Deterministic given --seed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from data.evaluate import evaluate_set
from data.shapes import PROMPTS, ShapesWorld, row_seed
from models.codec import PCACodec, fit_pca_codec, tensor_to_videos, videos_to_tensor

CODEC_FILE = "codec.safetensors"  # the name models/components.py gives it in a tiny folder
EVAL_SEED = 1_000_003  # held-out seeds start here


def fit_videos(world: ShapesWorld, n: int, seed: int) -> np.ndarray:
    """`n` clips cycling through the 96 prompts (balanced), uint8 [n, F, H, W, 3]."""
    return np.stack([world.render(PROMPTS[i % len(PROMPTS)], row_seed(seed, i)) for i in range(n)])


@torch.no_grad()
def reconstruction_metrics(codec: PCACodec, world: ShapesWorld, eval_seeds: int = 2, batch: int = 32) -> dict:
    """Evaluator accuracy on encode -> decode of 96 prompts x `eval_seeds` held-out renders."""
    prompts = [p for s in range(eval_seeds) for p in PROMPTS]
    seeds = [EVAL_SEED + s for s in range(eval_seeds) for _ in PROMPTS]
    gt = np.stack([world.render(p, s) for p, s in zip(prompts, seeds, strict=True)])
    rec = np.concatenate([tensor_to_videos(codec.decode(codec.encode(videos_to_tensor(gt[i:i + batch]))))
                          for i in range(0, len(gt), batch)])
    r = evaluate_set(rec, prompts)
    mse = float(((rec.astype(np.float64) - gt) ** 2).mean())
    return {k: v for k, v in r.items() if k != "results"} | {"psnr": 10 * np.log10(255.0**2 / max(mse, 1e-12))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--z-dim", type=int, default=32, help="latent channels (values per DiT token = 4 z)")
    p.add_argument("--spatial-stride", type=int, default=8, help="pixels per latent pixel along H and W")
    p.add_argument("--normalize", choices=["channel", "global"], default="channel",
                   help="latent std per channel or one for all")
    p.add_argument("--out", default=None, help="folder for codec.safetensors and codec_eval.json")
    p.add_argument("--videos", type=int, default=384, help="rendered clips the codec is fitted on")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seeds", type=int, default=2, help="held-out seeds per prompt for the check")
    p.add_argument("--sweep", default=None, help="comma-separated z dims: print a table instead of saving")
    p.add_argument("--sizes", default=None, help="with --sweep: comma-separated square frame sizes")
    args = p.parse_args()

    if args.sweep:
        sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [args.height]
        print("| z_dim | size | tokens/frame | values/token | joint acc | shape acc | valid | PSNR |")
        print("|---|---|---|---|---|---|---|---|")
        for size in sizes:
            world = ShapesWorld(args.frames, size, size)
            videos = fit_videos(world, args.videos, args.seed)
            for z in (int(z) for z in args.sweep.split(",")):
                m = reconstruction_metrics(fit_pca_codec(videos, z, args.spatial_stride, args.normalize), world,
                                           args.eval_seeds)
                tokens = (size // (2 * args.spatial_stride)) ** 2  # DiT patch 2x2
                print(f"| {z} | {size}x{size} | {tokens} | {4 * z} | {m['joint_acc']:.3f} | {m['shape_acc']:.3f} "
                      f"| {m['valid_rate']:.3f} | {m['psnr']:.1f} |", flush=True)
        return

    if args.out is None:
        p.error("--out is required unless --sweep is given")
    world = ShapesWorld(args.frames, args.height, args.width)
    t0 = time.perf_counter()
    codec = fit_pca_codec(fit_videos(world, args.videos, args.seed), args.z_dim, args.spatial_stride, args.normalize)
    fit_s = time.perf_counter() - t0
    metrics = reconstruction_metrics(codec, world, args.eval_seeds)
    out = Path(args.out)
    codec.save(out / CODEC_FILE)
    report = {"config": codec.config, "world": {"frames": args.frames, "height": args.height, "width": args.width},
              "videos": args.videos, "seed": args.seed, "fit_seconds": round(fit_s, 2), **metrics}
    (out / "codec_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / CODEC_FILE} (z={args.z_dim}, fitted in {fit_s:.1f}s on {args.videos} clips): "
          f"recon joint acc {metrics['joint_acc']:.3f}, shape {metrics['shape_acc']:.3f}, PSNR {metrics['psnr']:.1f}")


if __name__ == "__main__":
    main()
