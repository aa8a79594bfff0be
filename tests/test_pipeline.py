"""WanPipeline on random tiny models (5 frames, 32x32, 2-block DiT): output format, per-video seeds, CFG as one
batched forward, negative-prompt encoding, DiT evaluation counts, the distill schedule, Wan's I2V conditioning
and a golden end-to-end slice. Each generation takes milliseconds on one CPU thread."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from inference.config import load_config
from inference.guidance import Guidance
from inference.pipeline import WanPipeline, image_to_tensor, make_scheduler, seeded_noise, to_uint8
from inference.sampling import sample

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle moving left", "a blue square", "two green triangles bouncing"]
DISTILL = dict(model_cls="wan2.1_distill", denoising_step_list=[1000, 750, 500, 250], enable_cfg=False,
               sample_shift=5.0)


class RecordingDiT:
    """Wraps a DiT: records the inputs and outputs of every call and forwards attributes (text_len, ...)."""

    def __init__(self, dit):
        self.dit = dit
        self.calls: list[dict] = []

    def __getattr__(self, name):
        return getattr(self.dit, name)

    def __call__(self, x, t, context, clip_fea=None, y=None):
        out = self.dit(x, t, context, clip_fea=clip_fea, y=y)
        self.calls.append(dict(x=x.clone(), t=t.clone(), context=context.clone(), out=out.clone(),
                               clip_fea=None if clip_fea is None else clip_fea.clone(),
                               y=None if y is None else y.clone()))
        return out

    @property
    def rows(self) -> int:
        return sum(c["x"].shape[0] for c in self.calls)


def assert_videos_close(a: np.ndarray, b: np.ndarray, msg: str = "") -> None:
    """uint8 videos of the same content within +-1 per pixel value.

    Different batch sizes (or code paths) run different float kernels (SIMD tails, blocking), so the float
    video may differ in the last bits and a value near a rounding boundary may flip by one; anything more is
    a real difference (another seed moves most values by tens).
    """
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8, msg
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= 1, f"{msg}: max difference {diff.max()} (> 1)"


@pytest.fixture
def record_dit(monkeypatch):
    def wrap(pipe) -> RecordingDiT:
        rec = RecordingDiT(pipe.dit)
        monkeypatch.setattr(pipe, "dit", rec)
        return rec

    return wrap


@pytest.fixture
def record_text(monkeypatch):
    """Records the prompt lists given to pipe.text_encoder.encode."""

    def wrap(pipe) -> list[list[str]]:
        seen: list[list[str]] = []
        encode = pipe.text_encoder.encode

        def spy(prompts):
            seen.append(list(prompts))
            return encode(prompts)

        monkeypatch.setattr(pipe.text_encoder, "encode", spy)
        return seen

    return wrap


def test_t2v_returns_uint8_video(t2v_pipe):
    video = t2v_pipe.generate(PROMPTS[:2], seed=0)
    assert video.dtype == np.uint8 and video.shape == (2, 5, 32, 32, 3)
    assert video.std() > 1 and not np.array_equal(video[0], video[1])
    one = t2v_pipe.generate(PROMPTS[0], seed=0)  # a single string is a batch of one
    assert one.shape == (1, 5, 32, 32, 3)
    assert_videos_close(one[0], video[0], "batch of one vs batch of two")
    assert set(t2v_pipe.timings.stages) >= {"text_encoder", "dit", "vae_decode"}


def test_per_call_size_overrides(t2v_pipe):
    video = t2v_pipe.generate(PROMPTS[0], target_video_length=9, target_height=16, target_width=48)
    assert video.shape == (1, 9, 16, 48, 3)
    assert t2v_pipe.cfg.target_video_length == 5  # the pipeline's own config is unchanged
    with pytest.raises(ValueError, match="target_video_length must be 4n"):
        t2v_pipe.generate(PROMPTS[0], target_video_length=6)
    with pytest.raises(ValueError, match="non-empty"):
        t2v_pipe.generate(["ok", "  "])


@pytest.mark.parametrize("overrides", [
    {},  # UniPC (multistep, stateful) with CFG
    {"sample_solver": "euler", "enable_cfg": False},
    DISTILL,
    {**DISTILL, "distill_update": "lcm"},  # fresh noise every step: must also be drawn per video
], ids=["unipc_cfg", "euler", "distill_euler", "distill_lcm"])
def test_video_i_uses_seed_plus_i_whatever_the_batch(t2v_pipe, overrides):
    batch = t2v_pipe.generate(PROMPTS, seed=10, **overrides)
    for i in range(len(PROMPTS)):
        alone = t2v_pipe.generate([PROMPTS[i]], seed=10 + i, **overrides)
        assert_videos_close(alone[0], batch[i], f"video {i}")
    other = t2v_pipe.generate([PROMPTS[0]], seed=11, **overrides)
    assert not np.array_equal(other[0], batch[0])  # the seed matters


def test_cfg_is_one_batched_forward(t2v_pipe, record_dit):
    """denoise(x, t) = one DiT call on [cond; uncond] (2B rows) = uncond + w (cond - uncond) of two calls."""
    dit, w = t2v_pipe.dit, 5.0
    cond = t2v_pipe.encode_text(PROMPTS[:2])
    uncond = t2v_pipe.encode_text(["blurry, static"] * 2)
    x = torch.randn(2, dit.in_dim, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900.0, 900.0])
    rec = record_dit(t2v_pipe)
    v = t2v_pipe.make_denoiser(cond, uncond, Guidance(w), None, None)(x, t)
    assert len(rec.calls) == 1
    call = rec.calls[0]
    assert call["x"].shape[0] == 4 and call["t"].shape == (4,) and call["context"].shape[0] == 4
    torch.testing.assert_close(call["x"], torch.cat([x, x]))
    torch.testing.assert_close(call["context"], torch.cat([cond, uncond]))
    v_cond, v_uncond = dit(x, t, cond), dit(x, t, uncond)
    torch.testing.assert_close(v, v_uncond + w * (v_cond - v_uncond), atol=1e-5, rtol=1e-5)
    assert (v_cond - v_uncond).abs().max() > 1e-3  # the negative prompt does change the prediction


def assert_matches_reference(pipe, reference, video: np.ndarray, seeds: list[int]) -> None:
    """`video` (5 frames at 32x32) equals sampling the pipeline's scheduler with the denoiser `reference`."""
    scheduler = make_scheduler(pipe.cfg)
    scheduler.set_timesteps(pipe.cfg.infer_steps)
    noise = seeded_noise(pipe.vae.latent_shape(5, 32, 32), seeds, torch.device("cpu"))
    expected = to_uint8(pipe.vae.decode(sample(reference, noise, scheduler)))
    assert np.abs(expected.astype(int) - video.astype(int)).max() <= 1


def test_cfg_generation_matches_two_call_reference(t2v_pipe, record_dit):
    """A whole CFG generation equals sampling with a reference denoiser made of two separate DiT calls."""
    cfg, dit = t2v_pipe.cfg, t2v_pipe.dit
    rec = record_dit(t2v_pipe)
    video = t2v_pipe.generate(PROMPTS[:2], seed=3)
    assert len(rec.calls) == cfg.infer_steps
    cond = t2v_pipe.encode_text(PROMPTS[:2])
    uncond = t2v_pipe.encode_text([cfg.sample_neg_prompt] * 2)
    for call in rec.calls:
        assert call["x"].shape[0] == 4
        torch.testing.assert_close(call["context"], torch.cat([cond, uncond]))
        torch.testing.assert_close(call["t"][:2], call["t"][2:])

    def reference(x, t):
        v_cond, v_uncond = dit(x, t, cond), dit(x, t, uncond)
        return v_uncond + cfg.sample_guide_scale * (v_cond - v_uncond)

    assert_matches_reference(t2v_pipe, reference, video, seeds=[3, 4])


def test_guidance_interval_guides_only_inside(t2v_pipe, record_dit):
    """sample_guide_interval [lo, hi]: CFG (a 2B-row call) exactly at the steps whose timestep lies inside, the
    conditional branch alone (B rows) elsewhere; the whole generation equals a reference that switches on t."""
    cfg, dit = t2v_pipe.cfg, t2v_pipe.dit
    lo, hi = 300.0, 850.0
    rec = record_dit(t2v_pipe)
    video = t2v_pipe.generate(PROMPTS[:2], seed=3, sample_guide_interval=[lo, hi])
    inside = [lo <= float(c["t"][0]) <= hi for c in rec.calls]
    assert any(inside) and not all(inside)
    assert [c["x"].shape[0] for c in rec.calls] == [4 if i else 2 for i in inside]
    assert t2v_pipe.timings.nfe == sum(4 if i else 2 for i in inside)
    cond = t2v_pipe.encode_text(PROMPTS[:2])
    uncond = t2v_pipe.encode_text([cfg.sample_neg_prompt] * 2)

    def reference(x, t):
        v_cond = dit(x, t, cond)
        if not lo <= float(t[0]) <= hi:
            return v_cond
        v_uncond = dit(x, t, uncond)
        return v_uncond + cfg.sample_guide_scale * (v_cond - v_uncond)

    assert_matches_reference(t2v_pipe, reference, video, seeds=[3, 4])
    # the interval that holds every step is plain CFG
    full = t2v_pipe.generate(PROMPTS[:2], seed=3, sample_guide_interval=[0, 1000])
    assert_videos_close(full, t2v_pipe.generate(PROMPTS[:2], seed=3), "interval [0, 1000] vs no interval")


@pytest.mark.parametrize("interval", [[500], [800, 300], [-1, 500], [0, 1001]])
def test_guidance_interval_validation(make_config, interval):
    with pytest.raises(ValueError, match=r"sample_guide_interval must be \[t_min, t_max\]"):
        make_config("t2v", sample_guide_interval=interval)


@pytest.mark.parametrize("overrides, negative, expect_neg", [
    ({}, None, "blurry, static"),
    ({}, "ugly", "ugly"),
    ({"enable_cfg": False}, "ugly", None),
    ({"sample_guide_scale": 1.0}, None, None),  # w = 1 is no guidance: no second pass either
])
def test_negative_prompt_encoded_only_with_cfg(t2v_pipe, record_text, record_dit, overrides, negative, expect_neg):
    seen = record_text(t2v_pipe)
    rec = record_dit(t2v_pipe)
    t2v_pipe.generate(PROMPTS[:2], negative_prompt=negative, **overrides)
    expected = [PROMPTS[:2]] + ([[expect_neg] * 2] if expect_neg is not None else [])
    assert seen == expected
    assert all(c["x"].shape[0] == (4 if expect_neg else 2) for c in rec.calls)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("enable_cfg", [True, False])
def test_nfe_is_steps_times_passes_times_batch(t2v_pipe, record_dit, batch, enable_cfg):
    rec = record_dit(t2v_pipe)
    progress = []
    t2v_pipe.generate(PROMPTS[:batch], enable_cfg=enable_cfg, infer_steps=2,
                      callback=lambda done, n: progress.append((done, n)))
    expected = 2 * (2 if enable_cfg else 1) * batch
    assert t2v_pipe.timings.nfe == expected == rec.rows
    assert len(rec.calls) == 2 and progress == [(1, 2), (2, 2)]


def test_distill_config_runs_four_dit_evaluations(t2v_pipe, record_dit):
    """The shipped distill config (sizes shrunk): 4 steps at the warped timesteps, one pass each (no CFG)."""
    cfg = load_config(REPO / "configs/infer/wan/wan_t2v_distill_4step_cfg.json", target_video_length=5,
                      target_height=32, target_width=32, dtype="fp32", device="cpu")
    assert cfg.denoising_step_list == [1000, 750, 500, 250] and not cfg.enable_cfg
    pipe = WanPipeline(cfg, t2v_pipe.dit, t2v_pipe.vae, t2v_pipe.text_encoder)
    rec = record_dit(pipe)
    video = pipe.generate(PROMPTS[0], seed=1)
    assert video.shape == (1, 5, 32, 32, 3)
    assert pipe.timings.nfe == 4 and len(rec.calls) == 4 and rec.rows == 4
    # shift 5: sigma = 5 s / (1 + 4 s) for s = d / 1000 -> t = 1000, 937.5, 833.33, 625
    ts = torch.stack([c["t"][0] for c in rec.calls])
    torch.testing.assert_close(ts, torch.tensor([1000.0, 937.5, 2500 / 3, 625.0]))
    # the same through the per-call overrides of a teacher pipeline
    rec.calls.clear()
    t2v_pipe.generate(PROMPTS[0], **DISTILL)
    assert t2v_pipe.timings.nfe == 4


# ---- I2V ---------------------------------------------------------------------------------------------
def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB test image, uint8 [h, w, 3]."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    rng = np.random.default_rng(seed)
    img = np.stack([np.sin(6 * xx + rng.uniform(0, 6)), np.cos(5 * yy + rng.uniform(0, 6)), xx - yy], -1)
    return np.clip((img + 1) * 127.5, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("enable_cfg", [True, False])
def test_i2v_conditioning(i2v_pipe, record_dit, enable_cfg):
    """y = [mask (4 ch, 1 on latent frame 0 only); VAE latent of (resized image, zeros)], shared by CFG passes."""
    vae, z, s = i2v_pipe.vae, i2v_pipe.vae.z_dim, i2v_pipe.vae.spatial_stride
    img = _image(48, 32)  # portrait 48x32 at the 32x32 area: Wan's rule, latent sides multiples of the patch (2)
    lat_h, lat_w = (int(np.sqrt(32 * 32 * a / b) // s // 2 * 2) for a, b in ((48, 32), (32, 48)))
    assert lat_h > lat_w  # the aspect ratio is kept (stride 4: 8x6 latent -> 32x24 pixels)
    rec = record_dit(i2v_pipe)
    video = i2v_pipe.generate(PROMPTS[0], image=img, seed=0, enable_cfg=enable_cfg)
    assert video.shape == (1, 5, lat_h * s, lat_w * s, 3)
    rows = 2 if enable_cfg else 1
    resized = F.interpolate(image_to_tensor(img)[None], size=(lat_h * s, lat_w * s), mode="bicubic",
                            align_corners=False)
    first = vae.encode(resized.clamp(-1, 1)[:, :, None])  # a 1-frame video -> latent frame 0
    clip = i2v_pipe.image_encoder.encode(image_to_tensor(img)[None])
    for call in rec.calls:
        y = call["y"]
        assert y.shape == (rows, 4 + z, 2, lat_h, lat_w)
        assert (y[:, :4, 0] == 1).all() and (y[:, :4, 1:] == 0).all()
        torch.testing.assert_close(y[:, 4:, :1], first.expand(rows, -1, -1, -1, -1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(call["clip_fea"], clip.expand(rows, -1, -1), atol=1e-5, rtol=1e-5)
        assert call["x"].shape == (rows, z, 2, lat_h, lat_w)


def test_i2v_one_image_per_prompt(i2v_pipe, record_dit):
    imgs = [_image(32, 32, 1), _image(32, 32, 2)]
    rec = record_dit(i2v_pipe)
    video = i2v_pipe.generate(PROMPTS[:2], image=imgs, enable_cfg=False)
    assert video.shape == (2, 5, 32, 32, 3)
    y = rec.calls[0]["y"]
    for i, img in enumerate(imgs):
        first = i2v_pipe.vae.encode(image_to_tensor(img)[None, :, None])
        torch.testing.assert_close(y[i:i + 1, 4:, :1], first, atol=1e-5, rtol=1e-5)
    # the frame the video starts from follows its image
    assert not np.array_equal(video[0, 0], video[1, 0])


def test_i2v_input_errors(i2v_pipe):
    with pytest.raises(ValueError, match="i2v needs an image"):
        i2v_pipe.generate(PROMPTS[0])
    with pytest.raises(ValueError, match="got 1 images for 2 prompts"):
        i2v_pipe.generate(PROMPTS[:2], image=[_image(32, 32)])
    with pytest.raises(ValueError, match=r"image must be \[H, W, 3\]"):
        i2v_pipe.generate(PROMPTS[0], image=np.zeros((32, 32), np.uint8))


# ---- golden ------------------------------------------------------------------------------------------
# Produced once with the fixtures of conftest.py (make_tiny_model(spec="tiny-t2v", seed=0, **SMALL_DIT) over the
# committed checkpoints/tiny-components; BASE_CONFIG: 3 UniPC steps, shift 3, CFG 5 with the negative prompt
# "blurry, static", 5 frames at 32x32, fp32, torch.set_num_threads(1)) by
#     video = t2v_pipe.generate("a red circle moving left", seed=1234)
# and reading video[GOLDEN_INDEX] and video.mean(). Same values with 2 threads. A change here means the DiT,
# text encoder, codec, scheduler, CFG or noise seeding changed numerically.
GOLDEN_INDEX = ((0, 0, 8, 16, 0), (0, 1, 8, 0, 0), (0, 2, 24, 12, 0), (0, 3, 24, 12, 0), (0, 4, 24, 12, 0),
                (0, 0, 4, 0, 0), (0, 2, 24, 12, 1), (0, 4, 24, 12, 2), (0, 3, 8, 0, 1))
GOLDEN_VALUES = (0, 0, 84, 80, 52, 0, 41, 18, 25)
GOLDEN_MEAN = 19.929166666666667


def test_golden_slice(t2v_pipe):
    video = t2v_pipe.generate("a red circle moving left", seed=1234)
    got = np.array([int(video[i]) for i in GOLDEN_INDEX])
    assert np.abs(got - np.array(GOLDEN_VALUES)).max() <= 1, got.tolist()
    assert video.mean() == pytest.approx(GOLDEN_MEAN, abs=0.05)
