#!/usr/bin/env bash
# Rehearsal of the README's real-model commands on mini Wan2.1 folders (models/mini.py), on the CPU.
#
#   bash scripts/rehearse.sh [WORK_DIR]        # or: make rehearse
#
# Every step runs the same entry points a 14B user runs (infer.py, train.py, accelerate launch, distill.export,
# inference.quant, inference.server) with the shipped real configs (configs/infer/wan,
# configs/train/wan, configs/accelerate) as they are; only the model path, data paths, video size, step
# counts and (for the quantized run) the quantization keys of the README are overridden. Inference configs are
# copied to WORK_DIR/configs with those keys replaced (infer.py takes sizes from the config only).
# A failing step is logged (WORK_DIR/logs/<step>.log) and the rehearsal goes on; the summary lists every step
# with its time, and the exit status is 1 when any step failed. REHEARSE_ONLY=<regex> re-runs the matching steps
# in an existing WORK_DIR.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${1:-$(mktemp -d -t rehearse.XXXXXX)}
WORK=$(mkdir -p "$WORK" && cd "$WORK" && pwd)
mkdir -p "$WORK/logs" "$WORK/configs" "$WORK/out"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} WANDB_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
SIZE=(data.num_frames=5 data.height=32 data.width=32)
RESULTS=()
FAILED=0

ONLY=${REHEARSE_ONLY:-}  # a regex: run only the matching steps (re-running part of a rehearsal in the same WORK_DIR)

step() {  # step NAME CMD...: run, log, record PASS/FAIL and seconds
  local name=$1; shift
  local t0=$SECONDS
  if [ -n "$ONLY" ] && ! [[ $name =~ $ONLY ]]; then return 0; fi
  if "$@" >"$WORK/logs/$name.log" 2>&1; then
    RESULTS+=("PASS  $(printf '%4d' $((SECONDS - t0)))s  $name")
  else
    RESULTS+=("FAIL  $(printf '%4d' $((SECONDS - t0)))s  $name   (log: $WORK/logs/$name.log)")
    FAILED=1
  fi
  echo "${RESULTS[-1]}"
}

derive() {  # derive SRC OUT key=json ...: a copy of a shipped inference config with the named keys replaced
  "$PY" - "$@" <<'EOF'
import json, sys
src, out, *pairs = sys.argv[1:]
cfg = json.load(open(src))
for pair in pairs:
    key, value = pair.split("=", 1)
    cfg[key] = json.loads(value)
json.dump(cfg, open(out, "w"), indent=2)
EOF
}

infer() { "$PY" infer.py "$@"; }
mini() { "$PY" -m scripts.make_mini_wan "$@"; }

# ---- mini folders -------------------------------------------------------------------------------------------
M=$WORK/models
step mini_t2v_official mini --task t2v --layout official --out "$M/t2v"
step mini_t2v_official_sharded mini --task t2v --layout official --sharded --out "$M/t2v_sharded"
step mini_i2v_official mini --task i2v --layout official --out "$M/i2v"
step mini_t2v_diffusers mini --task t2v --layout diffusers --out "$M/t2v_diffusers"
step mini_i2v_diffusers mini --task i2v --layout diffusers --out "$M/i2v_diffusers"

# inputs: a start image, a prompt file, I2V image/prompt pairs
"$PY" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image
work = Path(sys.argv[1])
rng = np.random.default_rng(0)
for i in range(2):
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(work / f"image{i}.png")
prompts = ["A cat walks on the grass, realistic style.", "A drone shot of waves crashing against cliffs.",
           "a red circle moving left", "a blue square moving up"]
(work / "prompts.txt").write_text("\n".join(prompts) + "\n")
rows = [{"prompt": p, "image": f"image{i % 2}.png"} for i, p in enumerate(prompts)]
(work / "i2v_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
EOF

SMALL=('target_video_length=5' 'target_height=32' 'target_width=32')
C=$WORK/configs
derive configs/infer/wan/wan_t2v.json "$C/wan_t2v.json" "${SMALL[@]}" infer_steps=4
derive configs/infer/wan/wan_i2v.json "$C/wan_i2v.json" "${SMALL[@]}" infer_steps=4
derive configs/infer/wan/wan_t2v_distill_4step_cfg.json "$C/t2v_distill.json" "${SMALL[@]}"
derive configs/infer/wan/wan_i2v_distill_4step_cfg.json "$C/i2v_distill.json" "${SMALL[@]}"
derive configs/infer/wan/wan_t2v_distill_4step_cfg.json "$C/t2v_distill_int8.json" "${SMALL[@]}" \
  dit_quantized=true 'dit_quant_scheme="int8"'
derive configs/infer/wan/wan_t2v_distill_4step_cfg.json "$C/t2v_distill_fp8.json" "${SMALL[@]}" \
  dit_quantized=true 'dit_quant_scheme="fp8"'
O=$WORK/out
P="a red circle moving left"

# ---- teacher inference (configs/infer/wan) ----------------------------------------------------------------------
step infer_t2v_teacher infer --config "$C/wan_t2v.json" --model_path "$M/t2v" --prompt "$P" --save_result_path "$O/t2v.mp4"
step infer_t2v_teacher_sharded infer --config "$C/wan_t2v.json" --model_path "$M/t2v_sharded" --prompt "$P" \
  --save_result_path "$O/t2v_sharded.mp4"
step infer_t2v_teacher_diffusers infer --config "$C/wan_t2v.json" --model_path "$M/t2v_diffusers" \
  --prompt_file "$WORK/prompts.txt" --output_dir "$O/t2v_diffusers" --format npy
step infer_i2v_teacher infer --config "$C/wan_i2v.json" --model_path "$M/i2v" --image_path "$WORK/image0.png" \
  --prompt "$P" --save_result_path "$O/i2v.mp4"
step infer_i2v_teacher_diffusers infer --config "$C/wan_i2v.json" --model_path "$M/i2v_diffusers" \
  --image_path "$WORK/image0.png" --prompt "$P" --save_result_path "$O/i2v_diffusers.mp4"

# ---- training: ODE init -> DMD (sampling on) -> export (full DiT + rank-64 LoRA) ---------------------------
R=$WORK/runs
T2V_YAML=configs/train/wan/t2v_1.3b_dmd.yaml
T2V_STORE=data.text_store=$R/t2v_store
I2V_STORE=data.text_store=$R/i2v_store
# the YAML headers' step 1: the prompt store, encoded by all processes
step encode_prompts_torchrun "$PY" -m torch.distributed.run --nproc_per_node 2 -m distill.encode_prompts \
  --config $T2V_YAML model.path="$M/t2v" data.prompt_path="$WORK/prompts.txt" "$T2V_STORE"
step train_t2v_ode "$PY" train.py --config $T2V_YAML task=ode run_dir="$R/ode" model.path="$M/t2v" \
  data.prompt_path="$WORK/prompts.txt" "$T2V_STORE" "${SIZE[@]}" max_steps=2 grad_accum=1 output_model="$R/ode/model" \
  ode.trajectories="$R/ode/trajectories" ode.num_trajectories=4 ode.teacher_steps=4 ode.shard_size=2 \
  logging.sample_every=1 logging.sample_steps=4
step train_t2v_dmd "$PY" train.py --config $T2V_YAML run_dir="$R/dmd" model.path="$M/t2v" \
  model.generator_init="$R/ode/model" data.prompt_path="$WORK/prompts.txt" "$T2V_STORE" "${SIZE[@]}" max_steps=3 grad_accum=2 \
  dmd.dfake_gen_update_ratio=2 output_model="$R/dmd/model" logging.sample_every=2 logging.sample_steps=4
step export_full_and_lora "$PY" -m distill.export --run "$R/dmd" --out "$R/export" \
  --lora "$R/export_lora_r64.safetensors" --lora-rank 64 --lora-min-numel 1000

# ---- distilled inference (configs/infer/wan): full DiT in distill_models/, LoRA, int8, fp8 ----------------------
step infer_t2v_distill_export infer --config "$C/t2v_distill.json" --model_path "$R/export" --prompt "$P" \
  --save_result_path "$O/t2v_distill.mp4"
step infer_t2v_distill_model_cls infer --config "$C/t2v_distill.json" --model_path "$R/export" \
  --model_cls wan2.1_distill --prompt "$P" --save_result_path "$O/t2v_distill_cls.mp4"
step infer_t2v_distill_lora infer --config "$C/t2v_distill.json" --model_path "$M/t2v" \
  --lora_path "$R/export_lora_r64.safetensors" --lora_strength 1.0 --prompt "$P" --save_result_path "$O/t2v_lora.mp4"
# the distilled export quantized (writes distill_int8/, distill_fp8/), and the README's LoRA-merge route on the
# base folder (writes int8/, fp8/)
step quant_int8_export "$PY" -m inference.quant --model_path "$R/export" --scheme int8
step quant_fp8_export "$PY" -m inference.quant --model_path "$R/export" --scheme fp8
step infer_t2v_int8_export infer --config "$C/t2v_distill_int8.json" --model_path "$R/export" --prompt "$P" \
  --save_result_path "$O/t2v_int8_export.mp4"
step infer_t2v_fp8_export infer --config "$C/t2v_distill_fp8.json" --model_path "$R/export" --prompt "$P" \
  --save_result_path "$O/t2v_fp8_export.mp4"
[ -d "$M/t2v_quant" ] || cp -r "$M/t2v" "$M/t2v_quant"
step quant_int8_with_lora "$PY" -m inference.quant --model_path "$M/t2v_quant" --scheme int8 \
  --lora "$R/export_lora_r64.safetensors" --lora_strength 1.0
step quant_fp8_with_lora "$PY" -m inference.quant --model_path "$M/t2v_quant" --scheme fp8 \
  --lora "$R/export_lora_r64.safetensors" --lora_strength 1.0
step infer_t2v_int8 infer --config "$C/t2v_distill_int8.json" --model_path "$M/t2v_quant" --prompt "$P" \
  --save_result_path "$O/t2v_int8.mp4"
step infer_t2v_fp8 infer --config "$C/t2v_distill_fp8.json" --model_path "$M/t2v_quant" --prompt "$P" \
  --save_result_path "$O/t2v_fp8.mp4"

# ---- I2V DMD from image/prompt pairs, then inference of its export ------------------------------------------
step train_i2v_dmd "$PY" train.py --config configs/train/wan/i2v_14b_480p_dmd.yaml run_dir="$R/i2v_dmd" \
  model.path="$M/i2v" data.prompt_path="$WORK/i2v_pairs.jsonl" "$I2V_STORE" "${SIZE[@]}" max_steps=2 grad_accum=1 \
  dmd.dfake_gen_update_ratio=1 output_model="$R/i2v_dmd/model" logging.sample_every=1 logging.sample_steps=4
step infer_i2v_distill_export infer --config "$C/i2v_distill.json" --model_path "$R/i2v_dmd/model" \
  --image_path "$WORK/image1.png" --prompt "$P" --save_result_path "$O/i2v_distill.mp4"

# ---- multi-process engines: accelerate launch, 2 gloo processes -------------------------------------------
launch() {  # launch ACCEL_CONFIG YAML MODEL PROMPTS STORE RUN_DIR [key=value ...]: 2 processes, as the YAML header
  local accel=$1 yaml=$2 model=$3 prompts=$4 store=$5 run=$6; shift 6
  "$PY" -m accelerate.commands.launch --config_file "$accel" --num_processes 2 --num_machines 1 \
    --mixed_precision no --main_process_port $((29500 + RANDOM % 1000)) train.py --config "$yaml" "$@" \
    run_dir="$run" model.path="$model" data.prompt_path="$prompts" "$store" "${SIZE[@]}" max_steps=2 \
    grad_accum=1 dmd.dfake_gen_update_ratio=1 output_model="$run/model" logging.sample_every=2 logging.sample_steps=4
}
step accelerate_zero2_t2v_1.3b launch configs/accelerate/zero2.yaml $T2V_YAML "$M/t2v" "$WORK/prompts.txt" \
  "$T2V_STORE" "$R/zero2"
step accelerate_fsdp_offload_t2v_14b_yaml launch configs/accelerate/fsdp.yaml configs/train/wan/t2v_14b_dmd.yaml \
  "$M/t2v_sharded" "$WORK/prompts.txt" data.text_store="$R/t2v_sharded_store" "$R/fsdp_t2v" distributed.cpu_offload=true
step accelerate_fsdp_offload_i2v_14b_yaml launch configs/accelerate/fsdp.yaml configs/train/wan/i2v_14b_480p_dmd.yaml \
  "$M/i2v" "$WORK/i2v_pairs.jsonl" "$I2V_STORE" "$R/fsdp_i2v" distributed.cpu_offload=true

# ---- the server answers one request on the distilled mini model --------------------------------------------
field() { "$PY" -c "import json, sys; d = json.load(sys.stdin); print(d.get('$1', d.get('${2:-$1}')))"; }
ask_one() {  # ask_one PORT: one request, wait for it, fetch the video
  local port=$1 id status i
  for i in $(seq 180); do curl -sf "localhost:$port/v1/service/status" >/dev/null && break; sleep 1; done
  id=$(curl -sf -X POST "localhost:$port/v1/tasks/video/" -H 'Content-Type: application/json' \
    -d "{\"prompt\": \"$P\", \"seed\": 1, \"save_result_path\": \"one.mp4\"}" | field task_id) || return 1
  for i in $(seq 180); do
    status=$(curl -sf "localhost:$port/v1/tasks/$id/status" | field task_status status)
    echo "task $id: $status"
    [ "$status" = completed ] && break
    [ "$status" = failed ] && return 1
    sleep 1
  done
  curl -sf -o "$O/server_result.mp4" "localhost:$port/v1/tasks/$id/result" && [ -s "$O/server_result.mp4" ]
}
serve_one() {
  local port=$((18000 + RANDOM % 1000)) pid rc
  rm -rf "$O/server"  # a re-run: the server refuses to overwrite an earlier result
  "$PY" -m inference.server --config "$C/t2v_distill.json" --model_path "$R/export" --port "$port" \
    --output_dir "$O/server" &
  pid=$!
  ask_one "$port"
  rc=$?
  kill "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  return $rc
}
step server_one_request serve_one

# ---- the web UI serves its page for the distilled I2V export --------------------------------------------------
webui_page() {
  local port=$((17000 + RANDOM % 1000)) pid rc=1 i
  mkdir -p "$WORK/loras" && cp "$R/export_lora_r64.safetensors" "$WORK/loras/" 2>/dev/null
  "$PY" -m inference.webui --config "$C/i2v_distill.json" --model_path "$R/i2v_dmd/model" --lora_dir "$WORK/loras" \
    --port "$port" --output_dir "$O/webui" &
  pid=$!
  for i in $(seq 180); do
    if curl -sf "http://127.0.0.1:$port/" | grep -qi gradio; then rc=0; break; fi
    sleep 1
  done
  kill "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  return $rc
}
step webui_page webui_page

# ---- the planner lines of the YAML headers (real sizes, no weights read) -------------------------------------
step plan_t2v_1.3b_ddp "$PY" train.py --config configs/train/wan/t2v_1.3b_dmd.yaml --dry-run --plan-gpus 8
step plan_t2v_14b_fsdp_offload "$PY" train.py --config configs/train/wan/t2v_14b_dmd.yaml --dry-run --plan-gpus 8 \
  --plan-engine fsdp --plan-offload
step plan_i2v_14b_fsdp_offload "$PY" train.py --config configs/train/wan/i2v_14b_480p_dmd.yaml --dry-run \
  --plan-gpus 8 --plan-engine fsdp --plan-offload

# ---- Wan2.2 A14B: two-expert mini folders and teacher inference (docs/wan22.md) -------------------------------
step mini_wan22_t2v_official mini --task t2v --moe --layout official --out "$M/wan22_t2v"
step mini_wan22_t2v_diffusers mini --task t2v --moe --layout diffusers --out "$M/wan22_t2v_diffusers"
step mini_wan22_i2v_official mini --task i2v --moe --layout official --sharded --out "$M/wan22_i2v"
step mini_wan22_i2v_diffusers mini --task i2v --moe --layout diffusers --out "$M/wan22_i2v_diffusers"
derive configs/infer/wan22/wan22_moe_t2v.json "$C/wan22_moe_t2v.json" "${SMALL[@]}" infer_steps=4
derive configs/infer/wan22/wan22_moe_i2v.json "$C/wan22_moe_i2v.json" "${SMALL[@]}" infer_steps=4
derive configs/infer/wan22/wan22_moe_t2v.json "$C/wan22_moe_t2v_offload.json" "${SMALL[@]}" infer_steps=4 \
  cpu_offload=true 'offload_granularity="model"'
step infer_wan22_t2v_teacher infer --config "$C/wan22_moe_t2v.json" --model_path "$M/wan22_t2v" --prompt "$P" \
  --save_result_path "$O/wan22_t2v.mp4"
step infer_wan22_t2v_teacher_diffusers infer --config "$C/wan22_moe_t2v.json" --model_path "$M/wan22_t2v_diffusers" \
  --prompt "$P" --save_result_path "$O/wan22_t2v_diffusers.mp4"
step infer_wan22_t2v_teacher_offload infer --config "$C/wan22_moe_t2v_offload.json" --model_path "$M/wan22_t2v" \
  --prompt "$P" --save_result_path "$O/wan22_t2v_offload.mp4"
step infer_wan22_i2v_teacher infer --config "$C/wan22_moe_i2v.json" --model_path "$M/wan22_i2v" \
  --image_path "$WORK/image0.png" --prompt "$P" --save_result_path "$O/wan22_i2v.mp4"
step infer_wan22_i2v_teacher_diffusers infer --config "$C/wan22_moe_i2v.json" --model_path "$M/wan22_i2v_diffusers" \
  --image_path "$WORK/image0.png" --prompt "$P" --save_result_path "$O/wan22_i2v_diffusers.mp4"
# a 4-step MoE student: the experts copied to distill_models/<expert>/distill_model.safetensors (LightX2V's path)
wan22_student() {
  local e
  rm -rf "$M/wan22_t2v_student" && cp -r "$M/wan22_t2v" "$M/wan22_t2v_student" || return 1
  for e in high_noise_model low_noise_model; do
    mkdir -p "$M/wan22_t2v_student/distill_models/$e" &&
      cp "$M/wan22_t2v/$e/diffusion_pytorch_model.safetensors" "$M/wan22_t2v_student/distill_models/$e/distill_model.safetensors" || return 1
  done
  infer --config "$C/wan22_moe_t2v_distill.json" --model_path "$M/wan22_t2v_student" --prompt "$P" \
    --save_result_path "$O/wan22_t2v_distill.mp4"
}
derive configs/infer/wan22/wan22_moe_t2v_distill_4step.json "$C/wan22_moe_t2v_distill.json" "${SMALL[@]}"
step infer_wan22_t2v_distill wan22_student
# two-expert DMD with the shipped A14B YAML and its launch line (FSDP2 + CPU offload, experts sharded), 2 processes,
# then the trained two-expert export with the shipped 4-step config
step accelerate_fsdp_offload_wan22_t2v_a14b_yaml launch configs/accelerate/fsdp.yaml \
  configs/train/wan/t2v_a14b_dmd.yaml "$M/wan22_t2v" "$WORK/prompts.txt" data.text_store="$R/wan22_t2v_store" \
  "$R/fsdp_wan22_t2v" distributed.cpu_offload=true
step infer_wan22_t2v_distill_export infer --config "$C/wan22_moe_t2v_distill.json" \
  --model_path "$R/fsdp_wan22_t2v/model" --prompt "$P" --save_result_path "$O/wan22_t2v_distill_export.mp4"
# I2V-A14B (experts with y and no CLIP) from image/prompt pairs, the same way, on the sharded official mini folder
step accelerate_fsdp_offload_wan22_i2v_a14b_yaml launch configs/accelerate/fsdp.yaml \
  configs/train/wan/i2v_a14b_dmd.yaml "$M/wan22_i2v" "$WORK/i2v_pairs.jsonl" data.text_store="$R/wan22_i2v_store" \
  "$R/fsdp_wan22_i2v" distributed.cpu_offload=true
derive configs/infer/wan22/wan22_moe_i2v_distill_4step.json "$C/wan22_moe_i2v_distill.json" "${SMALL[@]}"
step infer_wan22_i2v_distill_export infer --config "$C/wan22_moe_i2v_distill.json" \
  --model_path "$R/fsdp_wan22_i2v/model" --image_path "$WORK/image0.png" --prompt "$P" \
  --save_result_path "$O/wan22_i2v_distill_export.mp4"

# ---- Wan2.2 TI2V-5B: one mini folder (Wan2.2 VAE, ti2v DiT), T2V and I2V with the same weights (docs/wan22_ti2v.md)
step mini_wan22_ti2v "$PY" -m models.mini_ti2v --out "$M/wan22_ti2v"
derive configs/infer/wan22/wan22_ti2v_5b.json "$C/wan22_ti2v_5b.json" "${SMALL[@]}" infer_steps=4
step infer_wan22_ti2v_t2v infer --config "$C/wan22_ti2v_5b.json" --model_path "$M/wan22_ti2v" --prompt "$P" \
  --save_result_path "$O/wan22_ti2v_t2v.mp4"
step infer_wan22_ti2v_i2v infer --config "$C/wan22_ti2v_5b.json" --model_path "$M/wan22_ti2v" --task i2v \
  --image_path "$WORK/image0.png" --prompt "$P" --save_result_path "$O/wan22_ti2v_i2v.mp4"
# TI2V DMD with the shipped YAML (half the samples from their pair's image), then its export in both tasks
TI2V_SIZE=(data.num_frames=5 data.height=32 data.width=32)
step train_wan22_ti2v_dmd "$PY" train.py --config configs/train/wan/ti2v_5b_dmd.yaml run_dir="$R/ti2v_dmd" \
  model.path="$M/wan22_ti2v" data.prompt_path="$WORK/i2v_pairs.jsonl" data.text_store="$R/ti2v_store" \
  "${TI2V_SIZE[@]}" max_steps=2 grad_accum=1 dmd.dfake_gen_update_ratio=1 output_model="$R/ti2v_dmd/model" \
  logging.sample_every=1 logging.sample_steps=4
derive configs/infer/wan22/wan22_ti2v_5b_distill_4step.json "$C/wan22_ti2v_distill.json" "${SMALL[@]}"
step infer_wan22_ti2v_distill_t2v infer --config "$C/wan22_ti2v_distill.json" --model_path "$R/ti2v_dmd/model" \
  --prompt "$P" --save_result_path "$O/wan22_ti2v_distill_t2v.mp4"
step infer_wan22_ti2v_distill_i2v infer --config "$C/wan22_ti2v_distill.json" --model_path "$R/ti2v_dmd/model" \
  --task i2v --image_path "$WORK/image0.png" --prompt "$P" --save_result_path "$O/wan22_ti2v_distill_i2v.mp4"

echo
echo "rehearsal in $WORK ($SECONDS s):"
printf '%s\n' "${RESULTS[@]}"
exit $FAILED
