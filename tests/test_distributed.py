"""Two-process data parallel training on the CPU (DDP over gloo) through the real launcher:

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        --main_process_port PORT train.py --config ... batch_size=2

equals one process at the same global batch (batch_size=2 grad_accum=2): every sample (video / prompt, noise,
timestep, exit step) is keyed by its chunk's index within the step, so the two layouts see identical inputs; DDP
averages the ranks' gradients where accumulation sums the halves; logged metrics are averaged over the ranks.
(batch_size=4 grad_accum=1 sees the same videos too, but draws its noise for the 4 samples from one generator:
equal in distribution only.) A loss that is non-finite on one rank only skips the step on both (no hang).

Runs on a CPU without CUDA: train.py's Trainer asks accelerate for gloo when launched with WORLD_SIZE > 1 and no
CUDA (accelerate's own `--cpu` flag would start a single process). About 40 s on a busy 2-core CPU.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = REPO / "checkpoints" / "tiny-components"
SMALL = ["data.num_frames=5", "data.height=32", "data.width=32", "num_threads=1", "logging.every=1",
         "logging.sample_prompts=[]", "checkpoint.every=100", "batch_size=2"]
TIMEOUT = 300


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], nproc: int, tmp: Path, script: str = "train.py",
           config_file: Path | None = None) -> subprocess.CompletedProcess:
    """Run `script args` in one process, or in `nproc` through `accelerate launch --multi_gpu` (or with an
    accelerate `config_file`, e.g. configs/accelerate/fsdp.yaml)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", HF_HOME=str(tmp / "hf_home"), PYTHONPATH=str(REPO))  # no user accelerate config
    if nproc == 1 and config_file is None:
        cmd = [sys.executable, script, *args]
    else:
        how = ["--config_file", str(config_file)] if config_file else ["--multi_gpu", "--dynamo_backend", "no"]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", str(free_port()),
               script, *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers (our own process group)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} timed out after {TIMEOUT} s (a rank waiting on the other?)\n{out[-4000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{out[-6000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def metrics(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"steps logged more than once (every rank logging?): {steps}"
    return {r["step"]: r for r in rows}


def assert_close_runs(one: Path, two: Path, keys: list[str], rtol: float = 1e-5) -> None:
    m1, m2 = metrics(one), metrics(two)
    assert sorted(m1) == sorted(m2)
    for step in m1:
        for k in keys:
            assert (k in m1[step]) == (k in m2[step]), (step, k)
            if k in m1[step]:
                assert math.isclose(m1[step][k], m2[step][k], rel_tol=rtol, abs_tol=1e-9), \
                    (step, k, m1[step][k], m2[step][k])
    c1, c2 = sorted((one / "checkpoints").iterdir()), sorted((two / "checkpoints").iterdir())
    assert [p.name for p in c1] == [p.name for p in c2]
    for f in sorted(c1[-1].glob("*.safetensors")):
        a, b = load_file(str(f)), load_file(str(c2[-1] / f.name))
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=f"{f.name}:{k}")


def test_pretrain_two_processes_equal_one_with_accumulation(tmp_path):
    base = ["task=pretrain", f"model.components_path={COMPONENTS}", "max_steps=3", "optim.warmup_steps=2", *SMALL]
    one, two = tmp_path / "one", tmp_path / "two"
    launch([*base, f"run_dir={one}", f"output_model={one}/model", "grad_accum=2"], 1, tmp_path)
    out = launch([*base, f"run_dir={two}", f"output_model={two}/model"], 2, tmp_path)
    assert "model written to" in out.stdout
    assert_close_runs(one, two, ["loss", "grad_norm", "lr"])
    assert (two / "events.log").read_text().count("checkpoint written") == 1
    assert (two / "model" / "diffusion_pytorch_model.safetensors").is_file()


def test_dmd_two_processes_equal_one_with_accumulation(tmp_path, tiny_t2v_dir):
    base = ["--config", "configs/train/tiny/t2v_dmd.yaml", f"model.path={tiny_t2v_dir}", "max_steps=4",
            "dmd.dfake_gen_update_ratio=2", "dmd.ema_start=1", *SMALL]
    one, two = tmp_path / "one", tmp_path / "two"
    launch([*base, f"run_dir={one}", f"output_model={one}/model", "grad_accum=2"], 1, tmp_path)
    launch([*base, f"run_dir={two}", f"output_model={two}/model"], 2, tmp_path)
    # exit_step is averaged over the ranks: equal to the single process' only if both ranks drew the same
    assert_close_runs(one, two, ["generator_loss", "critic_loss", "generator_grad_norm", "critic_grad_norm",
                                 "exit_step", "lr_generator"])
    assert [s for s, r in metrics(two).items() if "generator_loss" in r] == [1, 3]
    assert (two / "model" / "distill_models" / "distill_model.safetensors").is_file()


def test_nonfinite_on_one_rank_skips_the_step_on_all(tmp_path):
    """A NaN loss on rank 1 only (step 2): both ranks skip the update (a lone skip would hang DDP's all-reduce)."""
    script = tmp_path / "nan_on_rank1.py"
    script.write_text(
        "import os, sys\n"
        "import distill.pretrain as pretrain\n"
        "real, calls = pretrain.flow_matching_loss, [0]\n"
        "def patched(*a, **k):\n"
        "    calls[0] += 1\n"
        "    loss = real(*a, **k)\n"
        "    return loss * float('nan') if os.environ.get('RANK') == '1' and calls[0] == 2 else loss\n"
        "pretrain.flow_matching_loss = patched\n"
        "from train import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    run = tmp_path / "run"
    launch(["task=pretrain", f"model.components_path={COMPONENTS}", "max_steps=3", *SMALL, f"run_dir={run}",
            f"output_model={run}/model"], 2, tmp_path, script=str(script))
    m = metrics(run)
    assert m[2]["skipped"] == 1.0 and "loss" not in m[2]
    assert math.isfinite(m[1]["loss"]) and math.isfinite(m[3]["loss"])
    assert "non-finite flow matching loss" in (run / "events.log").read_text()
