"""Wan2.2 TI2V-5B end to end on a mini folder (models/mini_ti2v.py): T2V and I2V through load_pipeline and infer.py,
each against a hand-written reference loop; Wan2.2's output size and image fit; the shipped config; bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as imageio
import numpy as np
import pytest
import torch

import infer
from inference.config import InferConfig, load_config
from inference.guidance import combine
from inference.loader import config_for_folder, load_pipeline
from inference.pipeline import make_scheduler, to_uint8
from inference.ti2v import blend_first_frame, first_frame_mask, token_timesteps
from inference.ti2v_pipeline import TI2VPipeline, best_output_size, check_ti2v_request, fit_image
from models.mini_ti2v import write_mini_ti2v
from models.registry import get_spec

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red circle moving left"
SMALL = dict(infer_steps=3, target_video_length=5, target_height=64, target_width=96, sample_guide_scale=5.0)
LATENT_ATOL = 1e-5  # the pipeline's batched [cond; uncond] forward vs the reference's two forwards (fp32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_mini_ti2v(tmp_path_factory.mktemp("ti2v") / "mini")


@pytest.fixture(scope="module")
def pipe(folder) -> TI2VPipeline:
    return load_pipeline(InferConfig(model_cls="wan2.2", model_path=str(folder), device="cpu", **SMALL))


@pytest.fixture
def spy(pipe, monkeypatch):
    """Records the timesteps every DiT call gets and the latent handed to the VAE decoder."""
    seen = {"t": [], "latent": None}
    handle = pipe.dit.register_forward_pre_hook(lambda m, args: seen["t"].append(args[1].clone()))
    decode = pipe.vae.decode

    def capture(latent, *a, **k):
        seen["latent"] = latent.clone()
        return decode(latent, *a, **k)

    monkeypatch.setattr(pipe.vae, "decode", capture)
    yield seen
    handle.remove()


def image(h: int = 80, w: int = 100, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def reference(pipe, seed: int, image_latent: torch.Tensor | None) -> torch.Tensor:
    """Wan2.2's loop (wan/textimage2video.py) written out: the state blended with the image latent at the start and
    after every step, per-token t = mask * t with I2V, t [B] with T2V; CFG as two separate forwards."""
    cfg, dit = pipe.cfg, pipe.dit
    ctx, neg = pipe.encode_text([PROMPT]), pipe.encode_text([cfg.sample_neg_prompt])
    shape = (dit.in_dim, 2, 4, 6) if image_latent is None else (dit.in_dim, 2, *image_latent.shape[-2:])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))[None]
    mask = first_frame_mask(*shape[1:])
    sched = make_scheduler(cfg)
    sched.set_timesteps(cfg.infer_steps)
    if image_latent is not None:
        x = blend_first_frame(x, image_latent, mask)
    for i, t in enumerate(sched.timesteps):
        tt = t.reshape(1).float() if image_latent is None else token_timesteps(t.reshape(1).float(), mask)
        v = combine(dit(x, tt, ctx).float(), dit(x, tt, neg).float(), cfg.sample_guide_scale)
        x = sched.step(v, i, x)
        if image_latent is not None:
            x = blend_first_frame(x, image_latent, mask)
    return x


# ---- T2V ----------------------------------------------------------------------------------------------------
def test_t2v_is_the_plain_ti2v_dit_run_with_one_timestep_per_sample(pipe, spy):
    video = pipe.generate(PROMPT, seed=3)
    assert video.shape == (1, 5, 64, 96, 3) and video.dtype == np.uint8
    assert spy["t"] and all(t.shape == (2,) for t in spy["t"])  # [cond; uncond], one t per sample
    ref = reference(pipe, 3, None)
    torch.testing.assert_close(spy["latent"], ref, atol=LATENT_ATOL, rtol=0)
    assert np.abs(to_uint8(pipe.vae.decode(ref)).astype(int) - video.astype(int)).max() <= 1


# ---- I2V ----------------------------------------------------------------------------------------------------
def test_i2v_keeps_the_image_latent_on_frame_0_and_matches_wan22s_loop(pipe, spy):
    img = image()  # 80 x 100: best_output_size(100, 80, 32, 32, 64 * 96) = (96, 64)
    video = pipe.generate(PROMPT, seed=5, image=img, task="i2v")
    assert video.shape == (1, 5, 64, 96, 3)
    fitted = fit_image(torch.as_tensor(img).permute(2, 0, 1)[None].float() / 127.5 - 1, 64, 96)
    image_latent = pipe.vae.encode(fitted[:, :, None])
    latent = spy["latent"]
    assert torch.equal(latent[:, :, :1], image_latent)  # exactly the encoded image after sampling
    assert not torch.allclose(latent[:, :, 1:], image_latent.expand_as(latent[:, :, 1:]), atol=0.1)
    # per-token timesteps: 0 on the 2 x 3 first-frame tokens, the step's t on the others
    t = spy["t"][0]
    assert t.shape == (2, 12) and torch.equal(t[:, :6], torch.zeros(2, 6))
    sched = make_scheduler(pipe.cfg)
    sched.set_timesteps(pipe.cfg.infer_steps)
    assert torch.equal(t[:, 6:], torch.full((2, 6), float(sched.timesteps[0])))
    torch.testing.assert_close(latent, reference(pipe, 5, image_latent), atol=LATENT_ATOL, rtol=0)
    # the first video frame comes from latent frame 0 alone (causal decoder): the VAE's round trip of the image
    round_trip = to_uint8(pipe.vae.decode(image_latent))[:, 0]
    assert np.abs(round_trip.astype(int) - video[:, 0].astype(int)).max() <= 1


def test_i2v_output_size_follows_the_image(pipe):
    portrait = pipe.generate(PROMPT, seed=0, image=image(100, 80), task="i2v")
    assert portrait.shape[2:4] == (96, 64)
    batch = pipe.generate([PROMPT, PROMPT], seed=0, image=[image(), image(seed=1)], task="i2v")
    assert batch.shape == (2, 5, 64, 96, 3)


def test_best_output_size_is_wan22s():
    """Values of Wan2.2's wan/utils/utils.py best_output_size (704 x 1280 area, multiples of 32), computed with the
    official function; ours agreed on 20,000 random images and areas too."""
    area = 704 * 1280
    assert best_output_size(1920, 1080, 32, 32, area) == (1248, 704)
    assert best_output_size(1080, 1920, 32, 32, area) == (704, 1248)
    assert best_output_size(1280, 704, 32, 32, area) == (1280, 704)
    assert best_output_size(1024, 1024, 32, 32, area) == (960, 928)
    assert best_output_size(800, 600, 32, 32, area) == (1088, 800)
    assert best_output_size(333, 777, 32, 32, area) == (608, 1440)
    assert best_output_size(100, 80, 32, 32, 64 * 96) == (96, 64)
    with pytest.raises(ValueError, match="area >= dw"):
        best_output_size(100, 80, 32, 32, 500)


def test_fit_image_scales_to_cover_then_center_crops():
    x = torch.linspace(-1, 1, 128).expand(1, 3, 64, 128)
    torch.testing.assert_close(fit_image(x, 64, 64), x[..., 32:96], atol=0, rtol=0)  # scale 1: a pure crop
    y = fit_image(torch.rand(2, 3, 30, 40) * 2 - 1, 64, 64)  # scale 64/30 -> 64 x 85, then cropped
    assert y.shape == (2, 3, 64, 64) and y.abs().max() <= 1


# ---- loading and configs ------------------------------------------------------------------------------------
def test_shipped_config_has_the_official_defaults():
    cfg = load_config(REPO / "configs/infer/wan22/wan22_ti2v_5b.json")
    sample = get_spec("wan2.2-ti2v-5b").sample
    assert (cfg.model_cls, cfg.task, cfg.infer_steps, cfg.sample_shift, cfg.sample_guide_scale, cfg.fps) == \
        ("wan2.2", "t2v", 50, 5.0, 5.0, 24)
    assert (cfg.target_video_length, cfg.target_height, cfg.target_width) == \
        (sample["frames"], sample["height"], sample["width"]) == (121, 704, 1280)
    assert cfg.use_image_encoder is False and cfg.sample_solver == "unipc" and cfg.enable_cfg


def test_folder_alone_loads_as_wan22(folder):
    cfg = config_for_folder(folder, **SMALL)
    assert (cfg.model_cls, cfg.task) == ("wan2.2", "t2v")
    assert check_ti2v_request(cfg, folder)


def test_infer_cli_runs_both_tasks(folder, tmp_path):
    config = tmp_path / "ti2v.json"
    config.write_text(json.dumps({"task": "t2v", "enable_cfg": True, "sample_shift": 5.0, **SMALL}))
    imageio.imwrite(tmp_path / "frame0.png", image())
    common = ["--config", str(config), "--model_path", str(folder), "--model_cls", "wan2.2", "--prompt", PROMPT]
    assert infer.main([*common, "--save_result_path", str(tmp_path / "t2v.npy")]) == 0
    assert infer.main([*common, "--task", "i2v", "--image_path", str(tmp_path / "frame0.png"),
                       "--save_result_path", str(tmp_path / "i2v.npy")]) == 0
    assert np.load(tmp_path / "t2v.npy").shape == np.load(tmp_path / "i2v.npy").shape == (5, 64, 96, 3)


# ---- bad inputs ---------------------------------------------------------------------------------------------
def test_bad_requests_are_named(pipe, folder, tmp_path, capsys):
    with pytest.raises(ValueError, match="image was given but the task is t2v"):
        pipe.generate(PROMPT, image=image())
    with pytest.raises(ValueError, match="task i2v needs an image"):
        pipe.generate(PROMPT, task="i2v")
    with pytest.raises(ValueError, match="multiples of 32.*target_height 48"):
        pipe.generate(PROMPT, target_height=48)
    with pytest.raises(ValueError, match="set model_cls 'wan2.2'"):
        check_ti2v_request(InferConfig(model_cls="wan2.1"), folder)
    wan21 = tmp_path / "wan21"
    wan21.mkdir()
    (wan21 / "config.json").write_text(json.dumps({"model_type": "t2v"}))
    with pytest.raises(ValueError, match="model_cls 'wan2.2' runs Wan2.2 TI2V-5B.*'t2v' DiT"):
        check_ti2v_request(InferConfig(model_cls="wan2.2"), wan21)
    with pytest.raises(ValueError, match="use_image_encoder true does not fit model_cls 'wan2.2'"):
        InferConfig(model_cls="wan2.2", use_image_encoder=True)
    with pytest.raises(ValueError, match="takes no CLIP image encoder"):
        TI2VPipeline(pipe.cfg, pipe.dit, pipe.vae, pipe.text_encoder, image_encoder=object())
    with pytest.raises(ValueError, match="needs a Wan2.2 TI2V DiT"):
        TI2VPipeline(pipe.cfg, torch.nn.Linear(1, 1), pipe.vae, pipe.text_encoder)
    out = tmp_path / "o.npy"  # infer.py: an image on a t2v run is refused before any model work
    imageio.imwrite(tmp_path / "f.png", image())
    assert infer.main(["--config", str(REPO / "configs/infer/wan22/wan22_ti2v_5b.json"), "--model_path",
                       str(folder), "--prompt", PROMPT, "--image_path", str(tmp_path / "f.png"),
                       "--save_result_path", str(out)]) == 2
    assert "--image_path is for image-to-video" in capsys.readouterr().err


# ---- server and web UI: the request's image (or none) picks the task -----------------------------------------
def test_server_runs_t2v_and_i2v_requests_on_one_ti2v_model(pipe, tmp_path):
    """A TI2V server takes both: a request without image_path is T2V, one with an image (inline here) I2V; each
    result equals the pipeline's own call with the same seed."""
    import base64
    import io

    from inference.requests import VideoRequest
    from inference.tasks import TaskManager
    from inference.video import read_video

    buf = io.BytesIO()
    imageio.imwrite(buf, image(64, 96), extension=".png")
    data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    manager = TaskManager(pipe, "ti2v", tmp_path)
    t2v = manager.make_task(VideoRequest(prompt=PROMPT, seed=3, save_result_path="t2v.npy"))
    i2v = manager.make_task(VideoRequest(prompt=PROMPT, seed=3, image_path=data_url, save_result_path="i2v.npy"))
    assert t2v.overrides == {"task": "t2v"} and i2v.overrides == {"task": "i2v"}
    for task in (t2v, i2v):
        manager._generate(task)
    np.testing.assert_array_equal(read_video(tmp_path / "t2v.npy"), pipe.generate(PROMPT, seed=3)[0])
    np.testing.assert_array_equal(read_video(tmp_path / "i2v.npy"),
                                  pipe.generate(PROMPT, seed=3, task="i2v", image=image(64, 96))[0])


def test_web_ui_runs_t2v_without_an_image_and_i2v_with_one(pipe, tmp_path):
    from inference.webui import run_generation, takes_both_tasks

    assert takes_both_tasks(pipe)
    without = run_generation(pipe, PROMPT, seed=3, output_dir=tmp_path)
    with_image = run_generation(pipe, PROMPT, seed=3, image=image(64, 96), output_dir=tmp_path)
    np.testing.assert_array_equal(without.frames, pipe.generate(PROMPT, seed=3)[0])
    np.testing.assert_array_equal(with_image.frames, pipe.generate(PROMPT, seed=3, task="i2v",
                                                                   image=image(64, 96))[0])
