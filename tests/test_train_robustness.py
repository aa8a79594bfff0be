"""Training robustness on tiny models (CPU, seconds): where models are written, durable and verified checkpoints
with fallback on resume, metrics.jsonl of a killed-and-resumed run, early errors for bad inputs, and the update
guard (non-finite or exploding updates are undone and counted). Sampling during training: tests/test_train_sampling.py.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import distill.checkpoint as checkpoint
from distill.checkpoint import (
    MANIFEST,
    CheckpointError,
    file_checksum,
    list_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from distill.config import load_train_config
from distill.trainer import MAX_NONFINITE, NonFiniteLossError
from tests.trainer_util import (
    COMPONENTS,
    REPO,
    SMALL,
    assert_same_metrics,
    by_step,
    file_digests,
    metrics,
    pretrain_cfg,
    train,
)
from train import main as train_main
from train import trainer_for

TINY_YAMLS = sorted((REPO / "configs" / "train" / "tiny").glob("*.yaml"))


# ---- 1. output_model: inside run_dir unless the recipe says otherwise ------------------------------------------
@pytest.mark.parametrize("path", TINY_YAMLS, ids=lambda p: p.name)
def test_tiny_yamls_write_their_model_inside_run_dir(path, tmp_path):
    cfg = load_train_config(path, [f"run_dir={tmp_path / 'run'}"])
    assert cfg.output_model is None  # the trainers then export to <run_dir>/model


def test_debug_run_of_a_tiny_yaml_does_not_touch_the_shipped_models(tmp_path, one_thread):
    shipped = REPO / "checkpoints" / "tiny-t2v-teacher"
    before = file_digests(shipped)
    run = tmp_path / "run"
    cfg = load_train_config(REPO / "configs/train/tiny/t2v_teacher.yaml", [f"run_dir={run}", "max_steps=1", *SMALL])
    assert train(cfg) == run / "model"
    assert (run / "model" / "diffusion_pytorch_model.safetensors").is_file()
    assert file_digests(shipped) == before


# ---- 2. checkpoints: manifest, fsync, verification, fallback ---------------------------------------------------
def _write(root: Path, step: int, keep: int = 5) -> Path:
    nets = {"generator": {"w": torch.arange(6.0).reshape(2, 3)}}
    return save_checkpoint(root, step, nets, {"generator": {"state": {}, "param_groups": []}}, {"x": 1}, keep)


def test_manifest_lists_every_file_with_size_and_checksum_and_everything_is_fsynced(tmp_path, monkeypatch):
    synced = []
    real = checkpoint._fsync
    monkeypatch.setattr(checkpoint, "_fsync", lambda p: (synced.append(Path(p)), real(p)))
    path = _write(tmp_path, 3)
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["checksum"] == "xxh3_64"
    assert sorted(manifest["files"]) == ["generator.safetensors", "optim.pt", "rng.pt", "state.json"]
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == (path / name).stat().st_size
        assert entry["xxh3_64"] == file_checksum(path / name)
    staged = tmp_path / ".tmp_step_00000003"
    names = {p.name for p in synced}
    assert {"generator.safetensors", "optim.pt", "rng.pt", "state.json", f".{MANIFEST}.tmp"} <= names
    assert staged in synced and tmp_path in synced  # the folder before the rename, its parent after
    assert synced.index(staged) < synced.index(tmp_path)
    assert verify_checkpoint(path) is None


@pytest.mark.parametrize("damage, reason", [
    ("truncate_generator", r"generator\.safetensors has \d+ bytes, the manifest says \d+"),
    ("empty_state", r"state\.json has 0 bytes"),
    ("drop_optim", r"optim\.pt is missing"),
    ("flip_a_byte", r"generator\.safetensors does not match its checksum"),
    ("drop_manifest", None),  # an older checkpoint without a manifest is still accepted when its files open
])
def test_verify_checkpoint_names_the_damaged_file(tmp_path, damage, reason):
    path = _write(tmp_path, 1)
    gen = path / "generator.safetensors"
    if damage == "truncate_generator":
        gen.write_bytes(gen.read_bytes()[:40])
    elif damage == "empty_state":
        (path / "state.json").write_text("")
    elif damage == "drop_optim":
        (path / "optim.pt").unlink()
    elif damage == "flip_a_byte":
        data = bytearray(gen.read_bytes())
        data[-1] ^= 1
        gen.write_bytes(bytes(data))
    else:
        (path / MANIFEST).unlink()
    got = verify_checkpoint(path)
    if reason is None:
        assert got is None
    else:
        assert got is not None and __import__("re").search(reason, got), got


def test_export_takes_the_newest_intact_checkpoint_like_a_resume(tmp_path, capsys):
    from distill.export import run_checkpoint

    run = tmp_path / "run"
    first = _write(run / "checkpoints", 1)
    newest = _write(run / "checkpoints", 2)
    gen = newest / "generator.safetensors"
    gen.write_bytes(gen.read_bytes()[:40])  # torn by a kill
    assert run_checkpoint(run, None) == first
    assert "skipping" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"not intact: .*generator\.safetensors has \d+ bytes"):
        run_checkpoint(run, newest)


def test_legacy_checkpoint_without_manifest_is_checked_by_opening_its_files(tmp_path):
    path = _write(tmp_path, 1)
    (path / MANIFEST).unlink()
    gen = path / "generator.safetensors"
    gen.write_bytes(gen.read_bytes()[:40])
    assert "generator.safetensors is not a complete safetensors file" in verify_checkpoint(path)
    (path / "state.json").write_text("")
    assert "state.json is not a JSON object" in verify_checkpoint(path)


@pytest.mark.parametrize("damage, why", [
    ("truncate", "model.safetensors has"),
    ("empty_state", "state.json has 0 bytes"),
    ("drop_optim", "optim.pt is missing"),
])
def test_resume_falls_back_to_the_previous_complete_checkpoint(tmp_path, one_thread, damage, why):
    run = tmp_path / "run"
    ref = tmp_path / "ref"
    train(pretrain_cfg(ref, "max_steps=4", "checkpoint.every=1", "checkpoint.keep=3"))
    train(pretrain_cfg(run, "max_steps=3", "checkpoint.every=1", "checkpoint.keep=3"))
    newest = run / "checkpoints" / "step_00000003"
    if damage == "truncate":
        f = newest / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "empty_state":
        (newest / "state.json").write_text("")
    else:
        (newest / "optim.pt").unlink()
    train(pretrain_cfg(run, "max_steps=4", "checkpoint.every=1", "checkpoint.keep=3"))
    events = (run / "events.log").read_text()
    assert f"checkpoint {newest} is not usable ({why}" in events and "falling back to step_00000002" in events
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'}" in events
    # steps 3 and 4 were trained again from step 2: the same log and weights as an uninterrupted run
    got, want = by_step(metrics(run)), by_step(metrics(ref))
    assert sorted(got) == [1, 2, 3, 4]
    for s in want:
        assert_same_metrics(want[s], got[s])
    a = load_file(str(ref / "checkpoints" / "step_00000004" / "model.safetensors"))
    b = load_file(str(run / "checkpoints" / "step_00000004" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)


def test_resume_without_any_intact_checkpoint_is_an_error_naming_each(tmp_path, one_thread, capsys, tiny_t2v_dir):
    run = tmp_path / "run"
    train(pretrain_cfg(run, "max_steps=2", "checkpoint.every=1"))
    for ckpt in list_checkpoints(run / "checkpoints"):
        (ckpt / "optim.pt").unlink()
    with pytest.raises(CheckpointError, match=r"no intact checkpoint .*step_00000002: optim\.pt is missing; "
                                           r"step_00000001: optim\.pt is missing.*checkpoint\.resume=never"):
        trainer_for(pretrain_cfg(run, "max_steps=3"))  # before any model is built
    bad = run / "checkpoints" / "step_00000002"
    with pytest.raises(CheckpointError, match=r"checkpoint\.resume=.*step_00000002: not an intact checkpoint: optim"):
        trainer_for(pretrain_cfg(run, "max_steps=3", f"checkpoint.resume={bad}"))
    _fails(capsys, ["--config", "configs/train/tiny/t2v_dmd.yaml", f"run_dir={run}", f"model.path={tiny_t2v_dir}"],
           "step_00000001: optim.pt is missing")


# ---- 3. metrics.jsonl of a killed and resumed run ----------------------------------------------------------------
# A training process that SIGKILLs itself when it reaches step index argv[1] (no cleanup, no flush at exit).
KILLED_RUN = """
import os, signal, sys
from distill.config import load_train_config
from train import trainer_for
trainer = trainer_for(load_train_config(None, sys.argv[2:]))
step = trainer.train_step
def dies(i):
    if i == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    return step(i)
trainer.train_step = dies
trainer.train()
"""


class Killed(Exception):
    pass


def _die_in_step_5(run: Path, opts: tuple[str, ...], how: str) -> None:
    """Run pretrain with `opts` and stop it inside step 5: SIGKILL of a child process (slow: a fresh interpreter),
    or an exception raised in-process (the same files are left: every row is flushed when written)."""
    if how == "exception":
        trainer = trainer_for(pretrain_cfg(run, *opts))
        step = trainer.train_step

        def dies(i: int):
            if i == 4:
                raise Killed
            return step(i)

        trainer.train_step = dies
        with pytest.raises(Killed):
            trainer.train()
        return
    args = ["task=pretrain", f"run_dir={run}", f"output_model={run}/model", f"model.components_path={COMPONENTS}",
            "optim.warmup_steps=2", *SMALL, *opts]
    assert load_train_config(None, args) == pretrain_cfg(run, *opts)  # the child runs the same settings
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, "4", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr


@pytest.mark.parametrize("how", ["exception", pytest.param("sigkill", marks=pytest.mark.slow)])
def test_killed_and_resumed_run_logs_the_same_rows_as_an_uninterrupted_one(tmp_path, one_thread, how):
    """Rows every 2 steps, a checkpoint every 3: the run dies in step 5, after row 4 was written and with step
    3's metrics in the checkpoint's unfinished row. The resumed run must drop row 4, restore the sums and write
    rows 4 and 5 as the uninterrupted run did."""
    opts = ("max_steps=5", "logging.every=2", "checkpoint.every=3")
    ref, run = tmp_path / "ref", tmp_path / "run"
    train(pretrain_cfg(ref, *opts))
    _die_in_step_5(run, opts, how)
    assert [r["step"] for r in metrics(run)] == [2, 4]
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.')  # a row cut short (what a kill during a write leaves)
    saved = json.loads((run / "checkpoints" / "step_00000003" / "state.json").read_text())["metrics_pending"]
    assert saved["loss"][1:] == [1, True] and saved["lr"][1:] == [1, False]
    train(pretrain_cfg(run, *opts))
    got, want = by_step(metrics(run)), by_step(metrics(ref))
    assert [r["step"] for r in metrics(run)] == [2, 4, 5]
    for s in want:
        assert_same_metrics(want[s], got[s], rtol=0)


# ---- 4. early errors for bad training inputs ---------------------------------------------------------------
def _fails(capsys, argv: list[str], message: str) -> None:
    assert train_main(argv) == 2
    assert message in capsys.readouterr().err


def test_checkpoints_path_that_is_a_file_fails_before_step_0(tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a folder")
    _fails(capsys, ["--config", "configs/train/tiny/t2v_dmd.yaml", f"run_dir={run}"],
           f"{run / 'checkpoints'} exists and is a file")
    with pytest.raises(ValueError, match="exists and is a file"):
        trainer_for(pretrain_cfg(run, "max_steps=1"))
    assert not (run / "metrics.jsonl").exists()  # nothing was started


@pytest.mark.parametrize("text, message", [
    ("task: [pretrain\n  lr: :\n", "is not valid YAML"),
    ("- task: pretrain\n- max_steps: 2\n", "must be a mapping of keys (task: ..., optim: ...), got a list"),
    ("just a sentence\n", "must be a mapping of keys"),
])
def test_garbled_or_list_shaped_yaml_is_named(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    _fails(capsys, ["--config", str(path)], f"training config {path} ")
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        load_train_config(path)


@pytest.mark.parametrize("override", ["seed=-1", "data.seed=-3", "logging.sample_seed=4294967296"])
def test_seed_out_of_range(capsys, override):
    _fails(capsys, ["--config", "configs/train/tiny/t2v_dmd.yaml", override], "must be in [0, 2**32 - 1]")


def test_truncated_teacher_or_generator_weights_name_the_file(tmp_path, capsys, tiny_t2v_dir):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_t2v_dir, teacher)
    weights = teacher / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    dmd = "configs/train/tiny/t2v_dmd.yaml"
    _fails(capsys, ["--config", dmd, f"model.path={teacher}", f"run_dir={tmp_path / 'r'}"],
           f"{weights} (model.path) is not a complete safetensors file")
    init = tmp_path / "init"
    (init / "distill_models").mkdir(parents=True)
    shutil.copy(tiny_t2v_dir / "config.json", init / "config.json")
    (init / "distill_models" / "distill_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    _fails(capsys, ["--config", "configs/train/tiny/t2v_dmd.yaml", f"model.path={tiny_t2v_dir}",
                    f"model.generator_init={init}", f"run_dir={tmp_path / 'r'}"],
           f"{init / 'distill_models' / 'distill_model.safetensors'} (model.generator_init) is not a complete")


# ---- 5. update guard -------------------------------------------------------------------------------------------
def test_exploding_updates_with_finite_loss_are_undone_and_stop_the_run(tmp_path, one_thread):
    """lr 1e30 keeps the loss finite for a step but throws the weights to ~1e30: each such step is undone and
    counted, the run stops after MAX_NONFINITE, and the last checkpoint (and the live weights) stay clean."""
    run = tmp_path / "run"
    train(pretrain_cfg(run, "max_steps=2"))
    ckpt = run / "checkpoints" / "step_00000002"
    before, weights = file_digests(ckpt), load_file(str(ckpt / "model.safetensors"))
    trainer = trainer_for(pretrain_cfg(run, "max_steps=50", "optim.lr=1e30"))
    with pytest.raises(NonFiniteLossError, match=r"model updates in a row .*exploding.*optim\.max_update=1"):
        trainer.train()
    for k, v in trainer.dit.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert file_digests(ckpt) == before
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000002"]
    events = (run / "events.log").read_text()
    assert "model update skipped: gradient norm" in events and f"({MAX_NONFINITE}/{MAX_NONFINITE} in a row)" in events
    skipped = [r["step"] for r in metrics(run) if r.get("model_update_skipped") == 1.0]
    assert skipped == [3, 4, 5, 6]  # the 5th raised before its row


def test_train_py_reports_the_guard_stop_without_a_traceback(tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    argv = ["--config", "configs/train/tiny/t2v_teacher.yaml", f"run_dir={run}", "max_steps=50", "optim.lr=1e30",
            *SMALL]
    assert train_main(argv) == 1
    err = capsys.readouterr().err
    assert "error: 5 model updates in a row had a non-finite gradient norm" in err and "Traceback" not in err


def test_nonfinite_gradient_norm_is_undone_including_the_optimizer_state(tmp_path, one_thread):
    trainer = trainer_for(pretrain_cfg(tmp_path / "run", "max_steps=3"))
    trainer.train_step(0)  # a good step: optimizer state exists
    w0 = {k: v.clone() for k, v in trainer.dit.state_dict().items()}
    opt_state = {k: v.clone() for k, v in trainer.opt.state[trainer.dit.head.head.weight].items()}
    hook = trainer.dit.head.head.weight.register_hook(lambda g: g * float("inf"))
    trainer.step_flags = {}
    logs = trainer.train_step(1)  # the loss is finite, the gradient is not
    assert torch.isfinite(logs["loss"]) and not torch.isfinite(logs["grad_norm"])
    assert trainer.step_flags == {"model_update_skipped": 1.0}
    assert all(torch.equal(v, w0[k]) for k, v in trainer.dit.state_dict().items())
    for k, v in trainer.opt.state[trainer.dit.head.head.weight].items():
        assert torch.equal(v, opt_state[k]), k
    hook.remove()
    trainer.step_flags = {}
    trainer.train_step(2)
    assert trainer.step_flags == {} and trainer.nonfinite["model update"] == 0
    assert any(not torch.equal(v, w0[k]) for k, v in trainer.dit.state_dict().items())
    trainer.logger.close()


def test_update_guard_off_and_bad_value(tmp_path, one_thread):
    trainer = trainer_for(pretrain_cfg(tmp_path / "run", "max_steps=1", "optim.lr=1e30", "optim.max_update=0"))
    trainer.train_step(0)
    assert trainer.step_flags == {}  # no guard: the step is applied
    assert max(float(p.detach().abs().max()) for p in trainer.dit.parameters()) > 1e20
    trainer.logger.close()
    with pytest.raises(ValueError, match=r"optim\.max_update must be >= 0"):
        load_train_config(None, [f"model.components_path={COMPONENTS}", "optim.max_update=-1"])


def test_recipe_is_the_only_writer_of_shipped_models():
    """Every `--out checkpoints/...` in the recipe is an explicit export; no training YAML names checkpoints/ as
    an output."""
    recipe = (REPO / "scripts" / "tiny_recipe.sh").read_text()
    assert "--out checkpoints/tiny-t2v-teacher" in recipe and "--out checkpoints/tiny-i2v-distill-4step" in recipe
    for path in TINY_YAMLS:
        assert "output_model" not in yaml.safe_load(path.read_text()), path
