"""Sharded DMD engines (distill/engines.py) on the CPU: FSDP2 full / hybrid shard, DeepSpeed ZeRO-2 / ZeRO-3.

Each engine runs the tiny DMD config in two gloo processes through the real launcher and its accelerate config:

    accelerate launch --config_file configs/accelerate/<engine>.yaml --num_processes 2 train.py ...

and must give the losses, gradient norms and final weights (generator, critic, EMA) of ONE process with
grad_accum=2 (the same global batch, see tests/test_distributed.py); resuming from its step-2 checkpoint must
reproduce its steps 3-4; `python -m distill.engines consolidate` must turn the sharded checkpoint into
safetensors files equal to the single process' checkpoint, the EMA one loading with `load_dit` and equal to the
exported student. Fast tests cover the engine selection, validation, EMA shards and staged checkpoints.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from distill.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, staging_dir
from distill.config import load_train_config
from distill.ema import EMA
from distill.engine_deepspeed import chunk_bounds
from distill.engines import engine_from_launch, resolve_engine
from tests.test_distributed import SMALL, launch, metrics

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = REPO / "configs" / "accelerate"
KEYS = ["generator_loss", "critic_loss", "generator_grad_norm", "critic_grad_norm", "exit_step", "lr_generator"]
NETWORKS = ("generator", "critic", "ema")


# ---- fast: engine selection, validation, EMA shards, staged checkpoints -----------------------------------------
def launch_env(config: Path) -> dict[str, str]:
    """The engine variables `accelerate launch --config_file config` exports (accelerate/utils/launch.py)."""
    cfg = yaml.safe_load(config.read_text())
    if cfg["distributed_type"] == "FSDP":
        f = cfg["fsdp_config"]
        return {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": str(f["fsdp_version"]),
                "FSDP_SHARDING_STRATEGY": f["fsdp_sharding_strategy"],
                "FSDP_OFFLOAD_PARAMS": str(f["fsdp_offload_params"]).lower()}
    d = cfg["deepspeed_config"]
    return {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(d["zero_stage"]),
            "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": d["offload_optimizer_device"],
            "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": d["offload_param_device"]}


@pytest.mark.parametrize("name", ["fsdp", "hybrid", "zero2", "zero3"])
def test_accelerate_configs_name_their_engine(name):
    assert engine_from_launch(launch_env(ACCELERATE / f"{name}.yaml")) == name


@pytest.mark.parametrize("env, match", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "fsdp_version: 2"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, "FULL_SHARD"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, "offload"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}, "use 2 or 3"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, "offload"),
])
def test_unsupported_launch_settings_are_errors(env, match):
    with pytest.raises(ValueError, match=match):
        engine_from_launch(env)


def test_resolve_engine():
    zero3 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    assert resolve_engine("auto", {}) == "ddp"
    assert resolve_engine("auto", zero3) == "zero3"
    assert resolve_engine("fsdp", {}) == "fsdp"  # e.g. under plain torchrun
    assert resolve_engine("zero3", zero3) == "zero3"
    with pytest.raises(ValueError, match="distributed.engine=fsdp but the accelerate launch config asks for zero3"):
        resolve_engine("fsdp", zero3)


def test_config_validation(tiny_t2v_dir):
    dmd = [f"model.path={tiny_t2v_dir}", "task=dmd"]
    assert load_train_config(None, dmd).distributed.engine == "auto"
    assert load_train_config(None, [*dmd, "distributed.engine=zero3"]).distributed.engine == "zero3"
    with pytest.raises(ValueError, match="distributed.engine must be one of"):
        load_train_config(None, [*dmd, "distributed.engine=zero1"])
    from distill.config import SAMPLE_FORMATS
    from inference.video import FORMATS

    assert SAMPLE_FORMATS == FORMATS  # the config's copy of the writer's formats
    assert load_train_config(None, [*dmd, "logging.sample_format=npy"]).logging.sample_format == "npy"
    with pytest.raises(ValueError, match=r"logging.sample_format must be one of \['mp4', 'gif', 'npy'\], got 'avi'"):
        load_train_config(None, [*dmd, "logging.sample_format=avi"])
    with pytest.raises(ValueError, match="lora.enabled=True"):
        load_train_config(None, [*dmd, "distributed.engine=fsdp", "lora.enabled=true"])
    with pytest.raises(ValueError, match="task=pretrain"):
        load_train_config(None, ["task=pretrain", f"model.components_path={tiny_t2v_dir}",
                                 "distributed.engine=zero2"])


@pytest.mark.parametrize("numel, world", [(10, 2), (7, 3), (2, 4), (0, 2), (163, 8)])
def test_chunk_bounds_partition_the_tensor(numel, world):
    chunks = [chunk_bounds(numel, r, world) for r in range(world)]
    assert all(size == math.ceil(numel / world) for _, _, size in chunks)
    assert chunks[0][0] == 0 and chunks[-1][1] == numel
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))  # contiguous, no overlap


def test_ema_tracks_local_shards():
    """With `local`, the EMA holds (and averages) only this rank's chunk of each parameter."""
    net = torch.nn.Linear(5, 3)
    rank, world = 1, 2

    def local(p):
        lo, hi, _ = chunk_bounds(p.numel(), rank, world)
        return p.detach().view(-1)[lo:hi]

    ema = EMA(net, decay=0.5, start_step=0, local=local)
    assert {k: v.numel() for k, v in ema.state_dict().items()} == {"weight": 7, "bias": 1}
    before = {k: local(p).clone() for k, p in net.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net, step=1)
    for k, p in net.named_parameters():
        torch.testing.assert_close(ema.shadow[k], 0.5 * before[k] + 0.5 * local(p))


def test_staged_checkpoint_keeps_the_shards(tmp_path):
    root = tmp_path / "ckpt"
    tmp = staging_dir(root, 3, fresh=True)
    save_file({"x": torch.ones(2)}, str(tmp / "shard.safetensors"))  # what the ranks write
    path = save_checkpoint(root, 3, {}, {}, {"engine": "zero2"}, keep=2, staged=True)
    assert path == latest_checkpoint(root) and not tmp.exists()
    assert load_file(str(path / "shard.safetensors"))["x"].sum() == 2
    _, _, state = load_checkpoint(path, [])
    assert state == {"engine": "zero2", "step": 3}


# ---- slow: two processes per engine ------------------------------------------------------------------------------
def dmd_args(teacher: Path, run: Path, *extra: str) -> list[str]:
    # lr 1e-3 so that 4 steps move the weights visibly (the comparisons below are not between unchanged weights)
    return ["--config", "configs/train/tiny/t2v_dmd.yaml", f"model.path={teacher}", "max_steps=4",
            "dmd.dfake_gen_update_ratio=2", "dmd.ema_start=1", "optim.lr=1e-3", "dmd.lr_critic=1e-3", *SMALL,
            "checkpoint.every=2", f"run_dir={run}", f"output_model={run}/model", *extra]


def launch_engine(engine: str, args: list[str], tmp: Path) -> str:
    """`accelerate launch --config_file configs/accelerate/<engine>.yaml` with 2 processes here; the output."""
    return launch(args, 2, tmp, config_file=ACCELERATE / f"{engine}.yaml").stdout


def assert_same_metrics(a: Path, b: Path, steps: list[int], rtol: float) -> None:
    ma, mb = metrics(a), metrics(b)
    for step in steps:
        for k in KEYS:
            assert (k in ma[step]) == (k in mb[step]), (step, k)
            if k in ma[step]:
                assert math.isclose(ma[step][k], mb[step][k], rel_tol=rtol, abs_tol=1e-9), \
                    (step, k, ma[step][k], mb[step][k])


def assert_same_files(a: Path, b: Path, atol: float) -> None:
    for name in NETWORKS:
        sa, sb = load_file(str(a / f"{name}.safetensors")), load_file(str(b / f"{name}.safetensors"))
        assert sa.keys() == sb.keys(), name
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=atol, msg=f"{name}:{k}")


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_t2v_dir) -> Path:
    """The reference: one process, grad_accum=2 (plain, no engine)."""
    run = tmp_path_factory.mktemp("single") / "run"
    launch(dmd_args(tiny_t2v_dir, run, "grad_accum=2"), 1, run.parent)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("engine, extra", [
    ("fsdp", ["model.gradient_checkpointing=true"]),  # per-block recomputation: same numbers
    ("fsdp", ["distributed.cpu_offload=true"]),  # FSDP2 CPUOffloadPolicy (parameters/optimizer on the CPU)
    ("hybrid", ["distributed.shard_size=1"]),  # 2 replicas x 1 shard: exercises HSDP's replica all-reduce
    ("zero2", []),
    ("zero3", []),
])
def test_engine_matches_single_process_resumes_and_consolidates(engine, extra, single, tmp_path, tiny_t2v_dir):
    run = tmp_path / "run"
    launch_engine(engine, dmd_args(tiny_t2v_dir, run, *extra), tmp_path)
    state = json.loads((latest_checkpoint(run / "checkpoints") / "state.json").read_text())
    assert state["engine"] == engine and state["world_size"] == 2
    assert "distributed:\n  engine: " + engine in (run / "config.yaml").read_text()  # auto, resolved
    assert_same_metrics(single, run, [1, 2, 3, 4], rtol=1e-4)

    # resume from the step-2 checkpoint: steps 3-4 as uninterrupted
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    launch_engine(engine, dmd_args(tiny_t2v_dir, resumed, *extra), tmp_path)
    assert f"[step 2] resumed from {resumed}" in (resumed / "events.log").read_text()
    assert sorted(metrics(resumed)) == [3, 4]
    assert_same_metrics(run, resumed, [3, 4], rtol=1e-6)

    # consolidated safetensors (the CLI) == the single process' checkpoint; the EMA loads as a DiT == the export
    out = {}
    for name, r in (("run", run), ("resumed", resumed)):
        out[name] = tmp_path / f"consolidated_{name}"
        res = subprocess.run([sys.executable, "-m", "distill.engines", "consolidate",
                              str(r / "checkpoints" / "step_00000004"), "--out", str(out[name])],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    assert_same_files(single / "checkpoints" / "step_00000004", out["run"], atol=1e-6)
    assert_same_files(out["run"], out["resumed"], atol=1e-7)

    from models.components import load_dit

    student = load_dit(tiny_t2v_dir, explicit=str(out["run"] / "ema.safetensors")).state_dict()
    exported = load_dit(run / "model", distill=True).state_dict()
    teacher = load_dit(tiny_t2v_dir).state_dict()
    assert any(not torch.equal(student[k], teacher[k]) for k in teacher)  # the weights did train
    for k, v in exported.items():
        torch.testing.assert_close(v.float(), student[k], rtol=0, atol=0, msg=k)
