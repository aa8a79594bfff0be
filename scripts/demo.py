"""`make demo`: the main job on the embedded tiny default, end to end on a CPU.

1. generate a video with the shipped tiny T2V teacher (50 UniPC steps + CFG);
2. distil it with DMD into a 4-step CFG-free student (a short run of configs/train/tiny/t2v_dmd.yaml);
3. print the teacher-vs-student table measured with the shapes evaluator, and write sample videos.

    python -m scripts.demo [--steps 600] [--prompts 24] [--seeds 1] [--out runs/demo]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.quality import main as quality
from infer import main as infer
from train import main as train

TEACHER_CFG = "configs/infer/tiny/t2v_teacher.json"
STUDENT_CFG = "configs/infer/tiny/t2v_distill_4step.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="DMD iterations of the short distillation")
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--out", default="runs/demo")
    args = p.parse_args()
    out = Path(args.out)
    t_start = time.perf_counter()

    print("== 1/3 teacher sample (50 steps + CFG)")
    infer(["--config", TEACHER_CFG, "--prompt", "a red circle moving left",
           "--save_result_path", str(out / "teacher_red_circle_left.mp4")])

    print(f"\n== 2/3 DMD distillation, {args.steps} iterations (full recipe: configs/train/tiny/t2v_dmd.yaml)")
    student = out / "student"
    code = train(["--config", "configs/train/tiny/t2v_dmd.yaml", f"run_dir={out / 'dmd'}", f"max_steps={args.steps}",
                  f"output_model={student}", "logging.sample_every=0", "checkpoint.resume=never",
                  f"dmd.ema_start={args.steps // 2}"])
    if code:
        raise SystemExit(code)
    infer(["--config", STUDENT_CFG, "--model_path", str(student), "--prompt", "a red circle moving left",
           "--save_result_path", str(out / "student_red_circle_left.mp4")])

    print(f"\n== 3/3 quality: {args.prompts} prompts x {args.seeds} seed(s)")
    quality(["--config", TEACHER_CFG, "--config", f"{TEACHER_CFG}:infer_steps=4,enable_cfg=false",
             "--config", f"{STUDENT_CFG}:model_path={student}",
             "--prompts", str(args.prompts), "--seeds", str(args.seeds), "--out", str(out / "quality")])
    print(f"\ndemo finished in {(time.perf_counter() - t_start) / 60:.1f} min; videos and tables in {out}/")


if __name__ == "__main__":
    main()
