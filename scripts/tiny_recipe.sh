#!/usr/bin/env bash
# The full tiny recipe, stage by stage; every shipped tiny checkpoint and table comes from here.
#   bash scripts/tiny_recipe.sh components|t2v_teacher|i2v_teacher|t2v_student|t2v_lora_mode|i2v_student|tables|all
#   bash scripts/tiny_recipe.sh sweep      # DMD variants (init x lr, full vs LoRA mode) -> one quality table
#   bash scripts/tiny_recipe.sh lanes      # everything after the T2V teacher as parallel lanes (a GPU machine)
#   bash scripts/tiny_recipe.sh teacher_probes   # the T2V teacher's shape diagnostics (docs/results.md)
#   bash scripts/tiny_recipe.sh guide_interval   # CFG in a timestep interval: teachers and DMD (docs/results.md)
#   bash scripts/tiny_recipe.sh few_steps        # 2-step and 1-step T2V students + the 1/2/4-step table (docs/results.md)
# Each training stage is resumable (re-run the same stage after a kill); seeds are fixed in the configs.
# The training configs write <run_dir>/model only; the shipped models under checkpoints/ are written here and
# nowhere else, each by an explicit `distill.export --out checkpoints/...` after its training stage.
# EXTRA="key=value ..." is appended to every training command (e.g. a smoke test: EXTRA="max_steps=2").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LAUNCH=${LAUNCH:-$PY}   # e.g. LAUNCH="accelerate launch --multi_gpu --num_processes 2"
R=benchmarks/results
EXTRA=${EXTRA:-}
QUALITY=${QUALITY:-"--prompts 96 --seeds 2"}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-0}  # seconds per training run in `sweep`/`lanes` (0: none); the export then uses the
                                   # run's last checkpoint

components() { $PY -m scripts.make_tiny_components --out checkpoints/tiny-components; }

t2v_teacher() {
  $LAUNCH train.py --config configs/train/tiny/t2v_teacher.yaml $EXTRA "$@"
  $PY -m distill.export --run runs/tiny_t2v_teacher_48 --out checkpoints/tiny-t2v-teacher --dtype bf16
}

i2v_teacher() {
  timeout "$STAGE_TIMEOUT" $LAUNCH train.py --config configs/train/tiny/i2v_teacher.yaml $EXTRA "$@" || echo "train exit $?"
  $PY -m distill.export --run runs/tiny_i2v_teacher --out checkpoints/tiny-i2v-teacher --dtype bf16
}

t2v_student() {  # ODE-regression init, then DMD from it; full student + rank-64 LoRA
  $LAUNCH train.py --config configs/train/tiny/t2v_ode.yaml $EXTRA
  $LAUNCH train.py --config configs/train/tiny/t2v_dmd.yaml model.generator_init=runs/tiny_t2v_ode/model $EXTRA "$@"
  $PY -m distill.export --run runs/tiny_t2v_dmd --out checkpoints/tiny-t2v-distill-4step --dtype bf16 \
      --lora checkpoints/tiny-t2v-distill-lora-r64.safetensors --lora-rank 64 --lora-min-numel 32768
}

t2v_lora_mode() {  # LoRA-mode DMD from the teacher: the rank-64 adapter itself is the shipped LoRA (no SVD)
  $LAUNCH train.py --config configs/train/tiny/t2v_dmd_lora.yaml $EXTRA "$@"
  $PY -m distill.export --run runs/tiny_t2v_dmd_lora --out runs/tiny_t2v_dmd_lora/model --dtype bf16 \
      --lora checkpoints/tiny-t2v-lora-mode-r64.safetensors
}

i2v_student() {
  timeout "$STAGE_TIMEOUT" $LAUNCH train.py --config configs/train/tiny/i2v_dmd.yaml $EXTRA "$@" || echo "train exit $?"
  $PY -m distill.export --run runs/tiny_i2v_dmd --out checkpoints/tiny-i2v-distill-4step --dtype bf16
}

i2v_table() {
  I=configs/infer/tiny/i2v_teacher.json
  $PY -m benchmarks.quality $QUALITY --out $R/i2v_quality \
      --config "$I:infer_steps=40" --config "$I:infer_steps=4,enable_cfg=false" --config configs/infer/tiny/i2v_distill_4step.json
}

tables() {
  T=configs/infer/tiny/t2v_teacher.json
  $PY -m benchmarks.quality --prompts 96 --seeds 2 --out $R/t2v_quality \
      --config $T --config "$T:enable_cfg=false" --config "$T:infer_steps=4" --config "$T:infer_steps=4,enable_cfg=false" \
      --config configs/infer/tiny/t2v_distill_4step.json --config configs/infer/tiny/t2v_distill_4step_lora.json \
      --config configs/infer/tiny/t2v_distill_4step_lora_mode.json
  i2v_table
  $PY -m benchmarks.speed --repeats 5 --out $R/t2v_speed --config $T --config configs/infer/tiny/t2v_distill_4step.json
}

teacher_probes() {  # why squares fail (docs/results.md): shape probe, samplers, larger objects
  T=configs/infer/tiny/t2v_teacher.json
  $PY -m benchmarks.shape_probe --config $T --out $R/t2v_teacher_shape_probe
  $PY -m benchmarks.quality --prompts 96 --seeds 1 --out $R/t2v_teacher_samplers --config $T \
      --config "$T:sample_shift=1" --config "$T:sample_shift=6" --config "$T:sample_solver=euler" \
      --config "$T:infer_steps=100" --config "$T:sample_guide_scale=9"
  $LAUNCH train.py --config configs/train/tiny/t2v_teacher.yaml run_dir=runs/teacher_big_objects output_model=null \
      model.path=checkpoints/tiny-t2v-teacher max_steps=1000 optim.warmup_steps=50 pretrain.ema_decay=0.995 \
      data.object_size=[0.3,0.4] checkpoint.every=500 logging.sample_prompts=[] $EXTRA
  $PY -m distill.export --run runs/teacher_big_objects --out runs/teacher_big_objects/model --dtype bf16
  $PY -m benchmarks.quality --prompts 96 --seeds 2 --out $R/t2v_teacher_big_objects \
      --config "$T:model_path=runs/teacher_big_objects/model"
}

no_interval() {  # the students shipped before the guidance interval: the same recipes with CFG at every critic step
  local N="dmd.guide_interval=null logging.sample_every=0"
  [ -d runs/student_no_interval ] || $LAUNCH train.py --config configs/train/tiny/t2v_dmd.yaml \
      model.generator_init=runs/tiny_t2v_ode/model run_dir=runs/tiny_t2v_dmd_no_interval \
      output_model=runs/student_no_interval $N $EXTRA
  [ -f runs/lora_mode_no_interval_r64.safetensors ] || { $LAUNCH train.py --config configs/train/tiny/t2v_dmd_lora.yaml \
      run_dir=runs/lora_mode_no_interval output_model=null $N $EXTRA
    $PY -m distill.export --run runs/lora_mode_no_interval --out runs/lora_mode_no_interval/model --dtype bf16 \
      --lora runs/lora_mode_no_interval_r64.safetensors; }
  [ -d runs/i2v_student_no_interval ] || $LAUNCH train.py --config configs/train/tiny/i2v_dmd.yaml \
      run_dir=runs/tiny_i2v_dmd_no_interval output_model=runs/i2v_student_no_interval $N $EXTRA
}

guide_interval() {  # CFG only for t in [t_min, t_max] (docs/results.md "Guidance interval"): teachers, then DMD through it
  T=configs/infer/tiny/t2v_teacher.json I=configs/infer/tiny/i2v_teacher.json S=configs/infer/tiny/t2v_distill_4step.json
  L=configs/infer/tiny/t2v_distill_4step_lora_mode.json
  $PY -m benchmarks.quality --prompts 96 --seeds 2 --out $R/t2v_teacher_guide_interval --config $T \
      --config "$T:sample_guide_interval=[300,850]" --config "$T:sample_guide_interval=[0,850]" \
      --config "$T:sample_guide_interval=[300,1000]"
  $PY -m benchmarks.quality --prompts 96 --seeds 2 --out $R/i2v_teacher_guide_interval \
      --config "$I:infer_steps=40" --config "$I:infer_steps=40,sample_guide_interval=[300,850]"
  no_interval
  $PY -m benchmarks.quality --prompts 96 --seeds 2 --out $R/t2v_dmd_guide_interval \
      --config "$S:model_path=runs/student_no_interval" --config $S
  $PY -m benchmarks.quality --prompts 96 --seeds 2 --out $R/t2v_lora_mode_guide_interval \
      --config "$L:lora_configs=[{\"path\":\"runs/lora_mode_no_interval_r64.safetensors\",\"strength\":1.0}]" --config $L
  $PY -m benchmarks.quality --prompts 96 --seeds 2 --out $R/i2v_dmd_guide_interval \
      --config configs/infer/tiny/i2v_distill_4step.json:model_path=runs/i2v_student_no_interval \
      --config configs/infer/tiny/i2v_distill_4step.json
}

# One DMD variant of the sweep: name, config, overrides. Trains under runs/sweep/<name> (resumable) and exports
# the (EMA) student to runs/sweep/<name>/model in bf16 (LoRA mode: the adapters merged into the teacher).
variant() {
  local name=$1 config=$2; shift 2
  mkdir -p runs/sweep/logs
  timeout "$STAGE_TIMEOUT" $LAUNCH train.py --config "$config" run_dir=runs/sweep/$name output_model=null \
      logging.sample_every=0 "$@" $EXTRA > runs/sweep/logs/$name.log 2>&1 || echo "$name: train exit $?"
  $PY -m distill.export --run runs/sweep/$name --out runs/sweep/$name/model --dtype bf16 >> runs/sweep/logs/$name.log \
      2>&1 || echo "$name: export failed (runs/sweep/logs/$name.log)"
}

SWEEP="dmd_teacher_lr3e-5 dmd_teacher_lr1e-4 dmd_ode_lr3e-5 dmd_ode_lr1e-4 lora_lr1e-4 lora_lr3e-4"
sweep_variant() {  # the sweep's variants by name (generator init x learning rate; LoRA mode x learning rate)
  local D=configs/train/tiny/t2v_dmd.yaml L=configs/train/tiny/t2v_dmd_lora.yaml ODE=model.generator_init=runs/tiny_t2v_ode/model
  case "$1" in
    dmd_teacher_lr3e-5) variant "$1" $D optim.lr=3e-5 dmd.lr_critic=3e-5 max_steps=1500 ;;
    dmd_teacher_lr1e-4) variant "$1" $D optim.lr=1e-4 dmd.lr_critic=1e-4 max_steps=1500 ;;
    dmd_ode_lr3e-5) variant "$1" $D $ODE optim.lr=3e-5 dmd.lr_critic=3e-5 max_steps=1750 ;;
    dmd_ode_lr1e-4) variant "$1" $D $ODE optim.lr=1e-4 dmd.lr_critic=1e-4 max_steps=1750 ;;
    lora_lr1e-4) variant "$1" $L optim.lr=1e-4 dmd.lr_critic=1e-4 max_steps=1250 ;;
    lora_lr3e-4) variant "$1" $L optim.lr=3e-4 dmd.lr_critic=3e-4 max_steps=1250 ;;
    *) echo "unknown sweep variant $1" >&2; return 2 ;;
  esac
}

ode() { [ -f runs/tiny_t2v_ode/model/config.json ] || timeout "$STAGE_TIMEOUT" $LAUNCH train.py \
          --config configs/train/tiny/t2v_ode.yaml $EXTRA > runs/sweep/logs/ode.log 2>&1 || echo "ode: exit $?"; }

sweep_table() {  # every variant's student next to the teacher's rows: benchmarks/results/t2v_dmd_sweep.{md,json,png}
  T=configs/infer/tiny/t2v_teacher.json S=configs/infer/tiny/t2v_distill_4step.json
  args=(--config $T --config "$T:infer_steps=4,enable_cfg=false")
  for v in $SWEEP; do [ -d runs/sweep/$v/model ] && args+=(--config "$S:model_path=runs/sweep/$v/model"); done
  $PY -m benchmarks.quality $QUALITY --out $R/t2v_dmd_sweep "${args[@]}"
}

sweep() {  # one after another (CPU); `lanes` runs them side by side
  mkdir -p runs/sweep/logs; ode
  for v in $SWEEP; do sweep_variant "$v"; done
  sweep_table
}

lanes() {  # everything after the T2V teacher, side by side: I2V teacher -> I2V student | ODE -> sweep variants
  mkdir -p runs/sweep/logs
  ( i2v_teacher > runs/sweep/logs/i2v_teacher.log 2>&1; i2v_student > runs/sweep/logs/i2v_student.log 2>&1 ) &
  for v in $SWEEP; do case $v in *ode*) ;; *) sweep_variant "$v" & ;; esac; done
  ode; for v in $SWEEP; do case $v in *ode*) sweep_variant "$v" & ;; esac; done
  wait
  sweep_table; i2v_table
}

# Fewer steps as a config: the shipped T2V recipe (ODE init, then DMD) with only the student's step list changed.
# The students go to runs/few_steps/<n>step/model (bf16, with schedule.json); they are not tracked (docs/results.md).
FEW_STEPS=${FEW_STEPS:-"2:[1000,500] 1:[1000]"}
FEW_STEPS_BANK=${FEW_STEPS_BANK:-512}  # trajectories (the 4-step recipe: 1024; halved to fit a 2-core CPU session)
# The first student's trajectory bank serves the others (their sigmas are a sub-list of its: distill/ode.py).
few_step_student() {  # n, step list, trajectory bank (default: its own)
  local n=$1 steps=$2 D=runs/few_steps/${1}step
  local bank=${3:-$D-ode/trajectories}
  mkdir -p runs/few_steps/logs
  [ -f $D-ode/model/config.json ] || $LAUNCH train.py --config configs/train/tiny/t2v_ode.yaml run_dir=$D-ode \
      ode.trajectories=$bank ode.num_trajectories=$FEW_STEPS_BANK "distill.denoising_step_list=$steps" $EXTRA
  $LAUNCH train.py --config configs/train/tiny/t2v_dmd.yaml run_dir=$D-dmd model.generator_init=$D-ode/model \
      "distill.denoising_step_list=$steps" logging.sample_every=0 $EXTRA
  $PY -m distill.export --run $D-dmd --out $D/model --dtype bf16
}

few_steps_table() {  # teacher, 4-step shipped student, 2- and 1-step students: quality, then speed side by side
  T=configs/infer/tiny/t2v_teacher.json S=configs/infer/tiny/t2v_distill_4step.json
  args=(--config $T --config $S)
  for spec in $FEW_STEPS; do args+=(--config "$S:model_path=runs/few_steps/${spec%%:*}step/model"); done
  $PY -m benchmarks.quality --prompts 96 --seeds 2 --out $R/t2v_few_steps "${args[@]}"
  $PY -m benchmarks.speed --repeats 5 --out $R/t2v_few_steps_speed "${args[@]}"
}

few_steps() {  # one student after another (the first one's bank serves the next)
  mkdir -p runs/few_steps/logs
  local bank=""
  for spec in $FEW_STEPS; do
    few_step_student "${spec%%:*}" "${spec#*:}" $bank > runs/few_steps/logs/${spec%%:*}step.log 2>&1 \
      || { echo "${spec%%:*}-step student failed: runs/few_steps/logs/${spec%%:*}step.log" >&2; return 1; }
    bank=${bank:-runs/few_steps/${spec%%:*}step-ode/trajectories}
  done
  few_steps_table
}

# Two-expert (Wan2.2 A14B-style) tiny world (docs/moe_distillation.md): the T2V teacher fine-tuned into a high-noise
# expert (t >= 875) and a low-noise expert (t < 875), side by side, assembled as checkpoints/tiny-t2v-moe-teacher
# (not tracked); then DMD into a two-expert 4-step student and into one student from the same teacher; the table.
MOE=runs/moe
moe_teacher() {
  mkdir -p $MOE/logs
  for side in high low; do
    ( timeout "$STAGE_TIMEOUT" $LAUNCH train.py --config configs/train/tiny/t2v_moe_$side.yaml num_threads=1 $EXTRA "$@" \
        > $MOE/logs/teacher_$side.log 2>&1 || echo "$side expert: train exit $?" ) &
  done
  wait
  for side in high low; do
    $PY -m distill.export --run runs/tiny_t2v_moe_$side --out runs/tiny_t2v_moe_$side/model --dtype bf16
  done
  $PY -m distill.moe assemble --high runs/tiny_t2v_moe_high/model --low runs/tiny_t2v_moe_low/model --boundary 0.875 \
      --out checkpoints/tiny-t2v-moe-teacher
}

moe_students() {  # side by side: the two-expert student (+ its rank-64 LoRAs) | one student (dmd.generator=shared)
  mkdir -p $MOE/logs
  local D=configs/train/tiny/t2v_moe_dmd.yaml N="logging.sample_every=0 num_threads=1"
  ( timeout "$STAGE_TIMEOUT" $LAUNCH train.py --config $D $N $EXTRA "$@" > $MOE/logs/dmd_2experts.log 2>&1 \
      || echo "two-expert DMD: train exit $?" ) &
  ( timeout "$STAGE_TIMEOUT" $LAUNCH train.py --config $D run_dir=runs/tiny_t2v_moe_dmd_shared dmd.generator=shared $N \
      $EXTRA "$@" > $MOE/logs/dmd_shared.log 2>&1 || echo "shared-generator DMD: train exit $?" ) &
  wait
  $PY -m distill.export --run runs/tiny_t2v_moe_dmd --out $MOE/student_2experts --dtype bf16 \
      --lora $MOE/student_2experts/loras --lora-rank 64 --lora-min-numel 32768
  $PY -m distill.export --run runs/tiny_t2v_moe_dmd_shared --out $MOE/student_shared --dtype bf16
}

moe_critic_shared() {  # the critic layout measured: the two-expert student with ONE critic (dmd.critic=shared)
  mkdir -p $MOE/logs
  timeout "$STAGE_TIMEOUT" $LAUNCH train.py --config configs/train/tiny/t2v_moe_dmd.yaml \
      run_dir=runs/tiny_t2v_moe_dmd_critic_shared dmd.critic=shared logging.sample_every=0 num_threads=1 $EXTRA "$@" \
      > $MOE/logs/dmd_critic_shared.log 2>&1 || echo "critic-shared DMD: train exit $?"
  $PY -m distill.export --run runs/tiny_t2v_moe_dmd_critic_shared --out $MOE/student_critic_shared --dtype bf16
}

moe_table() {  # two-expert teacher, its 4 steps without CFG, the two-expert student, one student from the same teacher
  local T=configs/infer/tiny/t2v_teacher.json S=configs/infer/tiny/t2v_distill_4step.json
  $PY -m benchmarks.quality $QUALITY --out $R/t2v_moe \
      --config "$T:model_path=checkpoints/tiny-t2v-moe-teacher,model_cls=wan2.2_moe,boundary=0.875" \
      --config "$T:model_path=checkpoints/tiny-t2v-moe-teacher,model_cls=wan2.2_moe,boundary=0.875,infer_steps=4,enable_cfg=false" \
      --config "$S:model_path=$MOE/student_2experts,model_cls=wan2.2_moe,boundary=0.875" \
      --config "$S:model_path=$MOE/student_shared" \
      --config "$S:model_path=$MOE/student_critic_shared,model_cls=wan2.2_moe,boundary=0.875"
}

moe() { moe_teacher; moe_students; moe_critic_shared; moe_table; }

stage=${1:-all}; shift || true
case "$stage" in
  all) components; t2v_teacher; i2v_teacher; t2v_student; t2v_lora_mode; i2v_student; tables ;;
  components|t2v_teacher|i2v_teacher|t2v_student|no_interval|t2v_lora_mode|i2v_student|tables|guide_interval|sweep|sweep_table|i2v_table|lanes|teacher_probes|few_steps|few_steps_table|few_step_student|moe_teacher|moe_students|moe_critic_shared|moe_table|moe) "$stage" "$@" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
