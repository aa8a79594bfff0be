"""DMD with a two-expert (Wan2.2 A14B-style) teacher, distill/moe.py (CPU, tiny experts, seconds): the student-step
split, expert fine-tuning timesteps, per-step routing of the generator rollout and per-sample routing of the real
score, gradients only into the expert of the exit step, exact resume of both experts, the export layout and LoRA
names, config errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.config import load_train_config
from distill.losses import critic_sigmas, dmd_loss, flow_matching_loss, sample_sigmas
from distill.moe import (
    EXPERTS_FILE,
    HIGH,
    LOW,
    assemble,
    check_dmd,
    folder_boundary,
    is_expert_folder,
    load_pair,
    range_flow_matching_loss,
    range_sigmas,
    student_split,
)
from inference.flow import timestep_of
from inference.guidance import Cond
from inference.sampling import backward_simulation, gaussian_noise
from inference.schedule import StudentSchedule
from models.components import load_dit, make_tiny_model
from tests.conftest import SMALL_DIT
from tests.trainer_util import REPO, assert_same_checkpoint, assert_same_metrics, by_step, dmd_cfg, metrics, train
from train import trainer_for

BOUNDARY = 0.875


@pytest.fixture(scope="module")
def moe_teacher(tmp_path_factory) -> Path:
    """Two random tiny experts (different seeds, so routing errors show) assembled into a two-expert folder."""
    root = tmp_path_factory.mktemp("moe")
    high = make_tiny_model(root / "high", "tiny-t2v", seed=0, **SMALL_DIT)
    low = make_tiny_model(root / "low", "tiny-t2v", seed=1, **SMALL_DIT)
    return assemble(high, low, root / "teacher", BOUNDARY)


def _cfg(run: Path, teacher: Path, *overrides: str):
    return dmd_cfg(run, teacher, "dmd.dfake_gen_update_ratio=1", *overrides)


class Spy:
    """Records the timesteps each expert is called with (wraps forward; outputs unchanged)."""

    def __init__(self, pair) -> None:
        self.seen: dict[str, list[list[float]]] = {HIGH: [], LOW: []}
        for name in (HIGH, LOW):
            expert = getattr(pair, name)
            orig = expert.forward

            def forward(x, t, *a, _orig=orig, _name=name, **k):
                self.seen[_name].append(torch.as_tensor(t).flatten().tolist())
                return _orig(x, t, *a, **k)

            expert.forward = forward


# ---- the split, the boundary, the folder --------------------------------------------------------------------------
def test_student_split_uses_the_shifted_timesteps():
    four = StudentSchedule((1000, 750, 500, 250), 5.0)  # timesteps [1000, 937.5, 833.3, 625]
    assert student_split(four, 0.875) == ([0, 1], [2, 3])  # LightX2V's Wan2.2 boundary_step_index 2
    assert student_split(four, 0.900) == ([0, 1], [2, 3])  # the I2V boundary gives the same split
    # unshifted, 750 < 875 would have given 1 + 3: the shift decides
    assert student_split(StudentSchedule((1000, 750, 500, 250), 1.0), 0.875) == ([0], [1, 2, 3])
    assert student_split(StudentSchedule((1000,), 5.0), 0.875) == ([0], [])


def test_assembled_folder_and_boundary(moe_teacher, tmp_path):
    assert is_expert_folder(moe_teacher) and not is_expert_folder(moe_teacher / HIGH)
    assert json.loads((moe_teacher / EXPERTS_FILE).read_text()) == {"boundary": BOUNDARY}
    assert (moe_teacher / "components.json").is_file() and not (moe_teacher / "config.json").exists()
    for name, seed in ((HIGH, 0), (LOW, 1)):
        ref = make_tiny_model(tmp_path / name, "tiny-t2v", seed=seed, **SMALL_DIT)
        got, want = load_dit(moe_teacher / name).state_dict(), load_dit(ref).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert folder_boundary(moe_teacher) == BOUNDARY and folder_boundary(moe_teacher, 0.9) == 0.9
    # an official folder has no experts.json: the task's official boundary, as inference chooses it
    (moe_teacher / EXPERTS_FILE).rename(tmp_path / EXPERTS_FILE)
    try:
        assert folder_boundary(moe_teacher) == 0.875
        cfg = json.loads((moe_teacher / HIGH / "config.json").read_text())
        (moe_teacher / HIGH / "config.json").write_text(json.dumps({**cfg, "model_type": "i2v"}))
        assert folder_boundary(moe_teacher) == 0.9
    finally:
        (moe_teacher / HIGH / "config.json").write_text(json.dumps(cfg))
        (tmp_path / EXPERTS_FILE).rename(moe_teacher / EXPERTS_FILE)
    with pytest.raises(ValueError, match="different configs"):
        assemble(moe_teacher / HIGH, make_tiny_model(tmp_path / "wide", "tiny-t2v", dim=32, ffn_dim=64, num_heads=2,
                                                     num_layers=2), tmp_path / "bad", BOUNDARY)


# ---- expert fine-tuning: timesteps inside pretrain.t_range --------------------------------------------------------
def test_range_sigmas_are_the_truncated_shifted_density():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(range_sigmas(4096, 3.0, [0, 1000], g1), sample_sigmas(4096, 3.0, g2),
                               rtol=0, atol=1e-6)  # float64 vs float32 map: ulps
    s = range_sigmas(20000, 3.0, [875, 1000], torch.Generator().manual_seed(0))
    assert float(s.min()) >= 0.875 - 1e-6 and float(s.max()) <= 1.0
    # truncation, not clamping: the fraction below a midpoint equals the conditional probability of the full law
    ref = sample_sigmas(400000, 3.0, torch.Generator().manual_seed(1))
    inside = ref[ref >= 0.875]
    assert abs(float((s < 0.95).float().mean()) - float((inside < 0.95).float().mean())) < 0.015
    low = range_sigmas(1000, 3.0, [0, 875], torch.Generator().manual_seed(0))
    assert float(low.max()) < 0.875


def test_range_loss_matches_flow_matching_loss_on_the_full_range(moe_teacher):
    net = load_dit(moe_teacher / HIGH)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 16, 2, 8, 8, generator=g)
    cond = Cond(torch.randn(2, 5, net.text_dim, generator=g))
    a = flow_matching_loss(net, x0, cond, 3.0, torch.Generator().manual_seed(5))
    b = range_flow_matching_loss(net, x0, cond, 3.0, [0, 1000], torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=0)


def test_pretrain_t_range_draws_only_inside(tmp_path, one_thread):
    from tests.trainer_util import pretrain_cfg

    trainer = trainer_for(pretrain_cfg(tmp_path / "run", "max_steps=1", "pretrain.t_range=[875,1000]"))
    seen = []
    orig = trainer.dit.forward
    trainer.dit.forward = lambda x, t, *a, **k: (seen.append(t.detach().clone()), orig(x, t, *a, **k))[1]
    trainer.train_step(0)
    t = torch.cat(seen)
    assert t.numel() == 2 and bool((t >= 875).all()) and bool((t <= 1000).all())
    trainer.logger.close()


# ---- DMD: routing and gradients ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trainer(moe_teacher, tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    tr = trainer_for(_cfg(tmp_path_factory.mktemp("moe_dmd") / "run", moe_teacher, "max_steps=4", "optim.lr=1e-3"))
    yield tr
    tr.logger.close()
    torch.set_num_threads(n)


def test_generator_and_critic_start_as_their_teacher_experts(trainer, moe_teacher):
    real = load_pair(moe_teacher, BOUNDARY)
    for net in (trainer.gen, trainer.critic, trainer.real_score):
        for name in (HIGH, LOW):
            got, want = getattr(net, name).state_dict(), getattr(real, name).state_dict()
            assert all(torch.equal(got[k], want[k]) for k in want), name
    assert not any(p.requires_grad for p in trainer.real_score.parameters())


def test_rollout_runs_the_expert_of_each_step(trainer):
    spy = Spy(trainer.gen)
    cond, _, noise, rng, _ = trainer._batch(0, 0, 0)
    with torch.no_grad():
        backward_simulation(lambda x, t: cond(trainer.gen, x, t), noise, trainer.scheduler, 3, gaussian_noise(rng))
    high = [round(t[0], 1) for t in spy.seen[HIGH]]
    low = [round(t[0], 1) for t in spy.seen[LOW]]
    assert high == [1000.0, 937.5] and low == [833.3, 625.0]
    del trainer.gen.high_noise_model.forward, trainer.gen.low_noise_model.forward


def test_real_score_routes_each_critic_timestep(trainer):
    spy_real, spy_fake = Spy(trainer.real_score), Spy(trainer.critic)
    cond, uncond, noise, _, _ = trainer._batch(0, 0, 0)
    x = noise[:, :, :, :, :] * 0.5
    cond, uncond = Cond(cond.context.repeat(4, 1, 1)), Cond(uncond.context.repeat(4, 1, 1))
    x = x.repeat(4, 1, 1, 1, 1)  # 8 samples: both sides of the boundary are drawn
    g = torch.Generator().manual_seed(11)
    dmd_loss(x, trainer.real_score, trainer.critic, cond, uncond, 5.0, 5.0, generator=g)
    t = timestep_of(critic_sigmas(8, 5.0, 20.0, 980.0, torch.Generator().manual_seed(11)))
    want_high = sorted(float(v) for v in t if v >= 875)
    assert want_high and len(want_high) < 8
    for spy in (spy_real, spy_fake):
        high, low = sum(spy.seen[HIGH], []), sum(spy.seen[LOW], [])
        assert all(v >= 875 for v in high) and all(v < 875 for v in low)
    # the teacher's CFG forward runs [cond; uncond]: each high-noise timestep twice
    assert sorted(sum(spy_real.seen[HIGH], [])) == pytest.approx(sorted(want_high * 2))
    assert sorted(sum(spy_fake.seen[HIGH], [])) == pytest.approx(want_high)
    for net in (trainer.real_score, trainer.critic):
        del net.high_noise_model.forward, net.low_noise_model.forward


def test_one_guidance_scale_per_teacher_expert(trainer, moe_teacher, tmp_path, tiny_t2v_dir):
    from distill.losses import guided_x0
    from distill.moe import ExpertGuidance

    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 16, 2, 8, 8, generator=g)
    cond, uncond = (Cond(torch.randn(4, 5, trainer.real_score.high_noise_model.text_dim, generator=g))
                    for _ in range(2))
    s = torch.tensor([0.95, 0.9, 0.8, 0.5])  # t = 950, 900 (high-noise expert), 800, 500 (low-noise expert)
    with torch.no_grad():
        got = guided_x0(trainer.real_score, x, s, cond, uncond, ExpertGuidance(4.0, None, 3.0, 875.0))
        for i, w in enumerate((4.0, 4.0, 3.0, 3.0)):
            c, u = Cond(cond.context[i:i + 1]), Cond(uncond.context[i:i + 1])
            want = guided_x0(trainer.real_score, x[i:i + 1], s[i:i + 1], c, u, w)
            torch.testing.assert_close(got[i:i + 1], want, rtol=1e-5, atol=1e-5)  # batch of 4 vs 1
    assert trainer.real_guidance == trainer.cfg.dmd.guide_scale  # not set: one scale for both experts
    tr = trainer_for(_cfg(tmp_path / "run", moe_teacher, "max_steps=1", "dmd.guide_scale_low=3.0"))
    assert tr.real_guidance == ExpertGuidance(5.0, (300.0, 850.0), 3.0, 875.0)
    tr.logger.close()
    with pytest.raises(ValueError, match="dmd.guide_scale_low .* holds one DiT"):
        trainer_for(dmd_cfg(tmp_path / "one", tiny_t2v_dir, "dmd.guide_scale_low=3.0"))


@pytest.mark.parametrize("exit_step,owner", [(0, HIGH), (3, LOW)])
def test_only_the_exit_steps_expert_gets_gradients(trainer, exit_step, owner, monkeypatch):
    other = LOW if owner == HIGH else HIGH
    before = {n: {k: v.clone() for k, v in getattr(trainer.gen, n).state_dict().items()} for n in (HIGH, LOW)}
    grads = {}
    orig = trainer.clip_and_step

    def capture(name, *a, **k):
        if name == "generator":
            grads.update({n: [p.grad is not None for p in getattr(trainer.gen, n).parameters()] for n in (HIGH, LOW)})
        return orig(name, *a, **k)

    monkeypatch.setattr(trainer, "clip_and_step", capture)
    monkeypatch.setattr(trainer, "exit_step", lambda step, phase: exit_step)
    state = trainer.opt_g.state
    steps = lambda n: [int(state[p]["step"]) if p in state else 0 for p in getattr(trainer.gen, n).parameters()]  # noqa: E731
    moments = {n: steps(n) for n in (HIGH, LOW)}
    trainer.generator_step(0)
    assert any(grads[owner]) and not any(grads[other])
    after = {n: getattr(trainer.gen, n).state_dict() for n in (HIGH, LOW)}
    assert any(not torch.equal(before[owner][k], after[owner][k]) for k in after[owner])
    assert all(torch.equal(before[other][k], after[other][k]) for k in after[other])
    # AdamW did not step the other expert (no zero-gradient moments, no weight decay): its step counts are unchanged
    assert steps(other) == moments[other] and all(a == b + 1 for a, b in zip(steps(owner), moments[owner]))


# ---- resume, export ----------------------------------------------------------------------------------------------
def test_resume_restores_both_experts_exactly(moe_teacher, tmp_path, one_thread):
    full, part = tmp_path / "full", tmp_path / "part"
    args = ("optim.lr=1e-3", "dmd.lr_critic=1e-3", "dmd.ema_start=1")
    train(_cfg(full, moe_teacher, "max_steps=4", *args))
    train(_cfg(part, moe_teacher, "max_steps=2", *args))
    train(_cfg(part, moe_teacher, "max_steps=4", *args))
    assert "resumed from" in (part / "events.log").read_text()
    ref, got = by_step(metrics(full)), by_step(metrics(part))
    for step in range(1, 5):
        assert_same_metrics(ref[step], got[step])
    a, b = full / "checkpoints" / "step_00000004", part / "checkpoints" / "step_00000004"
    assert_same_checkpoint(a, b)
    gen = load_file(str(a / "generator.safetensors"))
    assert {k.split(".")[0] for k in gen} == {HIGH, LOW}  # both experts in the checkpoint
    assert set(torch.load(a / "optim.pt", weights_only=True)) == {"generator", "critic"}
    # both experts trained over the 4 steps (exit steps of both sides were drawn)
    teacher = load_pair(moe_teacher, BOUNDARY).state_dict()
    for name in (HIGH, LOW):
        assert any(not torch.equal(gen[k], teacher[k]) for k in gen if k.startswith(name)), name
    # the trainer's export (step 4 > ema_start): each expert's EMA weights, at full precision
    ema = load_file(str(a / "ema.safetensors"))
    student = load_pair(full / "model", BOUNDARY, distill=True).state_dict()
    assert ema.keys() <= student.keys() and all(torch.equal(student[k], ema[k]) for k in ema)
    assert any(not torch.equal(ema[k], gen[k]) for k in ema)


def test_lora_mode_resume_restores_both_experts_adapters(moe_teacher, tmp_path, one_thread):
    full, part = tmp_path / "full", tmp_path / "part"
    args = ("optim.lr=1e-3", "dmd.lr_critic=1e-3", "dmd.ema_start=1", "lora.enabled=true", "lora.rank=4")
    train(_cfg(full, moe_teacher, "max_steps=4", *args))
    train(_cfg(part, moe_teacher, "max_steps=2", *args))
    train(_cfg(part, moe_teacher, "max_steps=4", *args))
    ref, got = by_step(metrics(full)), by_step(metrics(part))
    for step in range(1, 5):
        assert_same_metrics(ref[step], got[step])
    a = full / "checkpoints" / "step_00000004"
    assert_same_checkpoint(a, part / "checkpoints" / "step_00000004")
    assert {k.split(".")[0] for k in load_file(str(a / "critic.safetensors"))} == {HIGH, LOW}


def test_export_layout_and_lora_names(moe_teacher, tmp_path, one_thread):
    run = tmp_path / "run"
    train(_cfg(run, moe_teacher, "max_steps=2", "optim.lr=1e-3", "dmd.ema_start=100",
               'logging.sample_prompts=["a red circle moving left"]'))
    assert (run / "samples" / "step0000002_0.mp4").is_file()  # sampled through the pair, as inference does
    model = run / "model"
    info = json.loads((model / EXPERTS_FILE).read_text())
    assert info["boundary"] == BOUNDARY and info["boundary_step_index"] == 2
    assert info[HIGH]["denoising_steps"] == [1000, 750] and info[LOW]["timesteps"] == [833.3333, 625.0]
    assert json.loads((model / "schedule.json").read_text())["denoising_step_list"] == [1000, 750, 500, 250]
    for name in (HIGH, LOW):  # the official expert folders, the weights at LightX2V's distill_models/<expert>/
        assert (model / name / "config.json").is_file()
        assert (model / "distill_models" / name / "distill_model.safetensors").is_file()
    assert (model / "components.json").is_file()
    loaded = load_pair(model, BOUNDARY, distill=True)  # read back as inference reads it (models/moe_loading.py)
    assert all(str(getattr(loaded, n).weights_source).endswith(f"distill_models/{n}/distill_model.safetensors")
               for n in (HIGH, LOW))
    # inference (inference/loader.py) adopts the folder's schedule and runs the two distilled experts
    from inference.config import InferConfig
    from inference.loader import load_pipeline

    pipe = load_pipeline(InferConfig(task="t2v", model_cls="wan2.2_moe", target_video_length=5, target_height=32,
                                     target_width=32, sample_neg_prompt="", dtype="fp32", device="cpu"), model)
    assert pipe.cfg.model_cls == "wan2.2_moe_distill" and pipe.cfg.denoising_step_list == [1000, 750, 500, 250]
    served, trained = pipe.dit.state_dict(), loaded.state_dict()
    assert served.keys() == trained.keys() and all(torch.equal(served[k], trained[k]) for k in trained)
    # the export CLI: the same folder, and --lora as a folder of the Wan2.2-Lightning file names
    out, lora = tmp_path / "cli", tmp_path / "loras"
    cmd = ["--run", str(run), "--out", str(out), "--weights", "raw", "--dtype", "fp32", "--lora", str(lora),
           "--lora-rank", "4", "--lora-min-numel", "1000"]
    res = subprocess.run([sys.executable, "-m", "distill.export", *cmd], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in lora.iterdir()) == ["high_noise_model.safetensors", "low_noise_model.safetensors"]
    a, b = load_pair(out, BOUNDARY, distill=True).state_dict(), load_pair(model, BOUNDARY, distill=True).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in (HIGH, LOW):
        keys = load_file(str(lora / f"{name}.safetensors"))
        assert keys and all(k.startswith("diffusion_model.") for k in keys)


def test_lora_mode_trains_adapters_and_exports_per_expert_loras(moe_teacher, tmp_path, one_thread):
    run = tmp_path / "run"
    tr = trainer_for(_cfg(run, moe_teacher, "max_steps=2", "lora.enabled=true", "lora.rank=4", "optim.lr=1e-3"))
    base = {n: getattr(tr.real_score, n).blocks[0].self_attn.q.weight for n in (HIGH, LOW)}
    for n in (HIGH, LOW):  # the generator's and critic's experts share their teacher expert's frozen base
        assert getattr(tr.gen, n).blocks[0].self_attn.q.base.weight is base[n]
        assert getattr(tr.critic, n).blocks[0].self_attn.q.base.weight is base[n]
    tr.train()
    names = sorted(p.name for p in (run / "model" / "loras").iterdir())
    assert names == ["high_noise_model.safetensors", "low_noise_model.safetensors"]
    ckpt = load_file(str(run / "checkpoints" / "step_00000002" / "generator.safetensors"))
    assert ckpt and all(".lora_up." in k or ".lora_down." in k for k in ckpt)
    # inference: the teacher + one LoRA per expert (lora_configs[].name, LightX2V's key) = the exported student
    from inference.config import InferConfig, LoraSpec
    from inference.loader import load_pipeline

    loras = [LoraSpec(str(run / "model" / "loras" / f"{n}.safetensors"), 1.0, n) for n in (HIGH, LOW)]
    pipe = load_pipeline(InferConfig(task="t2v", model_cls="wan2.2_moe_distill", denoising_step_list=[1000, 750, 500,
                                     250], sample_shift=5.0, enable_cfg=False, lora_configs=loras, dtype="fp32",
                                     device="cpu"), moe_teacher)
    student = load_pair(run / "model", BOUNDARY, distill=True).state_dict()
    served = pipe.dit.state_dict()
    for k, v in student.items():
        torch.testing.assert_close(served[k], v, rtol=1e-5, atol=1e-6, msg=k)  # merge order: fp32 rounding


def test_shared_generator_and_critic_start_from_the_chosen_expert(moe_teacher, tmp_path, one_thread):
    tr = trainer_for(_cfg(tmp_path / "run", moe_teacher, "max_steps=1", "dmd.generator=shared", "dmd.critic=shared",
                          "dmd.shared_init=high_noise_model"))
    want = load_dit(moe_teacher / HIGH).state_dict()
    for net in (tr.gen, tr.critic):
        assert all(torch.equal(net.state_dict()[k], want[k]) for k in want)
    tr.train()
    assert (tmp_path / "run" / "model" / "config.json").is_file()  # a one-DiT student
    assert not (tmp_path / "run" / "model" / HIGH).exists()


# ---- config errors -----------------------------------------------------------------------------------------------
def test_config_errors(moe_teacher, tmp_path, tiny_t2v_dir):
    for bad, match in (("model.boundary=875", r"model.boundary .*\(0, 1\)"), ("model.boundary=0", "model.boundary"),
                       ("pretrain.t_range=[900,800]", "pretrain.t_range"), ("dmd.critic=both", "dmd.critic"),
                       ("dmd.generator=one", "dmd.generator")):
        with pytest.raises(ValueError, match=match):
            load_train_config(REPO / "configs/train/tiny/t2v_dmd.yaml", [bad])
    cases = [
        (("model.generator_init=" + str(tiny_t2v_dir),), "holds one DiT but dmd.generator=per_expert"),
        (("model.generator_init=" + str(moe_teacher), "dmd.generator=shared"), "two-expert folder but"),
        (("distill.denoising_step_list=[1000]",), "high-noise side"),
    ]
    for overrides, match in cases:
        with pytest.raises(ValueError, match=match):
            trainer_for(_cfg(tmp_path / "run", moe_teacher, "max_steps=1", *overrides))
    cfg = json.loads((moe_teacher / HIGH / "config.json").read_text())
    (moe_teacher / HIGH / "config.json").write_text(json.dumps({**cfg, "model_type": "ti2v"}))
    try:
        with pytest.raises(ValueError, match="holds ti2v experts: two-expert DMD takes T2V-A14B or I2V-A14B"):
            check_dmd(_cfg(tmp_path / "run", moe_teacher))
    finally:
        (moe_teacher / HIGH / "config.json").write_text(json.dumps(cfg))
    # a truncated expert file is named before any model is read
    import shutil

    broken = shutil.copytree(moe_teacher, tmp_path / "broken")
    f = broken / LOW / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"low_noise_model/diffusion_pytorch_model.safetensors \(model.path"):
        check_dmd(_cfg(tmp_path / "run", broken))
    # the DeepSpeed engines wrap one DiT per network (checked before any model is read; FSDP2: test_moe_sharded.py)
    with pytest.raises(ValueError, match="distributed.engine=zero2"):
        check_dmd(_cfg(tmp_path / "run", moe_teacher, "distributed.engine=zero2"))


# ---- planner -----------------------------------------------------------------------------------------------------
def test_planner_counts_expert_copies(moe_teacher, tmp_path):
    from distill.moe_plan import ExpertPlan, two_experts
    from distill.plan import estimate

    cfg = _cfg(tmp_path / "run", moe_teacher)
    assert two_experts(cfg) and not two_experts(dmd_cfg(tmp_path / "one", moe_teacher / HIGH))
    one = estimate(cfg, "fsdp", 4, experts=False).memory
    for gen, critic in (("per_expert", "per_expert"), ("per_expert", "shared"), ("shared", "shared")):
        cfg.dmd.generator, cfg.dmd.critic = gen, critic
        g, c = (2 if gen == "per_expert" else 1), (2 if critic == "per_expert" else 1)
        plan = estimate(cfg, "fsdp", 4)
        assert isinstance(plan, ExpertPlan) and plan.experts == {"generator": g, "critic": c, "teacher": 2}
        m = plan.memory
        assert m["AdamW states (2 x fp32)"] == pytest.approx(one["AdamW states (2 x fp32)"] * (g + c) / 2)
        assert m["frozen parameters (teacher / shared base)"] == pytest.approx(
            2 * one["frozen parameters (teacher / shared base)"])
        assert m["EMA (fp32)"] == pytest.approx(g * one["EMA (fp32)"])
        assert m["gradients (fp32, one network at a time)"] == pytest.approx(
            c * one["gradients (fp32, one network at a time)"])
        assert m["activations"] == one["activations"]
        assert m["peak"] == pytest.approx(max(m["peak in backward"], m["peak in optimizer step"]))
    # offloaded: the same items in CPU memory
    cfg.dmd.generator = cfg.dmd.critic = "per_expert"
    off = estimate(cfg, "fsdp", 4, offload=True)
    assert off.cpu_memory["EMA (fp32)"] == pytest.approx(2 * estimate(cfg, "fsdp", 4, offload=True,
                                                                      experts=False).cpu_memory["EMA (fp32)"])


def test_a14b_config_header_matches_the_planner():
    import re

    from distill.plan import estimate

    path = REPO / "configs/train/wan/t2v_a14b_dmd.yaml"
    head = re.sub(r"\s+", " ", " ".join(line.lstrip("# ").rstrip("\\") for line in path.read_text().splitlines()
                                        if line.startswith("#")))
    cfg = load_train_config(path)
    plan = estimate(cfg, "fsdp", 8, offload=True)
    assert float(re.search(r"peak (\d+\.\d) GiB per GPU", head).group(1)) == pytest.approx(plan.peak, abs=0.051)
    assert float(re.search(r"host RAM (\d+) GiB per node", head).group(1)) == pytest.approx(
        plan.host_memory["peak per node"], abs=0.51)
    assert "accelerate launch --config_file configs/accelerate/fsdp.yaml train.py --config " \
           "configs/train/wan/t2v_a14b_dmd.yaml distributed.cpu_offload=true" in head  # the planned engine


def test_two_processes_equal_one_with_accumulation(moe_teacher, tmp_path):
    """DDP over gloo (2 CPU processes) = one process with grad_accum=2: the expert a generator step does not run stays
    untouched on both ranks (weight decay 1.0 would show a zero-gradient AdamW step), a critic expert reached by one
    rank's batch only is averaged as accumulation sums it."""
    from tests.test_distributed import SMALL, assert_close_runs, launch

    base = ["--config", "configs/train/tiny/t2v_moe_dmd.yaml", f"model.path={moe_teacher}", "max_steps=3",
            "dmd.dfake_gen_update_ratio=1", "dmd.ema_start=1", "optim.lr=1e-3", "dmd.lr_critic=1e-3",
            "optim.weight_decay=1.0", *SMALL]
    one, two = tmp_path / "one", tmp_path / "two"
    launch([*base, f"run_dir={one}", f"output_model={one}/model", "grad_accum=2"], 1, tmp_path)
    launch([*base, f"run_dir={two}", f"output_model={two}/model"], 2, tmp_path)
    assert_close_runs(one, two, ["generator_loss", "critic_loss", "generator_grad_norm", "critic_grad_norm",
                                 "exit_step"])
    assert (two / "model" / "distill_models" / HIGH / "distill_model.safetensors").is_file()


def test_ode_init_with_a_two_expert_teacher_then_dmd_from_it(moe_teacher, tmp_path, one_thread):
    """task ode: the teacher pair writes the trajectories, the generator pair regresses each student step with the
    expert of its timestep and exports a two-expert folder, from which two-expert DMD starts (generator_init)."""
    from tests.trainer_util import ode_cfg

    ode = tmp_path / "ode"
    tr = trainer_for(ode_cfg(ode, moe_teacher, tmp_path / "bank", "max_steps=2", "optim.lr=1e-3"))
    spy = Spy(tr.unwrap(tr.gen))
    tr.train()
    seen = {n: sum(spy.seen[n], []) for n in (HIGH, LOW)}
    assert all(t >= 875 for t in seen[HIGH]) and all(t < 875 for t in seen[LOW]) and seen[HIGH] + seen[LOW]
    init = load_pair(ode / "model", BOUNDARY, distill=True).state_dict()
    assert json.loads((ode / "model" / EXPERTS_FILE).read_text())["boundary_step_index"] == 2
    dmd = trainer_for(_cfg(tmp_path / "dmd", moe_teacher, "max_steps=1", f"model.generator_init={ode / 'model'}"))
    got = dmd.gen.state_dict()
    assert all(torch.equal(got[k], init[k]) for k in init)
    dmd.logger.close()
