#!/usr/bin/env bash
# Single-GPU check of the sharded DMD engines (distill/engines.py): the CUDA / NCCL code paths that the CPU tests
# (tests/test_engines.py, 2 gloo processes) cannot reach: meta-device init + broadcast on cuda, FSDP2 mixed
# precision, DeepSpeed bf16. One process per engine on the tiny random teacher (models.components.make_tiny_model):
#   fp32: losses of every engine == plain single-process DDP (rtol 1e-3), consolidated EMA == exported student;
#   bf16: every engine runs 4 steps with finite losses.
#     bash scripts/gpu_engines_check.sh            # ~2-4 min on one H100; prints PASS/FAIL per engine
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-runs/gpu_engines}
rm -rf "$OUT" && mkdir -p "$OUT"
export PYTHONPATH=$PWD OMP_NUM_THREADS=4
"$PY" -c "import torch, deepspeed, accelerate; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'accelerate', accelerate.__version__, \
torch.cuda.get_device_name())"
"$PY" - "$OUT" <<'PYEOF'
import sys
from pathlib import Path
from models.components import make_tiny_model
make_tiny_model(Path(sys.argv[1]) / "teacher", "tiny-t2v", seed=0, dim=64, ffn_dim=128, num_heads=2, num_layers=2)
PYEOF
run() {  # run ENGINE PRECISION
  local engine=$1 mp=$2 dir="$OUT/$1_$2" port=$((29500 + RANDOM % 1000))
  local args=(--config configs/train/tiny/t2v_dmd.yaml "model.path=$OUT/teacher" max_steps=4 dmd.dfake_gen_update_ratio=2
              dmd.ema_start=1 optim.lr=1e-3 dmd.lr_critic=1e-3 data.num_frames=5 data.height=32 data.width=32
              batch_size=2 logging.every=1 "logging.sample_prompts=[]" checkpoint.every=2 "mixed_precision=$mp"
              "run_dir=$dir" "output_model=$dir/model")
  if [ "$engine" = ddp ]; then
    "$PY" train.py "${args[@]}" > "$dir.log" 2>&1
  else
    "$PY" -m accelerate.commands.launch --config_file "configs/accelerate/$engine.yaml" --num_processes 1 \
      --num_machines 1 --mixed_precision "$mp" --main_process_port "$port" train.py "${args[@]}" > "$dir.log" 2>&1
  fi
}
status=0
for mp in no bf16; do
  for engine in ddp fsdp hybrid zero2 zero3; do
    if run "$engine" "$mp"; then
      if "$PY" - "$OUT" "$engine" "$mp" <<'PYEOF'
import json, math, subprocess, sys
from pathlib import Path
import torch
from models.components import load_dit
out, engine, mp = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
rows = lambda d: {r["step"]: r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())}
mine = rows(out / f"{engine}_{mp}")
assert sorted(mine) == [1, 2, 3, 4], sorted(mine)
for r in mine.values():
    assert math.isfinite(r["critic_loss"]), r
if mp == "no" and engine != "ddp":
    ref = rows(out / "ddp_no")
    for s in ref:
        for k in ("generator_loss", "critic_loss", "critic_grad_norm"):
            if k in ref[s]:
                assert math.isclose(ref[s][k], mine[s][k], rel_tol=1e-3, abs_tol=1e-7), (s, k, ref[s][k], mine[s][k])
    run = out / f"{engine}_{mp}"
    cons = run / "consolidated"
    subprocess.run([sys.executable, "-m", "distill.engines", "consolidate", str(run / "checkpoints/step_00000004"),
                    "--out", str(cons)], check=True, capture_output=True)
    ema = load_dit(out / "teacher", explicit=str(cons / "ema.safetensors")).state_dict()
    exported = load_dit(run / "model", distill=True).state_dict()
    for k, v in exported.items():
        torch.testing.assert_close(v.float(), ema[k], rtol=1e-5, atol=1e-6)
PYEOF
      then echo "PASS $engine mixed_precision=$mp"; else echo "FAIL $engine mixed_precision=$mp (checks)"; status=1; fi
    else
      echo "FAIL $engine mixed_precision=$mp (run; see $OUT/${engine}_$mp.log)"; tail -20 "$OUT/${engine}_$mp.log"; status=1
    fi
  done
done
exit $status
