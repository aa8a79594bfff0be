#!/usr/bin/env bash
# T2V teacher variants side by side (a GPU machine runs them at once; on a CPU run them one by one), each the
# full configs/train/tiny/t2v_teacher.yaml recipe with one change, then one quality table against each other:
#   base          byte tokenizer, PCA codec with one global latent std (the recipe before this sweep)
#   word          word-level tokenizer (one token per word, like umT5's SentencePiece vocabulary)
#   channel       codec latent normalised per channel (Wan's per-channel mean/std)
#   word_channel  both
#     OUT=runs/tsweep STAGE_TIMEOUT=420 bash scripts/teacher_sweep.sh [variant ...]
# Writes benchmarks/results/t2v_teacher_sweep.{md,json,png} and copies each variant's EMA DiT to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PY=${PY:-.venv/bin/python} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-runs/tsweep/out}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-0}
QUALITY=${QUALITY:-"--prompts 96 --seeds 2"}
VARIANTS=${*:-"base word channel word_channel"}
mkdir -p "$OUT" runs/tsweep/logs

components_args() {
  case "$1" in
    base) echo "--tokenizer byte --normalize global" ;;
    word) echo "--tokenizer word --normalize global" ;;
    channel) echo "--tokenizer byte --normalize channel" ;;
    word_channel) echo "--tokenizer word --normalize channel" ;;
    *) echo "unknown variant $1" >&2; return 2 ;;
  esac
}

variant() {
  local name=$1 d=runs/tsweep/$1
  $PY -m scripts.make_tiny_components --out $d/components $(components_args "$name") || return
  timeout "$STAGE_TIMEOUT" $PY train.py --config configs/train/tiny/t2v_teacher.yaml run_dir=$d output_model=null \
      model.components_path=$d/components logging.sample_prompts=[] ${EXTRA:-} || echo "$name: train exit $?"
  $PY -m distill.export --run $d --out $d/model --dtype bf16 || echo "$name: export failed"
}

start=$(date +%s)
for v in $VARIANTS; do variant "$v" > runs/tsweep/logs/$v.log 2>&1 & done
wait
echo "training: $(( $(date +%s) - start )) s"
args=()
for v in $VARIANTS; do
  [ -f runs/tsweep/$v/model/config.json ] || continue
  args+=(--config "configs/infer/tiny/t2v_teacher.json:model_path=runs/tsweep/$v/model")
  cp runs/tsweep/$v/model/diffusion_pytorch_model.safetensors "$OUT/$v.safetensors"
  tail -n 1 runs/tsweep/$v/metrics.jsonl
done
$PY -m benchmarks.quality $QUALITY --out benchmarks/results/t2v_teacher_sweep "${args[@]}"
cp benchmarks/results/t2v_teacher_sweep.* "$OUT/"
echo "total: $(( $(date +%s) - start )) s"
