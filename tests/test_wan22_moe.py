"""Wan2.2 A14B two-expert inference (docs/wan22.md): folders of both layouts, the per-step expert and guidance
scale, the distilled student's split, the expert offload, and the errors. Mini folders (models/mini_moe.py)."""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from inference import pipeline as pipeline_module
from inference.config import InferConfig, load_config
from inference.loader import check_before_loading, config_for_folder, load_pipeline
from inference.moe import DEFAULT_BOUNDARY, HIGH, LOW, expert_plan, step_scales
from inference.offload import offloader
from models.loading import write_safetensors
from models.mini_moe import write_mini_moe
from models.registry import MODEL_SPECS

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(target_video_length=5, target_height=32, target_width=32, device="cpu", dtype="fp32")
PROMPT = "a red circle moving left"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wan22")
    out = {}
    for task in ("t2v", "i2v"):
        for layout in ("official", "diffusers"):
            out[f"{task}_{layout}"] = write_mini_moe(root / f"{task}_{layout}", task, layout, sharded=task == "i2v")
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)


def teacher(task: str, **kw) -> InferConfig:
    base = load_config(REPO / f"configs/infer/wan22/wan22_moe_{task}.json")
    return base.replace(**{**SMALL, "infer_steps": 6, **kw})


def spy_experts(pipe) -> list[tuple[str, float]]:
    """(expert name, timestep) of every expert call, in order."""
    calls: list[tuple[str, float]] = []
    for name in ("high_noise_model", "low_noise_model"):
        expert = getattr(pipe.dit, name)
        expert.register_forward_pre_hook(lambda m, args, n=name: calls.append((n, float(args[1].reshape(-1)[0]))))
    return calls


# ---- facts ---------------------------------------------------------------------------------------------------
def test_official_defaults_in_configs_and_registry():
    """Wan2.2 wan/configs/wan_t2v_A14B.py: shift 12, 40 steps, boundary 0.875, guide (3.0, 4.0) = (low, high);
    wan_i2v_A14B.py: shift 5, 40 steps, boundary 0.900, guide (3.5, 3.5). LightX2V writes [high, low]."""
    t2v, i2v = (load_config(REPO / f"configs/infer/wan22/wan22_moe_{t}.json") for t in ("t2v", "i2v"))
    assert (t2v.sample_shift, t2v.infer_steps, t2v.boundary, t2v.guide_scales()) == (12.0, 40, 0.875, (4.0, 3.0))
    assert (i2v.sample_shift, i2v.infer_steps, i2v.boundary, i2v.guide_scales()) == (5.0, 40, 0.900, (3.5, 3.5))
    assert MODEL_SPECS["wan2.2-t2v-a14b"].experts["boundary"] == DEFAULT_BOUNDARY["t2v"] == 0.875
    assert MODEL_SPECS["wan2.2-i2v-a14b"].experts["boundary"] == DEFAULT_BOUNDARY["i2v"] == 0.900
    for t in ("t2v", "i2v"):
        d = load_config(REPO / f"configs/infer/wan22/wan22_moe_{t}_distill_4step.json")
        assert (d.model_cls, d.denoising_step_list, d.boundary_step_index, d.enable_cfg) == (
            "wan2.2_moe_distill", [1000, 750, 500, 250], 2, False)


def test_expert_plan_by_timestep_and_by_step_index():
    ts = [1000.0, 937.5, 833.3333, 625.0]  # [1000, 750, 500, 250] at shift 5
    assert expert_plan(ts, 0.875) == [HIGH, HIGH, LOW, LOW]  # the boundary split equals LightX2V's index 2
    assert expert_plan(ts, 0.900) == [HIGH, HIGH, LOW, LOW]
    assert expert_plan(ts, 0.875, boundary_step_index=1) == [HIGH, LOW, LOW, LOW]
    assert expert_plan([875.0, 874.99], 0.875) == [HIGH, LOW]  # the boundary itself is the high-noise expert's
    assert step_scales([HIGH, LOW, LOW], (4.0, 3.0)) == [4.0, 3.0, 3.0]


# ---- sampling ------------------------------------------------------------------------------------------------
def test_each_step_runs_the_expert_of_its_timestep(folders):
    pipe = load_pipeline(teacher("t2v"), folders["t2v_official"])
    calls = spy_experts(pipe)
    pipe.generate(PROMPT)
    ts = pipeline_module.make_scheduler(pipe.cfg)
    ts.set_timesteps(6)
    want = ["high_noise_model" if float(t) >= 875 else "low_noise_model" for t in ts.timesteps]
    assert [n for n, _ in calls] == want  # one call per step: CFG is one batched forward
    assert 0 < want.count("high_noise_model") < 6  # both experts ran (shift 12 keeps several steps above 875)
    assert all((t >= 875) == (n == "high_noise_model") for n, t in calls)
    assert pipe.switch.calls == [want.count("high_noise_model"), want.count("low_noise_model")]


def test_per_expert_guidance_scales(folders, monkeypatch):
    pipe = load_pipeline(teacher("t2v", sample_guide_scale=[4.0, 3.0]), folders["t2v_official"])
    seen = []
    real = pipeline_module.guided_velocity

    def spy(net, x, t, cond, uncond, guidance, per_sample, apply=True):
        seen.append((net, guidance.scale, apply))
        return real(net, x, t, cond, uncond, guidance, per_sample, apply)

    monkeypatch.setattr(pipeline_module, "guided_velocity", spy)
    pipe.generate(PROMPT)
    assert seen and all(apply for _, _, apply in seen)
    for net, w, _ in seen:
        assert w == (4.0 if net is pipe.dit.high_noise_model else 3.0)
    # a single number serves both experts; scale 1 on both turns CFG off (the conditional branch alone)
    seen.clear()
    pipe.generate(PROMPT, sample_guide_scale=1.0)
    assert seen and all(not apply for _, _, apply in seen) and pipe.timings.nfe == 6


def test_guide_scale_changes_only_its_experts_steps(folders):
    """[4, 3] and [4, 1] share the high-noise steps' guidance: a spy-free check that index 0 is the high expert."""
    pipe = load_pipeline(teacher("t2v", infer_steps=4), folders["t2v_official"])
    a = pipe.generate(PROMPT, sample_guide_scale=[4.0, 3.0])
    b = pipe.generate(PROMPT, sample_guide_scale=[4.0, 3.0], boundary=0.001)  # every step on the high expert
    c = pipe.generate(PROMPT, sample_guide_scale=[4.0, 1.0], boundary=0.001)  # low scale unused: same video
    assert np.array_equal(b, c) and not np.array_equal(a, b)


@pytest.mark.parametrize("granularity", ["model", "block"])
def test_offloaded_experts_give_the_resident_video(folders, granularity):
    cfg = teacher("t2v", infer_steps=4)
    resident = load_pipeline(cfg, folders["t2v_official"]).generate(PROMPT)
    pipe = load_pipeline(cfg.replace(cpu_offload=True, offload_granularity=granularity), folders["t2v_official"])
    high, low = pipe.dit.high_noise_model, pipe.dit.low_noise_model
    active_at_low = []
    low.register_forward_pre_hook(lambda m, a: active_at_low.append(any(u.active for u in offloader(high).units)))
    video = pipe.generate(PROMPT)
    assert np.array_equal(video, resident)  # the same tensors, moved: exact
    assert active_at_low and not any(active_at_low)  # the high expert was released when the boundary was crossed
    assert not any(u.active for e in (high, low) for u in offloader(e).units)  # both released after sampling


# ---- folders -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_both_layouts_load_the_same_experts_and_video(folders, image, task):
    cfg = teacher(task, infer_steps=3)
    pipes = [load_pipeline(cfg, folders[f"{task}_{layout}"]) for layout in ("official", "diffusers")]
    for name in ("high_noise_model", "low_noise_model"):
        a, b = (getattr(p.dit, name).state_dict() for p in pipes)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    high, low = pipes[0].dit.experts
    assert not torch.equal(high.head.head.weight, low.head.head.weight)  # two different experts
    assert pipes[0].dit.boundary == pipes[1].dit.boundary == DEFAULT_BOUNDARY[task]
    assert all(p.image_encoder is None for p in pipes)  # Wan2.2 I2V: y only, no CLIP
    img = image if task == "i2v" else None
    videos = [p.generate(PROMPT, image=img) for p in pipes]
    assert videos[0].shape[0] == 1 and videos[0].dtype == np.uint8
    diff = np.abs(videos[0].astype(int) - videos[1].astype(int)).max()
    assert diff <= 1, diff  # the diffusers text encoder's loading differs by float rounding at most


def test_config_for_a_moe_folder_and_boundary_sources(folders, tmp_path):
    cfg = config_for_folder(folders["i2v_official"], **SMALL)
    assert (cfg.task, cfg.model_cls) == ("i2v", "wan2.2_moe")
    pipe = load_pipeline(teacher("t2v", boundary=0.5), folders["t2v_official"])
    assert pipe.dit.boundary == 0.5
    index = json.loads((folders["t2v_diffusers"] / "model_index.json").read_text())
    assert index["boundary_ratio"] == 0.875
    pipe = load_pipeline(teacher("t2v", boundary=None), folders["t2v_diffusers"])
    assert pipe.dit.boundary == 0.875
    folder = tmp_path / "exported"
    shutil.copytree(folders["t2v_official"], folder)
    assert load_pipeline(teacher("t2v", boundary=None), folder).dit.boundary == 0.875  # the task's default
    (folder / "experts.json").write_text(json.dumps({"boundary": 0.8}))  # what the exports write
    assert load_pipeline(teacher("t2v", boundary=None), folder).dit.boundary == 0.8
    assert load_pipeline(teacher("t2v", boundary=0.6), folder).dit.boundary == 0.6  # the config wins


def test_distilled_experts_and_per_expert_loras(folders, tmp_path):
    from tests.lora_util import make_lora

    folder = tmp_path / "student"
    shutil.copytree(folders["t2v_official"], folder)
    base = load_pipeline(teacher("t2v"), folder).dit
    distill = load_config(REPO / "configs/infer/wan22/wan22_moe_t2v_distill_4step.json").replace(**SMALL)
    with pytest.raises(ValueError, match=r"base \(teacher\) weights with no distill LoRA"):
        check_before_loading(distill, folder)
    # two distilled experts: distill_models/<expert>/distill_model.safetensors (LightX2V's path), here swapped
    for name, src in (("high_noise_model", base.low_noise_model), ("low_noise_model", base.high_noise_model)):
        write_safetensors(src.state_dict(), folder / "distill_models" / name / "distill_model.safetensors")
    pipe = load_pipeline(distill, folder, on_base_weights="error")
    assert torch.equal(pipe.dit.high_noise_model.head.head.weight, base.low_noise_model.head.head.weight)
    calls = spy_experts(pipe)
    pipe.generate(PROMPT)
    assert [n for n, _ in calls] == ["high_noise_model"] * 2 + ["low_noise_model"] * 2  # boundary_step_index 2
    calls.clear()
    pipe.generate(PROMPT, boundary_step_index=3)
    assert [n for n, _ in calls] == ["high_noise_model"] * 3 + ["low_noise_model"]
    # base experts + one LoRA per expert (lora_configs[].name)
    shutil.rmtree(folder / "distill_models")
    write_safetensors(make_lora(base.high_noise_model, seed=1), tmp_path / "high.safetensors")
    write_safetensors(make_lora(base.low_noise_model, seed=2), tmp_path / "low.safetensors")
    loras = [{"name": "high_noise_model", "path": str(tmp_path / "high.safetensors")},
             {"name": "low_noise_model", "path": str(tmp_path / "low.safetensors"), "strength": 0.0}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the LoRA's coverage note
        pipe = load_pipeline(distill.replace(lora_configs=loras), folder, on_base_weights="error")
    w = "blocks.0.self_attn.q.weight"
    assert not torch.equal(pipe.dit.high_noise_model.state_dict()[w], base.high_noise_model.state_dict()[w])
    assert torch.equal(pipe.dit.low_noise_model.state_dict()[w], base.low_noise_model.state_dict()[w])  # strength 0


# ---- errors --------------------------------------------------------------------------------------------------
def test_errors_name_what_is_wrong(folders, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(folders["t2v_official"], folder)
    with pytest.raises(ValueError, match=r"two-expert folder.*model_cls to 'wan2.2_moe'"):
        load_pipeline(teacher("t2v").replace(model_cls="wan2.1", sample_guide_scale=5.0, boundary=None), folder)
    cfg_file = folder / "low_noise_model" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "num_layers": 3}))
    with pytest.raises(ValueError, match=r"experts' configs differ \(num_layers: 2 vs 3\)"):
        load_pipeline(teacher("t2v"), folder)
    shutil.rmtree(folder / "low_noise_model")
    with pytest.raises(FileNotFoundError, match=r"\['low_noise_model/'\].*missing"):
        load_pipeline(teacher("t2v"), folder)
    shutil.rmtree(folder / "high_noise_model")
    with pytest.raises(FileNotFoundError, match=r"high_noise_model/', 'low_noise_model/'"):
        load_pipeline(teacher("t2v"), folder)


@pytest.mark.parametrize(("keys", "match"), [
    (dict(boundary=1.5), r"boundary is a fraction .* in \(0, 1\)"),
    (dict(boundary=0.0), r"boundary is a fraction"),
    (dict(sample_guide_scale=[4.0, 3.0, 2.0]), r"pair \[high_noise, low_noise\]"),
    (dict(model_cls="wan2.1", boundary=None), r"\['sample_guide_scale'\]|pair \[high_noise, low_noise\]"),
    (dict(sample_guide_scale=5.0, model_cls="wan2.1"), r"\['boundary'\] are Wan2.2 MoE keys"),
    (dict(lora_configs=[{"path": "x.safetensors"}]), r"lora_configs\[0\]\.name must name the expert"),
    (dict(boundary_step_index=2), r"boundary_step_index .* needs model_cls 'wan2.2_moe_distill'"),
    (dict(denoising_step_list=[1000, 500], enable_cfg=False), r"use model_cls\s+'wan2.2_moe_distill'"),
    (dict(parallel={"seq_p_size": 2}), r"parallel block .* Wan2.2 MoE"),
    (dict(use_image_encoder=True), r"use_image_encoder true does not fit model_cls 'wan2.2_moe'"),
])
def test_config_errors(keys, match):
    with pytest.raises(ValueError, match=match):
        teacher("t2v", **keys)


def test_distill_config_errors():
    d = load_config(REPO / "configs/infer/wan22/wan22_moe_t2v_distill_4step.json")
    with pytest.raises(ValueError, match=r"boundary_step_index must be in \[0, 4\]"):
        d.replace(boundary_step_index=5)
    with pytest.raises(ValueError, match=r"few-step student: set denoising_step_list"):
        d.replace(denoising_step_list=None, boundary_step_index=None)


# ---- serving -------------------------------------------------------------------------------------------------
def test_server_and_web_ui_serve_a_moe_model(folders, tmp_path):
    import httpx

    from inference.server import BackgroundServer, build_manager, create_app
    from inference.webui import default_cfg_scale, generation_overrides, run_generation

    cfg_file = tmp_path / "moe.json"
    data = json.loads((REPO / "configs/infer/wan22/wan22_moe_t2v.json").read_text())
    cfg_file.write_text(json.dumps({**data, **SMALL, "infer_steps": 2}))
    manager = build_manager(cfg_file, folders["t2v_official"], output_dir=tmp_path / "out")
    server = BackgroundServer(create_app(manager)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30.0) as client:
            task_id = client.post("/v1/tasks/video/", json={"prompt": PROMPT}).json()["task_id"]
            for _ in range(300):
                status = client.get(f"/v1/tasks/{task_id}/status").json()
                if status["status"] in ("completed", "failed"):
                    break
                time.sleep(0.1)
            assert status["status"] == "completed", status
    finally:
        server.stop()
    cfg = manager.pipe.cfg
    assert default_cfg_scale(cfg) == 4.0  # the high-noise expert's scale
    assert "sample_guide_scale" not in generation_overrides(cfg, None, None, None, None, None, 4.0)  # pair kept
    assert generation_overrides(cfg, None, None, None, None, None, 2.0)["sample_guide_scale"] == 2.0  # both experts
    result = run_generation(manager.pipe, PROMPT, output_dir=tmp_path / "ui")
    assert result.frames.shape[0] == 5 and result.nfe == 2 * 2


# ---- parity with diffusers' two-transformer WanPipeline --------------------------------------------------------
def test_moe_sampler_matches_diffusers_wan_pipeline(folders, monkeypatch):
    """diffusers' WanPipeline (transformer = high-noise, transformer_2 = low-noise, boundary_ratio,
    guidance_scale / guidance_scale_2) on the same folder, noise, text embeddings and Wan's UniPC grid: the same
    final latent. Its scheduler is handed Wan's grid (diffusers' default grid is offset by 0.001, see
    tests/test_schedulers.py)."""
    diffusers = pytest.importorskip("diffusers")
    n, shift, scales = 6, 12.0, (4.0, 2.5)
    folder = folders["t2v_diffusers"]
    ours = load_pipeline(teacher("t2v", infer_steps=n, sample_shift=shift, sample_guide_scale=list(scales)), folder)
    latents = {}
    real_sample = pipeline_module.sample

    def keep(*args, **kw):
        latents["noise"] = args[1].clone()
        latents["ours"] = real_sample(*args, **kw)
        return latents["ours"]

    monkeypatch.setattr(pipeline_module, "sample", keep)
    ours.generate(PROMPT)
    ref = diffusers.WanPipeline.from_pretrained(str(folder))
    sched = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, num_train_timesteps=1000,
        solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero")
    wan_grid = np.linspace(float(np.float32(0.999)), 0.0, n + 1)[:-1]
    set_ts = sched.set_timesteps
    sched.set_timesteps = lambda num, device=None, **kw: set_ts(sigmas=wan_grid, device=device)
    ref.scheduler = sched
    cond = ours.encode_text([PROMPT])
    uncond = ours.encode_text([ours.cfg.sample_neg_prompt])
    routed = []
    for name in ("transformer", "transformer_2"):
        getattr(ref, name).register_forward_pre_hook(lambda m, a, kw, n_=name: routed.append(n_), with_kwargs=True)
    want = ref(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=latents["noise"], num_inference_steps=n,
               guidance_scale=scales[0], guidance_scale_2=scales[1], height=32, width=32, num_frames=5,
               output_type="latent").frames
    assert routed[::2] == ["transformer" if t >= 875 else "transformer_2" for t in sched.timesteps]
    torch.testing.assert_close(latents["ours"], want.float(), atol=2e-4, rtol=1e-4)


def test_real_size_expert_config_builds_the_registry_expert_on_meta(tmp_path):
    """The official I2V-A14B expert config.json names no clip_dim (nor text_dim): read as an expert, it builds the
    registry's Wan2.2 I2V expert (no CLIP branch) at real size, on `meta`."""
    from models.components import build_dit
    from models.moe_loading import expert_config

    real = {"_class_name": "WanModel", "_diffusers_version": "0.33.0", "dim": 5120, "eps": 1e-06, "ffn_dim": 13824,
            "freq_dim": 256, "in_dim": 36, "model_type": "i2v", "num_heads": 40, "num_layers": 40, "out_dim": 16,
            "text_len": 512}
    (tmp_path / "config.json").write_text(json.dumps(real))
    config = expert_config(tmp_path, diffusers=False)
    assert config["clip_dim"] is None
    ours, spec = build_dit(config, "meta"), build_dit(MODEL_SPECS["wan2.2-i2v-a14b"].dit, "meta")
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == {k: tuple(v.shape) for k, v in spec.state_dict().items()}
    assert not any("img_emb" in k or "k_img" in k for k in got)


def test_diffusers_reads_the_mini_moe_folders(folders):
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.WanImageToVideoPipeline.from_pretrained(str(folders["i2v_diffusers"]))
    assert pipe.transformer_2 is not None and pipe.image_encoder is None and pipe.config.boundary_ratio == 0.9
    assert pipe.transformer.config.image_dim is None and pipe.transformer.config.in_channels == 36
