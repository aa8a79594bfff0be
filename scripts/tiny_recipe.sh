#!/usr/bin/env bash
# The full tiny recipe, stage by stage; every shipped tiny checkpoint and table comes from here.
#   bash scripts/tiny_recipe.sh components|t2v_teacher|i2v_teacher|t2v_student|i2v_student|tables|all
# Each training stage is resumable (re-run the same stage after a kill); seeds are fixed in the configs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LAUNCH=${LAUNCH:-$PY}   # e.g. LAUNCH="accelerate launch --multi_gpu --num_processes 2"
R=benchmarks/results

components() { $PY -m scripts.make_tiny_components --out checkpoints/tiny-components; }

t2v_teacher() {
  $LAUNCH train.py --config configs/tiny/t2v_teacher.yaml "$@"
  $PY -m distill.export --run runs/tiny_t2v_teacher_48 --out checkpoints/tiny-t2v-teacher --dtype bf16
}

i2v_teacher() {
  $LAUNCH train.py --config configs/tiny/i2v_teacher.yaml "$@"
  $PY -m distill.export --run runs/tiny_i2v_teacher --out checkpoints/tiny-i2v-teacher --dtype bf16
}

t2v_student() {  # ODE-regression init, then DMD from it; full student + rank-64 LoRA
  $LAUNCH train.py --config configs/tiny/t2v_ode.yaml
  $LAUNCH train.py --config configs/tiny/t2v_dmd.yaml model.generator_init=runs/tiny_t2v_ode/model "$@"
  $PY -m distill.export --run runs/tiny_t2v_dmd --out checkpoints/tiny-t2v-distill-4step --dtype bf16 \
      --lora checkpoints/tiny-t2v-distill-lora-r64.safetensors --lora-rank 64 --lora-min-numel 32768
}

i2v_student() {
  $LAUNCH train.py --config configs/tiny/i2v_dmd.yaml "$@"
  $PY -m distill.export --run runs/tiny_i2v_dmd --out checkpoints/tiny-i2v-distill-4step --dtype bf16
}

tables() {
  T=configs/tiny/t2v_teacher.json
  $PY -m benchmarks.quality --prompts 96 --seeds 2 --out $R/t2v_quality \
      --config $T --config "$T:enable_cfg=false" --config "$T:infer_steps=4" --config "$T:infer_steps=4,enable_cfg=false" \
      --config configs/tiny/t2v_distill_4step.json --config configs/tiny/t2v_distill_4step_lora.json
  I=configs/tiny/i2v_teacher.json
  $PY -m benchmarks.quality --prompts 96 --seeds 2 --out $R/i2v_quality \
      --config "$I:infer_steps=40" --config "$I:infer_steps=4,enable_cfg=false" --config configs/tiny/i2v_distill_4step.json
  $PY -m benchmarks.speed --repeats 5 --out $R/t2v_speed --config $T --config configs/tiny/t2v_distill_4step.json
}

stage=${1:-all}; shift || true
case "$stage" in
  all) components; t2v_teacher; i2v_teacher; t2v_student; i2v_student; tables ;;
  components|t2v_teacher|i2v_teacher|t2v_student|i2v_student|tables) "$stage" "$@" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
