"""Generate videos from the command line.

    python infer.py --config configs/infer/tiny/t2v_teacher.json --prompt "a red circle moving left" \
        --save_result_path out.mp4
    python infer.py --config configs/infer/wan/wan_t2v.json --model_path /data/Wan2.1-T2V-1.3B \
        --prompt_file prompts.txt --output_dir outputs/ --format mp4
    python infer.py --config configs/infer/tiny/i2v_teacher.json --image_path frame0.png --prompt "..." \
        --save_result_path out.mp4
    python infer.py --config configs/infer/tiny/t2v_distill_4step.json --lora_path my_lora.safetensors \
        --lora_strength 0.8 --prompt "..." --save_result_path out.mp4
    # LightX2V's flags: --config_json, --model_cls (wan2.1 | wan2.1_distill | wan2.2_moe | wan2.2_moe_distill | wan2.2)
    python infer.py --model_cls wan2.1_distill --config_json configs/infer/wan/wan_t2v_distill_4step_cfg.json \
        --model_path /data/Wan2.1-T2V-14B --prompt "..." --save_result_path out.mp4
    # Wan2.2 TI2V-5B (LightX2V's --model_cls wan2.2): one folder, text-only or from a start image
    python infer.py --config configs/infer/wan22/wan22_ti2v_5b.json --model_path /data/Wan2.2-TI2V-5B \
        --task i2v --image_path frame0.png --prompt "..." --save_result_path out.mp4
    # Wan2.2 A14B (two experts; LightX2V's --model_cls wan2.2_moe, 4-step students wan2.2_moe_distill)
    python infer.py --config configs/infer/wan22/wan22_moe_t2v_distill_4step.json --model_path /data/Wan2.2-T2V-A14B \
        --prompt "..." --save_result_path out.mp4

The result format follows the extension: .mp4 (H.264), .gif, .npy (raw uint8 [F,H,W,3], lossless). Every input is
checked before torch or a network loads, and each error names what is wrong (docs/serving.md lists the checks).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from inference.config import LORA_MODES, LoraSpec, add_model_args, load_config, positive_int
from inference.video import FORMATS, check_path_text, check_writable_dir, check_writable_file, read_image, save_video

INDEX_NAME = "prompts.jsonl"  # --output_dir: one JSON row per video (index, prompt, seed, path)


def finite_float(text: str) -> float:
    """argparse type: a finite number (nan / inf would make an all-black video without a word)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--task", choices=["t2v", "i2v"], help="override the config's task")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt_file", help="one prompt per line (UTF-8); writes one video per prompt")
    p.add_argument("--image_path", help="conditioning image (I2V only)")
    p.add_argument("--negative_prompt")
    p.add_argument("--seed", type=int)
    dst = p.add_mutually_exclusive_group(required=True)
    dst.add_argument("--save_result_path", help="output file: .mp4, .gif or .npy")
    dst.add_argument("--output_dir", help="folder for 000000.<format> ... and prompts.jsonl")
    p.add_argument("--overwrite", action="store_true", help="with --output_dir: replace an earlier run's "
                   "prompts.jsonl and videos (without it, an existing run there is an error)")
    p.add_argument("--format", choices=FORMATS, default="mp4", help="format with --output_dir")
    p.add_argument("--batch_size", type=positive_int, default=1, help="prompts per forward with --prompt_file")
    p.add_argument("--lora_path", help="a LoRA file, applied after the config's lora_configs (relative paths "
                   "resolve like model_path)")
    p.add_argument("--lora_strength", type=finite_float, default=1.0, help="strength of --lora_path")
    p.add_argument("--lora_mode", choices=LORA_MODES, help="merge (default) or runtime (unmerged)")
    return p.parse_args(argv)


def read_prompts(path: str) -> list[str]:
    """Non-blank lines of a UTF-8 text file; a missing, non-text or empty file is an error naming it."""
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"prompt file {file} is a directory")
    if not file.is_file():
        raise FileNotFoundError(f"prompt file not found: {file}")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {file} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                         "save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {file} is empty: expected one prompt per line")
    return prompts


def check_outputs(args: argparse.Namespace, n_videos: int) -> None:
    """Everything about the output location that can fail, checked before any model work."""
    if args.save_result_path:
        if n_videos != 1:
            raise ValueError("--save_result_path writes one video; use --output_dir with --prompt_file")
        ext = Path(args.save_result_path).suffix.lstrip(".").lower()
        if ext not in FORMATS:
            raise ValueError(f"--save_result_path must end in one of {['.' + f for f in FORMATS]}")
        check_writable_file(args.save_result_path, "--save_result_path")
        return
    out = Path(args.output_dir)
    earlier = [out / INDEX_NAME, *(out / f"{i:06d}.{args.format}" for i in range(n_videos))]
    taken = [p.name for p in earlier if p.exists()]
    if taken and not args.overwrite:
        raise ValueError(f"--output_dir {out} already holds an earlier run ({', '.join(taken[:3])}"
                         f"{', ...' if len(taken) > 3 else ''}); choose a new folder or pass --overwrite")
    check_writable_dir(out, "--output_dir")


def read_conditioning_image(args: argparse.Namespace, task: str):
    """The I2V image (uint8 [H, W, 3]); an image on a T2V config is an error, not silently ignored."""
    if task == "t2v":
        if args.image_path:
            raise ValueError("--image_path is for image-to-video, but this config runs t2v: drop --image_path, "
                             "or use an I2V config and model (--task i2v)")
        return None
    if not args.image_path:
        raise ValueError("task i2v needs --image_path")
    return read_image(args.image_path)


def prepare(args: argparse.Namespace):
    """Validate everything cheap before loading any network: (config, prompts, image)."""
    for name in ("config", "model_path", "prompt_file", "image_path", "save_result_path", "output_dir",
                 "lora_path"):
        if getattr(args, name) is not None:
            check_path_text(getattr(args, name), f"--{name}")
    cfg = load_config(args.config, task=args.task, seed=args.seed, lora_mode=args.lora_mode,
                      model_cls=args.model_cls)
    if args.lora_path:
        cfg = cfg.replace(lora_configs=[*cfg.lora_configs, LoraSpec(args.lora_path, args.lora_strength)])
    if cfg.lora_configs:
        from inference.lora import resolve_lora_path  # imports torch: only when there are LoRAs
    for spec in cfg.lora_configs:
        if not resolve_lora_path(spec.path).is_file():
            raise FileNotFoundError(f"LoRA file not found: {resolve_lora_path(spec.path)}")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompt_file)
    if not all(p.strip() for p in prompts):
        raise ValueError("--prompt must contain non-whitespace text")
    check_outputs(args, len(prompts))
    return cfg, prompts, read_conditioning_image(args, cfg.task)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, prompts, image = prepare(args)
        # torch and the networks only after the cheap checks; under torchrun the launch is checked against the
        # config's parallel block first and the process joins the group (inference/parallel.py)
        from inference.loader import check_before_loading
        from inference.parallel import follow_prompts, is_main, load_pipeline_launched

        check_before_loading(cfg, args.model_path)  # weight files: truncation, a distill schedule on base weights
        t0 = time.perf_counter()
        pipe = load_pipeline_launched(cfg, args.model_path)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not is_main(pipe):  # a torchrun rank other than 0: computes its share of every video; rank 0 writes
        return follow_prompts(pipe, prompts, args.batch_size, image, args.negative_prompt)
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
        index = Path(args.output_dir) / INDEX_NAME
        index.write_text("".join(json.dumps(o) + "\n" for o in outputs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
