#!/usr/bin/env bash
# Everything after the tiny T2V teacher on one GPU machine: `tiny_recipe.sh lanes` (I2V teacher -> I2V student,
# ODE init, the DMD sweep) side by side, then the sweep and I2V tables; the best full-DMD student (by joint
# accuracy), its rank-64 SVD LoRA and the best LoRA-mode adapter are copied to $OUT with a tarball of every log,
# metric and table (the device tool returns at most 8 files of 16 MiB).
#     OUT=runs/lanes STAGE_TIMEOUT=200 bash scripts/gpu_lanes.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PY=${PY:-python3} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to the folder for the results}
mkdir -p "$OUT"
$PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
rm -rf runs/sweep runs/tiny_t2v_ode runs/tiny_i2v_teacher runs/tiny_i2v_dmd
start=$(date +%s)
EXTRA="${EXTRA:-} logging.sample_prompts=[]" STAGE_TIMEOUT=${STAGE_TIMEOUT:-0} bash scripts/tiny_recipe.sh lanes
echo "lanes + tables: $(( $(date +%s) - start )) s"

$PY - "$OUT" <<'PYEOF'
import json, shutil, subprocess, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = json.loads(Path("benchmarks/results/t2v_dmd_sweep.json").read_text())["rows"]
def best(prefix):
    cands = [r for r in rows if "runs/sweep/" + prefix in r["config"]]
    return max(cands, key=lambda r: r["joint_acc"])["config"].split("runs/sweep/")[1].split("/")[0] if cands else None
full, lora = best("dmd_"), best("lora_")
print("best full:", full, "best LoRA mode:", lora)
Path("runs/sweep/best.json").write_text(json.dumps({"full": full, "lora": lora}))
if full:
    subprocess.run([sys.executable, "-m", "distill.export", "--run", f"runs/sweep/{full}", "--out",
                    f"runs/sweep/{full}/model", "--dtype", "bf16", "--lora", f"runs/sweep/{full}/lora_r64.safetensors",
                    "--lora-rank", "64", "--lora-min-numel", "32768"], check=True)
    shutil.copy(f"runs/sweep/{full}/model/distill_models/distill_model.safetensors", out / "t2v_student.safetensors")
    shutil.copy(f"runs/sweep/{full}/lora_r64.safetensors", out / "t2v_student_lora_r64.safetensors")
if lora:
    subprocess.run([sys.executable, "-m", "distill.export", "--run", f"runs/sweep/{lora}", "--out",
                    f"runs/sweep/{lora}/model", "--dtype", "bf16", "--lora", f"runs/sweep/{lora}/adapter.safetensors"],
                   check=True)
    shutil.copy(f"runs/sweep/{lora}/adapter.safetensors", out / "lora_mode_adapter.safetensors")
for src, name in (("checkpoints/tiny-i2v-teacher/diffusion_pytorch_model.safetensors", "i2v_teacher.safetensors"),
                  ("checkpoints/tiny-i2v-distill-4step/distill_models/distill_model.safetensors", "i2v_student.safetensors")):
    if Path(src).is_file():
        shutil.copy(src, out / name)
PYEOF
tar czf "$OUT/results.tgz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' --exclude='trajectories' \
    runs/sweep runs/tiny_t2v_ode runs/tiny_i2v_teacher runs/tiny_i2v_dmd benchmarks/results/t2v_dmd_sweep.* \
    benchmarks/results/i2v_quality.* checkpoints/tiny-i2v-teacher/config.json 2>/dev/null
ls -la "$OUT"
