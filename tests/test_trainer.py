"""Training machinery on tiny models (CPU, seconds): config, pretrain run + export, exact resume (pretrain, dmd,
ode), checkpoints (atomic, keep K), the non-finite guard, gradient accumulation, metric logging. DMD specifics:
tests/test_dmd_trainer.py; `distill.export`: tests/test_export.py; shared helpers: tests/trainer_util.py.

Runs use 5 frames at 32x32 (latent [16, 2, 8, 8]), batch 2, one thread; distillation uses the session's random
small teacher (tests/conftest.py `tiny_t2v_dir`), pretraining the `tiny-t2v` spec with the committed components.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill.checkpoint import list_checkpoints
from distill.config import load_train_config, to_yaml
from distill.trainer import MAX_NONFINITE, NonFiniteLossError
from tests.trainer_util import (
    COMPONENTS,
    REPO,
    assert_same_checkpoint,
    assert_same_metrics,
    by_step,
    dmd_cfg,
    file_digests,
    metrics,
    ode_cfg,
    pretrain_cfg,
    train,
)
from train import main as train_main
from train import trainer_for


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
    (["dmd.guide_interval=[900,100]"], r"dmd.guide_interval must be \[t_min, t_max\]"),
    (["max_steps=100", "optim.decay_steps=101"], r"optim.decay_steps must be in \[0, max_steps=100\]"),
])
def test_config_rules(overrides, rule):
    with pytest.raises(ValueError, match=rule):
        load_train_config(None, [f"model.components_path={COMPONENTS}", *overrides])


def test_shapes_world_settings_checked_before_any_model(tmp_path):
    """The shapes world's size rule is the data module's (the config does not import the world); train.py's
    preflight applies it before anything is built."""
    from distill.preflight import preflight

    cfg = load_train_config(None, [f"model.components_path={COMPONENTS}", f"run_dir={tmp_path / 'run'}",
                                   "data.object_size=[0.6,0.9]"])
    with pytest.raises(ValueError, match=r"size_range \(0.6, 0.9\) .* do not fit a 48x48 frame"):
        preflight(cfg)


def test_lr_schedule_warmup_stable_decay():
    """lr_at: linear warm-up to the base rate, constant, then a linear cool-down to 0 at max_steps."""
    from types import SimpleNamespace

    from distill.trainer import Trainer

    def lr(step: int, *overrides: str) -> float:
        cfg = load_train_config(None, [f"model.components_path={COMPONENTS}", "max_steps=100", "optim.lr=1.0",
                                       "optim.warmup_steps=10", *overrides])
        return Trainer.lr_at(SimpleNamespace(cfg=cfg), step, cfg.optim.lr)

    assert [lr(s) for s in (0, 4, 9, 50, 99)] == pytest.approx([0.1, 0.5, 1.0, 1.0, 1.0])  # no decay: constant
    decayed = [lr(s, "optim.decay_steps=20") for s in (0, 79, 80, 90, 99)]
    assert decayed == pytest.approx([0.1, 1.0, 1.0, 0.5, 0.05])  # (max_steps - step) / decay_steps from step 80
    assert lr(5, "optim.decay_steps=100") == pytest.approx(0.6)  # warm-up and decay overlap: the smaller wins


def test_config_defaults_yaml_overrides():
    cfg = load_train_config(REPO / "configs/train/tiny/t2v_dmd.yaml", ["optim.lr=1e-3", "dmd.guide_scale=3"])
    assert cfg.task == "dmd" and cfg.optim.lr == 1e-3 and cfg.dmd.guide_scale == 3.0
    assert cfg.distill.denoising_step_list == [1000, 750, 500, 250]
    assert cfg.dmd.t_min == 20.0  # a default (not in the YAML)
    assert cfg.dmd.dfake_gen_update_ratio == 5 and cfg.optim.betas == [0.0, 0.999]  # from the YAML


def test_train_py_dry_run_prints_resolved_yaml():
    cmd = [sys.executable, "train.py", "--config", "configs/train/tiny/t2v_dmd.yaml", "--dry-run", "optim.lr=0.001",
           "max_steps=7"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["task"] == "dmd" and printed["max_steps"] == 7 and printed["optim"]["lr"] == 0.001
    assert printed["dmd"]["t_max"] == 980.0  # defaults are part of the resolved config
    cfg = load_train_config(REPO / "configs/train/tiny/t2v_dmd.yaml", ["optim.lr=0.001", "max_steps=7"])
    body = "\n".join(line for line in out.stdout.splitlines() if not line.startswith("#"))
    assert body.strip() == to_yaml(cfg).strip()
    estimate = [line for line in out.stdout.splitlines() if line.startswith("#")]
    assert any("peak in backward" in line and "GiB" in line for line in estimate)
    assert any(line.startswith("# fits 1 x 80 GiB: yes") for line in estimate)
    assert any("DiT parameters" in line for line in estimate) and any("TFLOP" in line for line in estimate)


def test_train_py_exit_code_2_on_bad_config(capsys):
    out = subprocess.run([sys.executable, "train.py", "--config", "configs/train/tiny/t2v_dmd.yaml", "max_steps=abc"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "max_steps" in out.stderr and "Traceback" not in out.stderr
    # the same through main() in-process (rules and missing files)
    assert train_main(["--config", "configs/train/tiny/t2v_dmd.yaml", "data.num_frames=6"]) == 2
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
    assert sorted(p.name for p in ckpt.iterdir()) == ["ema.safetensors", "manifest.json", "model.safetensors",
                                                       "optim.pt", "rng.pt", "state.json"]
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
    # an explicit checkpoint path: continue from step 1 (the log is cut back to step 1, step 2 written again)
    train(pretrain_cfg(run, "max_steps=2", f"checkpoint.resume={run / 'checkpoints' / 'step_00000001'}"))
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert_same_metrics(by_step(rows)[2], first[2])
    # never: start from scratch (the log starts again; step 1 has the same numbers as the first run)
    train(pretrain_cfg(run, "max_steps=1", "checkpoint.resume=never"))
    assert [r["step"] for r in metrics(run)] == [1]
    assert_same_metrics(by_step(metrics(run))[1], first[1])


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


@pytest.mark.parametrize("name,billions", [("t2v_1.3b_dmd", "1.419"), ("t2v_14b_dmd", "14.288"),
                                           ("i2v_14b_480p_dmd", "16.395")])
def test_real_size_configs_pass_dry_run(name, billions):
    """Real-size configs resolve without weights (sizes from the registry spec) and plan the right model."""
    out = subprocess.run([sys.executable, "train.py", "--config", f"configs/train/wan/{name}.yaml", "--dry-run"],
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
        logger=SimpleNamespace(tick=lambda: ticks.append(1), log=lambda step, m: rows.append((step, m))),
        train_peak_gib=0.0)
    fake.cuda_peak = lambda key, carry=0.0: Trainer.cuda_peak(fake, key, carry)  # {} off CUDA: no extra key
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
