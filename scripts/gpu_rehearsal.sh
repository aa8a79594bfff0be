#!/usr/bin/env bash
# GPU rehearsal of the real training path at the Wan2.1-T2V-1.3B geometry (random weights, bf16 on CUDA):
# a 1.3B folder in the official layout, one ODE-init step, ten DMD iterations of configs/train/wan/t2v_1.3b_dmd.yaml
# with sampling every 5 iterations and the export at the end, then infer.py on the export with
# configs/infer/wan/wan_t2v_distill_4step_cfg.json as shipped (81x480x832, 4 steps). Each stage's wall time and peak
# GPU/host memory (scripts/peak_memory.py), the time per DMD iteration (generator and critic-only apart) and the peak
# CUDA memory of training iterations and of sampling go to
# benchmarks/results/gpu_rehearsal_1.3b.{json,md} (scripts/rehearsal_report.py). Budget: < 8 minutes on one H200.
#
#   bash scripts/gpu_rehearsal.sh [WORK_DIR]                 # one CUDA GPU
#   GEOMETRY=mini bash scripts/gpu_rehearsal.sh [WORK_DIR]   # the same steps at mini size on a CPU (its test);
#                                                            # results stay in WORK_DIR/results
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
GEOMETRY=${GEOMETRY:-1.3b}
WORK=${1:-$(mktemp -d -t gpu_rehearsal.XXXXXX)}
WORK=$(mkdir -p "$WORK" && cd "$WORK" && pwd)
YAML=configs/train/wan/t2v_1.3b_dmd.yaml
INFER=configs/infer/wan/wan_t2v_distill_4step_cfg.json
STEPS=10
SAMPLE_EVERY=5
mkdir -p "$WORK/stages" "$WORK/runs"

case $GEOMETRY in
  1.3b)
    SIZE=()
    OUT=${RESULTS:-benchmarks/results}/gpu_rehearsal_1.3b
    "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: run with GEOMETRY=mini on a CPU")' ;;
  mini)
    SIZE=(data.num_frames=5 data.height=32 data.width=32)
    OUT=$WORK/results/gpu_rehearsal_mini
    "$PY" - "$INFER" "$WORK/infer.json" <<'EOF'
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg.update(target_video_length=5, target_height=32, target_width=32)
json.dump(cfg, open(sys.argv[2], "w"), indent=2)
EOF
    INFER=$WORK/infer.json ;;
  *) echo "GEOMETRY must be 1.3b or mini, got $GEOMETRY" >&2; exit 2 ;;
esac
# A machine without an ffmpeg binary (imageio-ffmpeg) or wandb still rehearses: the videos go to .npy (raw frames)
# and tracking is disabled; rehearsal.json records which.
VIDEO=mp4
"$PY" -c 'import imageio_ffmpeg; imageio_ffmpeg.get_ffmpeg_exe()' 2>/dev/null || VIDEO=npy
TRACKING=(logging.sample_format=$VIDEO)
"$PY" -c 'import wandb' 2>/dev/null || TRACKING+=(logging.wandb_mode=disabled)
printf '{"geometry": "%s", "dmd_iterations": %d, "sample_every": %d, "yaml": "%s", "infer_config": "%s", "video": "%s", "overrides": "%s", "work": "%s"}\n' \
  "$GEOMETRY" $STEPS $SAMPLE_EVERY "$YAML" "$INFER" "$VIDEO" "${TRACKING[*]}" "$WORK" >"$WORK/rehearsal.json"

measure() {  # measure STAGE SCRIPT ARGS...: run in-process, record wall time and peak memory
  local stage=$1; shift
  echo "== $stage"
  "$PY" -m scripts.peak_memory --out "$WORK/stages/$stage.json" -- "$@"
}
printf 'A cat walks on the grass, realistic style.\nA drone shot of waves crashing against cliffs.\n' >"$WORK/prompts.txt"
M=$WORK/model
R=$WORK/runs

measure make_model scripts/make_mini_wan.py --task t2v --geometry "$GEOMETRY" --out "$M"
STORE=data.text_store=$R/text_store
measure ode train.py --config $YAML task=ode run_dir="$R/ode" model.path="$M" data.prompt_path="$WORK/prompts.txt" \
  "$STORE" "${SIZE[@]}" max_steps=1 grad_accum=1 output_model="$R/ode/model" ode.trajectories="$R/ode/trajectories" \
  ode.num_trajectories=1 ode.teacher_steps=8 ode.shard_size=1 "${TRACKING[@]}"
# The ODE run's checkpoint (1.3B: generator + AdamW states, ~16 GiB) and trajectories are not needed any more: a
# 64 GiB disk (the lent test machine's) cannot hold them next to the DMD checkpoint (~37 GiB: generator, critic and
# EMA in fp32, AdamW states for generator and critic).
rm -rf "$R/ode/checkpoints" "$R/ode/trajectories"
measure dmd train.py --config $YAML run_dir="$R/dmd" model.path="$M" model.generator_init="$R/ode/model" \
  data.prompt_path="$WORK/prompts.txt" "$STORE" "${SIZE[@]}" max_steps=$STEPS grad_accum=1 output_model="$R/dmd/model" \
  logging.every=1 logging.sample_every=$SAMPLE_EVERY logging.sample_steps=4 "${TRACKING[@]}"
measure infer_export infer.py --config "$INFER" --model_path "$R/dmd/model" \
  --prompt "A cat walks on the grass, realistic style." --save_result_path "$WORK/export.$VIDEO"
"$PY" -m scripts.rehearsal_report --work "$WORK" --out "$OUT" --skip-steps 1 $(seq $((SAMPLE_EVERY + 1)) $SAMPLE_EVERY $STEPS)
