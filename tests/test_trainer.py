"""Training machinery on tiny models (CPU, seconds): config, pretrain run + export, exact resume (pretrain, dmd,
ode), checkpoints (atomic, keep K), the non-finite guard, DMD specifics (two time-scale updates, exit step, frozen
teacher, EMA start), gradient accumulation, and `distill.export` (Wan folder + LightX2V LoRA, Eckart-Young).

Runs use 5 frames at 32x32 (latent [16, 2, 8, 8]), batch 2, one thread; distillation uses the session's random
small teacher (tests/conftest.py `tiny_t2v_dir`), pretraining the `tiny-t2v` spec with the committed components.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from distill.checkpoint import list_checkpoints
from distill.config import load_train_config, to_yaml
from distill.trainer import MAX_NONFINITE, NonFiniteLossError
from train import main as train_main
from train import trainer_for

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = REPO / "checkpoints" / "tiny-components"
SMALL = ["data.num_frames=5", "data.height=32", "data.width=32", "num_threads=1", "logging.every=1",
         "logging.sample_prompts=[]", "checkpoint.every=100", "batch_size=2"]
VOLATILE = {"time", "step_time"}  # metrics that legitimately differ between two identical runs


# ---- helpers ------------------------------------------------------------------------------------------------
def pretrain_cfg(run: Path, *overrides: str):
    return load_train_config(None, ["task=pretrain", f"run_dir={run}", f"output_model={run}/model",
                                    f"model.components_path={COMPONENTS}", "optim.warmup_steps=2", *SMALL,
                                    *overrides])


def dmd_cfg(run: Path, teacher: Path, *overrides: str):
    return load_train_config(REPO / "configs/tiny/t2v_dmd.yaml",
                             [f"run_dir={run}", f"output_model={run}/model", f"model.path={teacher}", *SMALL,
                              "dmd.dfake_gen_update_ratio=2", "dmd.ema_start=1", *overrides])


def ode_cfg(run: Path, teacher: Path, trajectories: Path, *overrides: str):
    return load_train_config(REPO / "configs/tiny/t2v_ode.yaml",
                             [f"run_dir={run}", f"output_model={run}/model", f"model.path={teacher}", *SMALL,
                              f"ode.trajectories={trajectories}", "ode.num_trajectories=4", "ode.shard_size=2",
                              "ode.teacher_steps=8", "optim.warmup_steps=2", *overrides])


def train(cfg):
    return trainer_for(cfg).train()


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def by_step(rows: list[dict]) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in rows}


def file_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def assert_same_metrics(a: dict, b: dict, rtol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert math.isclose(a[k], b[k], rel_tol=rtol, abs_tol=1e-12), (k, a[k], b[k])


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Every network of two checkpoints (weights, EMA) equal; optimizer states equal."""
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names and names == sorted(p.name for p in b.glob("*.safetensors"))
    for name in names:
        sa, sb = load_file(str(a / name)), load_file(str(b / name))
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=1e-7, msg=f"{name}:{k}")
    oa = torch.load(a / "optim.pt", weights_only=True)
    ob = torch.load(b / "optim.pt", weights_only=True)
    for net in oa:
        for pid, st in oa[net]["state"].items():
            for k, v in st.items():
                torch.testing.assert_close(v, ob[net]["state"][pid][k], rtol=1e-6, atol=1e-7)


# ---- 1. configuration -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, names", [
    ("optim.lrr=1e-4", "optim.lrr"),
    ("nosuch=1", "nosuch"),
    ("max_steps=abc", "max_steps"),
    ("batch_size=2.5", "batch_size"),
    ("model.gradient_checkpointing=maybe", "model.gradient_checkpointing"),
    ("optim.betas=[a,b]", "optim.betas"),
])
def test_config_unknown_key_or_bad_type_names_the_key(override, names):
    with pytest.raises(ValueError, match=names.replace(".", r"\.").replace("[", r"\[")):
        load_train_config(None, [f"model.components_path={COMPONENTS}", override])


def test_config_unknown_key_in_yaml_names_it(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("task: pretrain\nmodel:\n  components_path: x\ndata:\n  num_framez: 5\n")
    with pytest.raises(ValueError, match=r"data\.num_framez"):
        load_train_config(path)


@pytest.mark.parametrize("overrides, rule", [
    (["data.num_frames=6"], r"4n\+1"),
    (["task=dmd"], r"model\.path"),
    (["task=ode"], r"model\.path"),
    (["distill.denoising_step_list=[1000,1000,500]"], r"strictly decreasing"),
    (["distill.denoising_step_list=[500,750,250]"], r"strictly decreasing"),
    (["distill.denoising_step_list=[1200,750]"], r"denoising_step_list"),
    (["data.height=40"], r"multiples of 16"),
    (["batch_size=0"], r"batch_size"),
    (["data.cfg_dropout=1.0"], r"cfg_dropout"),
    (["mixed_precision=fp8"], r"mixed_precision"),
    (["data.object_size=[0.3]"], r"object_size must be \[min, max\]"),
    (["data.object_size=[0.6,0.9]"], r"size_range \(0.6, 0.9\) .* do not fit a 48x48 frame"),
])
def test_config_rules(overrides, rule):
    with pytest.raises(ValueError, match=rule):
        load_train_config(None, [f"model.components_path={COMPONENTS}", *overrides])


def test_config_defaults_yaml_overrides():
    cfg = load_train_config(REPO / "configs/tiny/t2v_dmd.yaml", ["optim.lr=1e-3", "dmd.guidance_scale=3"])
    assert cfg.task == "dmd" and cfg.optim.lr == 1e-3 and cfg.dmd.guidance_scale == 3.0
    assert cfg.distill.denoising_step_list == [1000, 750, 500, 250]
    assert cfg.dmd.t_min == 20.0  # a default (not in the YAML)
    assert cfg.dmd.dfake_gen_update_ratio == 5 and cfg.optim.betas == [0.0, 0.999]  # from the YAML


def test_train_py_dry_run_prints_resolved_yaml():
    cmd = [sys.executable, "train.py", "--config", "configs/tiny/t2v_dmd.yaml", "--dry-run", "optim.lr=0.001",
           "max_steps=7"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["task"] == "dmd" and printed["max_steps"] == 7 and printed["optim"]["lr"] == 0.001
    assert printed["dmd"]["t_max"] == 980.0  # defaults are part of the resolved config
    cfg = load_train_config(REPO / "configs/tiny/t2v_dmd.yaml", ["optim.lr=0.001", "max_steps=7"])
    body = "\n".join(line for line in out.stdout.splitlines() if not line.startswith("#"))
    assert body.strip() == to_yaml(cfg).strip()
    estimate = [line for line in out.stdout.splitlines() if line.startswith("#")]
    assert any("peak in backward" in line and "GiB" in line for line in estimate)
    assert any(line.startswith("# fits 1 x 80 GiB: yes") for line in estimate)
    assert any("DiT parameters" in line for line in estimate) and any("TFLOP" in line for line in estimate)


def test_train_py_exit_code_2_on_bad_config(capsys):
    out = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny/t2v_dmd.yaml", "max_steps=abc"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "max_steps" in out.stderr and "Traceback" not in out.stderr
    # the same through main() in-process (rules and missing files)
    assert train_main(["--config", "configs/tiny/t2v_dmd.yaml", "data.num_frames=6"]) == 2
    assert "4n+1" in capsys.readouterr().err
    assert train_main(["--config", "no/such/file.yaml"]) == 2
    assert "not found" in capsys.readouterr().err


# ---- 2. pretrain: a run and its artefacts ---------------------------------------------------------------------
def test_pretrain_run_writes_metrics_config_checkpoint_and_loadable_model(tmp_path, one_thread, make_config):
    from inference.loader import load_pipeline

    run = tmp_path / "run"
    cfg = pretrain_cfg(run, "max_steps=2", "logging.sample_prompts=['a red circle moving left']",
                       "logging.sample_steps=2")
    out = train(cfg)
    assert out == run / "model"
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert rows[0]["lr"] == pytest.approx(cfg.optim.lr / 2)  # warm-up: (step + 1) / warmup_steps
    assert load_train_config(run / "config.yaml") == cfg  # config.yaml is the resolved config
    ckpt = run / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["ema.safetensors", "model.safetensors", "optim.pt", "rng.pt",
                                                       "state.json"]
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2
    assert (run / "samples" / "step0000002_0.mp4").is_file()
    assert "exported EMA teacher" in (run / "events.log").read_text()
    # the exported folder is an inference model folder
    pipe = load_pipeline(make_config("t2v"), out)
    frames = pipe.generate(["a red circle moving left"], seed=0)
    assert frames.shape == (1, 5, 32, 32, 3) and frames.dtype == np.uint8
    # and it holds the EMA weights of the last checkpoint
    ema = load_file(str(ckpt / "ema.safetensors"))
    exported = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    for k, v in ema.items():
        torch.testing.assert_close(exported[k].float(), v)


# ---- 3. exact resume, atomic checkpoints, keep K --------------------------------------------------------------
@pytest.mark.parametrize("task", ["pretrain", "dmd", "ode"])
def test_resume_continues_exactly(task, tmp_path, one_thread, tiny_t2v_dir):
    n, k = 5, 3

    def cfg(run, *ov):
        if task == "pretrain":
            return pretrain_cfg(run, *ov)
        if task == "dmd":
            return dmd_cfg(run, tiny_t2v_dir, *ov)
        return ode_cfg(run, tiny_t2v_dir, tmp_path / "trajectories", *ov)

    full, part = tmp_path / "full", tmp_path / "part"
    train(cfg(full, f"max_steps={n}", "checkpoint.every=1", "checkpoint.keep=2"))
    # keep=2: only the last two of the checkpoints written at steps 1..n remain
    assert [p.name for p in list_checkpoints(full / "checkpoints")] == [f"step_{n - 1:08d}", f"step_{n:08d}"]

    train(cfg(part, f"max_steps={k}"))
    ckpts = part / "checkpoints"
    # a crash in the middle of writing checkpoint k+1: a leftover temporary folder (even one with a state.json)
    tmp = ckpts / f".tmp_step_{k + 1:08d}"
    tmp.mkdir()
    (tmp / "state.json").write_text(json.dumps({"step": k + 1}))
    (tmp / "model.safetensors").write_bytes(b"half a file")
    # ... and a final-named folder without state.json (not a complete checkpoint either)
    (ckpts / f"step_{n:08d}").mkdir()
    before = file_digests(ckpts / f"step_{k:08d}")

    train(cfg(part, f"max_steps={n}"))  # checkpoint.resume=auto (the default)
    events = (part / "events.log").read_text()
    assert f"resumed from {ckpts / f'step_{k:08d}'}" in events
    assert file_digests(ckpts / f"step_{k:08d}") == before
    assert [p.name for p in list_checkpoints(ckpts)] == [f"step_{k:08d}", f"step_{n:08d}"]

    ref, got = by_step(metrics(full)), by_step(metrics(part))
    assert sorted(got) == list(range(1, n + 1))  # steps 1..k from the first run, k+1..n from the resumed one
    for step in range(1, n + 1):
        assert_same_metrics(ref[step], got[step])
    loss_keys = {"pretrain": ["loss"], "ode": ["loss"], "dmd": ["critic_loss", "generator_loss"]}[task]
    for key in loss_keys:
        assert any(key in got[s] for s in range(k + 1, n + 1))
    assert_same_checkpoint(full / "checkpoints" / f"step_{n:08d}", ckpts / f"step_{n:08d}")


def test_resume_never_and_explicit_path(tmp_path, one_thread):
    run = tmp_path / "run"
    train(pretrain_cfg(run, "max_steps=2", "checkpoint.every=1", "checkpoint.keep=5"))
    first = by_step(metrics(run))
    # an explicit checkpoint path: continue from step 1
    train(pretrain_cfg(run, "max_steps=2", f"checkpoint.resume={run / 'checkpoints' / 'step_00000001'}"))
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 2]
    assert_same_metrics(by_step(rows[2:])[2], first[2])
    # never: start from scratch (step 1 again, same numbers as the first run)
    train(pretrain_cfg(run, "max_steps=1", "checkpoint.resume=never"))
    assert_same_metrics(by_step(metrics(run)[3:])[1], first[1])


# ---- 4. non-finite losses ------------------------------------------------------------------------------------
def test_nonfinite_loss_skips_then_stops_with_checkpoint_intact(tmp_path, one_thread, monkeypatch):
    import distill.pretrain as pretrain

    run = tmp_path / "run"
    train(pretrain_cfg(run, "max_steps=2"))
    real_loss = pretrain.flow_matching_loss
    calls = {"n": 0}

    def nan_once(*args, **kwargs):  # the first call of the resumed run (step 3) is NaN
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 1 else loss

    monkeypatch.setattr(pretrain, "flow_matching_loss", nan_once)
    trainer = trainer_for(pretrain_cfg(run, "max_steps=4"))
    trainer.train()
    rows = by_step(metrics(run))
    assert rows[3] == {"step": 3, "skipped": 1.0}
    assert math.isfinite(rows[4]["loss"])
    events = (run / "events.log").read_text()
    assert "non-finite flow matching loss" in events and "step skipped (1/5 in a row)" in events

    ckpt = run / "checkpoints" / "step_00000004"
    before = file_digests(ckpt)
    monkeypatch.setattr(pretrain, "flow_matching_loss", lambda *a, **k: real_loss(*a, **k) * float("inf"))
    trainer = trainer_for(pretrain_cfg(run, "max_steps=50"))
    weights = load_file(str(ckpt / "model.safetensors"))  # what the run resumes from
    with pytest.raises(NonFiniteLossError, match=re.escape(str(run / "checkpoints"))):
        trainer.train()
    assert trainer.step == 4 + MAX_NONFINITE - 1  # the 5th non-finite step raised before counting
    for k, v in trainer.dit.state_dict().items():  # no update was applied
        assert torch.equal(v, weights[k]), k
    assert file_digests(ckpt) == before
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000002", "step_00000004"]
    events = (run / "events.log").read_text()
    assert f"({MAX_NONFINITE}/{MAX_NONFINITE} in a row)" in events
    assert sum(1.0 == r.get("skipped") for r in metrics(run)) == 1 + MAX_NONFINITE - 1  # the 5th raised before logging


def test_nonfinite_dmd_generator_loss_skips_generator_update(tmp_path, one_thread, monkeypatch, tiny_t2v_dir):
    import distill.dmd as dmd

    trainer = trainer_for(dmd_cfg(tmp_path / "run", tiny_t2v_dir, "max_steps=2", "dmd.dfake_gen_update_ratio=1"))
    real_loss = dmd.dmd_loss

    def nan_loss(*args, **kwargs):
        loss, logs = real_loss(*args, **kwargs)
        return loss * float("nan"), logs

    monkeypatch.setattr(dmd, "dmd_loss", nan_loss)
    gen = {k: v.clone() for k, v in trainer.gen.state_dict().items()}
    critic = {k: v.clone() for k, v in trainer.critic.state_dict().items()}
    logs = trainer.train_step(0)
    assert logs["generator_skipped"] == 1.0 and "critic_loss" in logs
    assert all(torch.equal(v, gen[k]) for k, v in trainer.gen.state_dict().items())
    assert all(p.grad is None for p in trainer.gen.parameters())
    assert any(not torch.equal(v, critic[k]) for k, v in trainer.critic.state_dict().items())
    trainer.logger.close()


# ---- 5. DMD specifics -----------------------------------------------------------------------------------------
def _params(net) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in net.named_parameters()}


def _changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_dmd_two_time_scale_frozen_teacher_and_ema_start(tmp_path, one_thread, tiny_t2v_dir):
    ratio, ema_start, decay = 3, 3, 0.5
    trainer = trainer_for(dmd_cfg(tmp_path / "run", tiny_t2v_dir, "max_steps=8", f"dmd.dfake_gen_update_ratio={ratio}",
                                  f"dmd.ema_start={ema_start}", f"dmd.ema_decay={decay}", "optim.lr=1e-3",
                                  "dmd.lr_critic=1e-3"))
    real0 = {k: v.clone() for k, v in trainer.real_score.state_dict().items()}
    assert not any(p.requires_grad for p in trainer.real_score.parameters())
    teacher_ids = {id(p) for p in trainer.real_score.parameters()}
    for opt in trainer.optimizers.values():
        assert not teacher_ids & {id(p) for g in opt.param_groups for p in g["params"]}

    ema_prev = None
    for step in range(8):
        gen0, critic0 = _params(trainer.gen), _params(trainer.critic)
        logs = trainer.train_step(step)
        is_gen = step % ratio == 0
        assert ("generator_loss" in logs) == is_gen and "critic_loss" in logs
        assert _changed(gen0, _params(trainer.gen)) == is_gen, step
        assert _changed(critic0, _params(trainer.critic)), step
        ema, gen = trainer.ema.state_dict(), _params(trainer.gen)
        if step <= ema_start:  # before the start the EMA follows the generator exactly
            assert all(torch.equal(ema[k], gen[k]) for k in gen), step
        elif is_gen:  # first averaging update: ema = decay * previous + (1 - decay) * weights
            for k in gen:
                torch.testing.assert_close(ema[k], decay * ema_prev[k] + (1 - decay) * gen[k], rtol=1e-6, atol=1e-7)
            assert _changed(ema, gen)
        ema_prev = {k: v.clone() for k, v in ema.items()}
    for k, v in trainer.real_score.state_dict().items():
        assert torch.equal(v, real0[k]), k
    assert all(p.grad is None for p in trainer.real_score.parameters())
    trainer.logger.close()


def test_dmd_generator_loss_gives_no_gradient_to_critic_or_teacher(tmp_path, one_thread, tiny_t2v_dir):
    trainer = trainer_for(dmd_cfg(tmp_path / "run", tiny_t2v_dir, "max_steps=1"))
    seen = {}
    orig = trainer.clip_and_step

    def capture(name, *a, **k):
        seen[name] = {"critic": [p.grad for p in trainer.critic.parameters()],
                      "generator": [p.grad is not None for p in trainer.gen.parameters()]}
        return orig(name, *a, **k)

    trainer.clip_and_step = capture
    trainer.generator_step(0)
    assert all(g is None for g in seen["generator"]["critic"])
    assert any(seen["generator"]["generator"])
    assert all(p.grad is None for p in trainer.real_score.parameters())
    trainer.logger.close()


def test_dmd_logged_generator_steps_and_exit_step(tmp_path, one_thread, tiny_t2v_dir, monkeypatch):
    from accelerate import Accelerator

    run = tmp_path / "run"
    trainer = trainer_for(dmd_cfg(run, tiny_t2v_dir, "max_steps=5", "dmd.dfake_gen_update_ratio=2"))
    trainer.train()
    rows = by_step(metrics(run))
    assert [s for s, r in rows.items() if "generator_loss" in r] == [1, 3, 5]  # iterations 0, 2, 4
    assert all("critic_loss" in r for r in rows.values())
    for s in (1, 3, 5):
        assert rows[s]["exit_step"] == trainer.exit_step(s - 1, 0)
    # the exit step depends on (seed, step) only: the same on every rank, uniform over the student's steps
    ref = [trainer.exit_step(s, p) for s in range(400) for p in (0, 1)]
    monkeypatch.setattr(Accelerator, "process_index", property(lambda self: 1))
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    assert [trainer.exit_step(s, p) for s in range(400) for p in (0, 1)] == ref
    counts = np.bincount(ref, minlength=4)
    assert len(counts) == 4 and counts.min() > 150, counts
    trainer.cfg.seed = 1
    assert [trainer.exit_step(s, 0) for s in range(50)] != ref[0:100:2]


# ---- 6. gradient accumulation ---------------------------------------------------------------------------------
def test_grad_accum_sees_the_same_videos(tiny_t2v_dir):
    from data.shapes import ShapesWorld
    from distill.data import ShapesBatches, TextCache, all_prompts
    from models.components import load_encoders

    for step in range(3):
        big = ShapesBatches(None, None, None, 0.1, 5).video_seeds(step, 0, 1, 4)
        accum = sum((ShapesBatches(None, None, None, 0.1, 5).video_seeds(step, m, 2, 2) for m in range(2)), [])
        ranks = sum((ShapesBatches(None, None, None, 0.1, 5, r, 2).video_seeds(step, m, 2, 1)
                     for m in range(2) for r in range(2)), [])
        two_gpus = sum((ShapesBatches(None, None, None, 0.1, 5, r, 2).video_seeds(step, 0, 1, 2) for r in range(2)), [])
        assert big == accum == ranks == two_gpus and len(set(big)) == 4
    # the batches themselves: same latents, prompts and dropped prompts (cfg_dropout per video)
    vae, text_encoder, _ = load_encoders(tiny_t2v_dir, "t2v", 64)
    world = ShapesWorld(5, 32, 32)
    data = ShapesBatches(world, vae, TextCache(text_encoder, all_prompts(), 64), 0.5, 0)
    for step in range(2):
        x_big, c_big, p_big = data.get(step, 0, 1, 4)
        parts = [data.get(step, m, 2, 2) for m in range(2)]
        torch.testing.assert_close(torch.cat([p[0] for p in parts]), x_big, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.cat([p[1].context for p in parts]), c_big.context)
        assert sum((p[2] for p in parts), []) == p_big


def test_grad_accum_gradient_equals_big_batch(tmp_path, one_thread, monkeypatch):
    """bs 2 x accum 2 == bs 4 x accum 1 when the noise is the same: the flow-matching loss is patched to draw each
    sample's (s, eps) from that sample's video seed, so the two layouts use identical noise."""
    import distill.pretrain as pretrain
    from distill.losses import Cond
    from inference.flow import add_noise, shift_sigma, v_from_x0_eps

    current = {}

    def loss_per_sample_noise(net, x0, cond: Cond, shift, generator=None):
        gens = [torch.Generator().manual_seed(int(s)) for s in current["seeds"]]
        s = shift_sigma(torch.cat([torch.rand(1, generator=g) for g in gens]), shift)
        eps = torch.cat([torch.randn((1, *x0.shape[1:]), generator=g) for g in gens])
        v = cond(net, add_noise(x0, eps, s), 1000.0 * s)
        return (v.float() - v_from_x0_eps(x0, eps).float()).pow(2).mean()

    monkeypatch.setattr(pretrain, "flow_matching_loss", loss_per_sample_noise)

    def make(run, *ov):
        trainer = trainer_for(pretrain_cfg(run, "max_steps=2", "optim.grad_clip=1e9", *ov))
        data_get, clip = trainer.data.get, trainer.clip_and_step
        trainer.seen, trainer.grads = [], []

        def get(step, micro, accum, batch):
            current["seeds"] = trainer.data.video_seeds(step, micro, accum, batch)
            trainer.seen += current["seeds"]
            return data_get(step, micro, accum, batch)

        def clip_and_step(name, *a, **k):
            trainer.grads.append({n: p.grad.clone() for n, p in trainer.dit.named_parameters()})
            return clip(name, *a, **k)

        trainer.data.get, trainer.clip_and_step = get, clip_and_step
        return trainer

    big, small = make(tmp_path / "big", "batch_size=4"), make(tmp_path / "small", "batch_size=2", "grad_accum=2")
    for step in range(2):
        lb, ls = big.train_step(step), small.train_step(step)
        assert big.seen == small.seen
        assert float(ls["loss"]) == pytest.approx(float(lb["loss"]), rel=1e-5)
        assert float(ls["grad_norm"]) == pytest.approx(float(lb["grad_norm"]), rel=1e-5)
        for n, g in big.grads[step].items():
            torch.testing.assert_close(small.grads[step][n], g, rtol=1e-4, atol=1e-7, msg=n)
    for (n, a), b in zip(big.dit.named_parameters(), small.dit.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)
    big.logger.close()
    small.logger.close()


# ---- 7. export: Wan folder + LightX2V LoRA --------------------------------------------------------------------
@pytest.fixture(scope="module")
def dmd_run(tmp_path_factory, tiny_t2v_dir) -> Path:
    """A finished 4-iteration DMD run (generator updated every iteration, lr high enough for a visible delta)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("dmd") / "run"
    train(dmd_cfg(run, tiny_t2v_dir, "max_steps=4", "dmd.dfake_gen_update_ratio=1", "optim.lr=1e-3",
                  "dmd.ema_start=100"))
    torch.set_num_threads(n)
    return run


def _lora_module(key: str) -> tuple[str, str]:
    """'diffusion_model.blocks.0.self_attn.q.lora_up.weight' -> ('blocks.0.self_attn.q', 'lora_up')."""
    assert key.startswith("diffusion_model."), key
    name = key[len("diffusion_model."):]
    for suffix in (".lora_up.weight", ".lora_down.weight"):
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix[1:-len(".weight")]
    module, _, suffix = name.rpartition(".")
    if name in ("diff", "diff_b", "diff_m"):
        return "", name
    assert suffix in ("diff", "diff_b", "diff_m"), key
    return module, suffix


def local_merge(base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """base + up @ down for LoRA pairs, base + diff for full differences (fp32)."""
    out = {k: v.float().clone() for k, v in base.items()}
    target = {"diff": "weight", "diff_b": "bias", "diff_m": "modulation"}
    for key, t in lora.items():
        module, kind = _lora_module(key)
        if kind == "lora_down":
            continue
        if kind == "lora_up":
            down = lora[key.replace(".lora_up.", ".lora_down.")]
            out[f"{module}.weight"] += t.float() @ down.float()
        else:
            name = f"{module}.{target[kind]}" if module else target[kind]
            out[name] += t.float()
    return out


def check_lora_file(path: Path, base: dict, student: dict, rank: int, tol: float) -> dict[str, float]:
    """LightX2V key format + merge(base, LoRA) reproduces the student within the reported errors (+ tol)."""
    lora = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "lightx2v" and meta["rank"] == str(rank)
    errors = json.loads(path.with_suffix(".errors.json").read_text())
    kinds = {}
    for key, t in lora.items():
        module, kind = _lora_module(key)
        kinds[key] = kind
        if kind == "lora_up":
            w = base[f"{module}.weight"]
            assert t.shape == (w.shape[0], rank), key
            assert lora[key.replace(".lora_up.", ".lora_down.")].shape == (rank, w.shape[1]), key
            assert f"{module}.weight" in errors
        elif kind == "diff":
            assert base[f"{module}.weight"].shape == t.shape
    # the official Wan names of the modulation tensors
    assert lora["diffusion_model.blocks.0.diff_m"].shape == base["blocks.0.modulation"].shape
    assert lora["diffusion_model.head.diff_m"].shape == base["head.modulation"].shape
    assert "diffusion_model.blocks.1.self_attn.q.lora_up.weight" in lora
    assert "diffusion_model.blocks.0.ffn.2.lora_down.weight" in lora
    assert "diffusion_model.blocks.0.self_attn.q.diff_b" in lora
    assert "diffusion_model.blocks.0.norm3.diff" in lora and "diffusion_model.patch_embedding.diff" in lora
    # every 2-D weight (min_numel 1, rank < min dim) is a LoRA pair; the rest are full differences
    for name, w in base.items():
        if w.ndim == 2 and rank < min(w.shape) and not torch.equal(student[name], w):
            assert f"diffusion_model.{name[:-len('.weight')]}.lora_up.weight" in lora, name
    merged = local_merge(base, lora)
    for name, s in student.items():
        delta = (s.float() - base[name].float()).norm()
        err = (merged[name] - s.float()).norm()
        allowed = errors.get(name, 0.0) + tol
        assert err <= allowed * delta + 1e-6, (name, float(err / max(delta, 1e-30)), errors.get(name))
    return errors


def test_export_cli_folder_and_lora(dmd_run, tmp_path, tiny_t2v_dir, make_config):
    from inference.loader import load_pipeline
    from models.components import load_dit

    out, lora = tmp_path / "student", tmp_path / "lora-r4.safetensors"
    cmd = [sys.executable, "-m", "distill.export", "--run", str(dmd_run), "--out", str(out), "--lora", str(lora),
           "--lora-rank", "4", "--lora-min-numel", "1"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert (out / "distill_models" / "distill_model.safetensors").is_file() and (out / "config.json").is_file()
    pipe = load_pipeline(make_config("t2v", model_cls="wan2.1_distill", denoising_step_list=[1000, 750, 500, 250],
                                     enable_cfg=False), out)
    frames = pipe.generate(["a red circle moving left"], seed=0)
    assert frames.shape == (1, 5, 32, 32, 3)
    # bf16 (the default): the student file and the LoRA are bf16; the merge matches up to bf16 rounding
    lora_tensors = load_file(str(lora))
    assert {t.dtype for t in lora_tensors.values()} == {torch.bfloat16}
    base = load_dit(tiny_t2v_dir).state_dict()
    student = load_dit(out, distill=True).state_dict()
    errors = check_lora_file(lora, base, student, 4, tol=1e-2)
    assert errors and all(0 < e < 1 for e in errors.values())
    # the exported student is the run's generator (EMA not started yet: EMA == raw weights)
    raw = load_file(str(dmd_run / "checkpoints" / "step_00000004" / "generator.safetensors"))
    for k, v in raw.items():
        torch.testing.assert_close(student[k].float(), v.bfloat16().float())


def test_export_fp32_lora_merges_exactly_and_loads_with_inference_lora(dmd_run, tmp_path, tiny_t2v_dir):
    from distill.export import export
    from models.components import load_dit

    out, lora = tmp_path / "student", tmp_path / "lora.safetensors"
    export(dmd_run, out, dtype="fp32", lora=lora, lora_rank=4, lora_min_numel=1)
    base = load_dit(tiny_t2v_dir).state_dict()
    student = load_dit(out, distill=True).state_dict()
    assert {t.dtype for t in load_file(str(lora)).values()} == {torch.float32}
    check_lora_file(lora, base, student, 4, tol=1e-5)
    try:
        from inference.lora import merge_loras
    except ImportError:  # pragma: no cover - inference/lora.py not there yet
        return
    model = load_dit(tiny_t2v_dir)
    merge_loras(model, [(lora, 1.0)])
    mine = local_merge(base, load_file(str(lora)))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v.float(), mine[k], rtol=1e-6, atol=1e-6, msg=k)


def test_extract_lora_rank_r_exact_and_eckart_young():
    from distill.export import extract_lora

    g = torch.Generator().manual_seed(0)
    out_f, in_f, r = 48, 40, 5
    base = {"blocks.0.self_attn.q.weight": torch.randn(out_f, in_f, generator=g),
            "blocks.0.self_attn.q.bias": torch.randn(out_f, generator=g),
            "blocks.0.modulation": torch.randn(1, 6, 8, generator=g),
            "head.modulation": torch.randn(1, 2, 8, generator=g),
            "blocks.0.norm3.weight": torch.randn(8, generator=g),
            "text_embedding.0.weight": torch.randn(4, 3, generator=g),  # rank >= min dim: a full difference
            "unchanged.weight": torch.randn(6, 6, generator=g)}
    low = torch.randn(out_f, r, generator=g) @ torch.randn(r, in_f, generator=g)
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    tuned["blocks.0.self_attn.q.weight"] = base["blocks.0.self_attn.q.weight"] + low
    tuned["unchanged.weight"] = base["unchanged.weight"].clone()

    lora, errors = extract_lora(base, tuned, rank=r, min_numel=1)
    p = "diffusion_model."
    assert set(lora) == {p + "blocks.0.self_attn.q.lora_up.weight", p + "blocks.0.self_attn.q.lora_down.weight",
                         p + "blocks.0.self_attn.q.diff_b", p + "blocks.0.diff_m", p + "head.diff_m",
                         p + "blocks.0.norm3.diff", p + "text_embedding.0.diff"}
    up, down = lora[p + "blocks.0.self_attn.q.lora_up.weight"], lora[p + "blocks.0.self_attn.q.lora_down.weight"]
    assert up.shape == (out_f, r) and down.shape == (r, in_f)
    assert errors["blocks.0.self_attn.q.weight"] < 1e-5
    assert (up @ down - low).norm() / low.norm() < 1e-5
    # balanced factors (no alpha): up = U sqrt(S), down = sqrt(S) V^T
    torch.testing.assert_close(up.norm(dim=0), down.norm(dim=1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lora[p + "blocks.0.diff_m"], tuned["blocks.0.modulation"] - base["blocks.0.modulation"])

    # a full-rank delta: the Eckart-Young optimum, error = ||S[r:]|| / ||S||
    full = torch.randn(out_f, in_f, generator=g)
    tuned["blocks.0.self_attn.q.weight"] = base["blocks.0.self_attn.q.weight"] + full
    s = torch.linalg.svdvals(full.double())
    for rank in (1, 5, 20):
        lora, errors = extract_lora(base, tuned, rank=rank, min_numel=1)
        expect = float(s[rank:].norm() / s.norm())
        assert errors["blocks.0.self_attn.q.weight"] == pytest.approx(expect, rel=1e-4)
        up, down = lora[p + "blocks.0.self_attn.q.lora_up.weight"], lora[p + "blocks.0.self_attn.q.lora_down.weight"]
        assert float((full - up @ down).norm() / full.norm()) == pytest.approx(expect, rel=1e-4)
        assert torch.linalg.matrix_rank(up @ down) == rank
    # the default min_numel (1M): small 2-D weights are full differences
    lora, errors = extract_lora(base, tuned, rank=5)
    assert not errors and p + "blocks.0.self_attn.q.diff" in lora
    with pytest.raises(ValueError, match="differ in keys"):
        extract_lora(base, {**tuned, "extra.weight": torch.zeros(1)})


@pytest.mark.parametrize("name,billions", [("t2v_1.3b_dmd", "1.419"), ("t2v_14b_dmd", "14.288"),
                                           ("i2v_14b_480p_dmd", "16.395")])
def test_real_size_configs_pass_dry_run(name, billions):
    """Real-size configs resolve without weights (sizes from the registry spec) and plan the right model."""
    out = subprocess.run([sys.executable, "train.py", "--config", f"configs/wan_distill/{name}.yaml", "--dry-run"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"DiT parameters: {billions} B;" in out.stdout and "tokens per sample: 32760" in out.stdout


def test_ema_follows_the_network_to_its_device():
    """accelerate's prepare moves networks after their EMA was made: the shadow follows (GPU runs hit this)."""
    from distill.ema import EMA

    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.5, start_step=0)
    net.to("meta")
    ema.update(net, step=5)
    assert all(v.device.type == "meta" for v in ema.state_dict().values())


def test_log_metrics_keeps_tensors_until_a_logging_step():
    """Step metrics stay device tensors (no host sync per step); every `logging.every` steps one row holds the
    mean of each metric over the steps that produced it (generator metrics appear on some steps only)."""
    from types import SimpleNamespace

    from distill.trainer import Trainer

    rows, ticks = [], []
    fake = SimpleNamespace(
        cfg=SimpleNamespace(logging=SimpleNamespace(every=3), max_steps=100), pending={}, device=torch.device("cpu"),
        accelerator=SimpleNamespace(num_processes=1),
        logger=SimpleNamespace(tick=lambda: ticks.append(1), log=lambda step, m: rows.append((step, m))))
    for step, gen in ((1, 2.0), (2, None), (3, 4.0)):
        metrics = {"critic_loss": torch.tensor(float(step)), "lr": 0.5}
        if gen is not None:
            metrics["generator_loss"] = torch.tensor(gen)
        Trainer.log_metrics(fake, step, metrics)
        if step < 3:
            assert rows == [] and all(torch.is_tensor(t) for t, _ in
                                      (v for k, v in fake.pending.items() if k != "lr"))
    assert len(ticks) == 3 and fake.pending == {}
    step, row = rows[0]
    assert step == 3 and row == {"critic_loss": 2.0, "lr": 0.5, "generator_loss": 3.0}
    assert all(type(v) is float for v in row.values())
