"""Generate videos from the command line.

    python infer.py --config configs/tiny/t2v_teacher.json --prompt "a red circle moving left" \
        --save_result_path out.mp4
    python infer.py --config configs/wan/wan_t2v.json --model_path /data/Wan2.1-T2V-1.3B \
        --prompt_file prompts.txt --output_dir outputs/ --format mp4
    python infer.py --config configs/tiny/i2v_teacher.json --image_path frame0.png --prompt "..." \
        --save_result_path out.mp4
    python infer.py --config configs/tiny/t2v_distill_4step.json --lora_path my_lora.safetensors \
        --lora_strength 0.8 --prompt "..." --save_result_path out.mp4

The result format follows the extension: .mp4 (H.264), .gif, .npy (raw uint8 [F,H,W,3], lossless).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from inference.config import LORA_MODES, LoraSpec, load_config
from inference.video import FORMATS, read_image, save_video


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="LightX2V-style inference JSON")
    p.add_argument("--model_path", help="Wan-style model folder (default: the config's model_path)")
    p.add_argument("--task", choices=["t2v", "i2v"], help="override the config's task")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt_file", help="one prompt per line; writes one video per prompt")
    p.add_argument("--image_path", help="conditioning image (I2V)")
    p.add_argument("--negative_prompt")
    p.add_argument("--seed", type=int)
    dst = p.add_mutually_exclusive_group(required=True)
    dst.add_argument("--save_result_path", help="output file: .mp4, .gif or .npy")
    dst.add_argument("--output_dir", help="folder for 000000.<format> ... and prompts.jsonl")
    p.add_argument("--format", choices=FORMATS, default="mp4", help="format with --output_dir")
    p.add_argument("--batch_size", type=int, default=1, help="prompts per forward with --prompt_file")
    p.add_argument("--lora_path", help="a LoRA file, applied after the config's lora_configs (relative paths "
                   "resolve like model_path)")
    p.add_argument("--lora_strength", type=float, default=1.0, help="strength of --lora_path")
    p.add_argument("--lora_mode", choices=LORA_MODES, help="merge (default) or runtime (unmerged)")
    return p.parse_args(argv)


def read_prompts(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"prompt file not found: {file}")
    prompts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {file} is empty: expected one prompt per line")
    return prompts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        # Validate everything cheap before loading any network.
        cfg = load_config(args.config, task=args.task, seed=args.seed, lora_mode=args.lora_mode)
        if args.lora_path:
            cfg = cfg.replace(lora_configs=[*cfg.lora_configs, LoraSpec(args.lora_path, args.lora_strength)])
        if cfg.lora_configs:
            from inference.lora import resolve_lora_path  # imports torch: only when there are LoRAs
        for spec in cfg.lora_configs:
            if not resolve_lora_path(spec.path).is_file():
                raise FileNotFoundError(f"LoRA file not found: {resolve_lora_path(spec.path)}")
        prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompt_file)
        if args.save_result_path and len(prompts) != 1:
            raise ValueError("--save_result_path writes one video; use --output_dir with --prompt_file")
        if args.save_result_path:
            ext = Path(args.save_result_path).suffix.lstrip(".").lower()
            if ext not in FORMATS:
                raise ValueError(f"--save_result_path must end in one of {['.' + f for f in FORMATS]}")
        image = None
        if cfg.task == "i2v":
            if not args.image_path:
                raise ValueError("task i2v needs --image_path")
            image = read_image(args.image_path)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from inference.loader import load_pipeline

    t0 = time.perf_counter()
    try:
        pipe = load_pipeline(cfg, args.model_path)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"load: {time.perf_counter() - t0:.2f}s")
    seed = cfg.seed
    outputs = []
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start: start + args.batch_size]
        t0 = time.perf_counter()
        videos = pipe.generate(chunk, seed=seed + start, image=image, negative_prompt=args.negative_prompt)
        stages = " ".join(f"{k}={v:.2f}s" for k, v in pipe.timings.stages.items())
        print(f"generate {len(chunk)} video(s): {time.perf_counter() - t0:.2f}s ({stages}) "
              f"DiT evaluations: {pipe.timings.nfe}")
        for i, video in enumerate(videos):
            idx = start + i
            path = Path(args.save_result_path) if args.save_result_path else \
                Path(args.output_dir) / f"{idx:06d}.{args.format}"
            save_video(video, path, fps=cfg.fps)
            outputs.append({"index": idx, "prompt": chunk[i], "seed": seed + idx, "path": str(path)})
            print(f"saved {path}")
    if args.output_dir:
        index = Path(args.output_dir) / "prompts.jsonl"
        index.write_text("".join(json.dumps(o) + "\n" for o in outputs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
