#!/usr/bin/env bash
# Big-model inference on one GPU (issue 16), random weights at the real Wan2.1-T2V-14B geometry:
#   1. seconds per denoising step and peak memory at 81 frames x 480x832, the DiT resident vs block-offloaded
#      under a 24 GiB cap (torch.cuda.set_per_process_memory_fraction), their ratio, and the planner's peaks;
#   2. end to end per stage (text encoder, denoising, tiled VAE decode): 4-step student vs 50-step CFG teacher
#      (the teacher's denoising timed over 2 steps and scaled to 50).
#     bash scripts/gpu_inference_check.sh        # ~4-6 min on one H200 (needs ~60 GB of host RAM for pinned weights)
# Writes benchmarks/results/infer_gpu_check_<gpu>.json (override with OUT=path/without/extension).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())"
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())")
OUT=${OUT:-benchmarks/results/infer_gpu_check_$GPU}
timeout 480 "$PY" -m benchmarks.infer_gpu_check --geometry real --teacher-steps 2 --out "$OUT"
echo "wrote $OUT.json"
