"""The Gradio web UI (inference/webui.py): `run_generation` without a browser (mp4 with the asked frames, progress,
NFE, every input rule as an `InputError`, I2V, runtime LoRA switching without reload), the page's wiring, the CLI's
errors, and one real-browser test (headless Chromium via Playwright) against a served page.

Browser test: `make test-browser` (installs Chromium if missing, then runs it and requires it). Without Chromium a
plain `pytest` skips it with the reason. WEBUI_SCREENSHOT=path saves the page's screenshot there (default: tmp_path);
WEBUI_TEST_CONFIG=config.json serves that config instead of a random tiny model (see `make webui-screenshot`).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from inference.loader import load_pipeline
from inference.lora import runtime_loras
from inference.pipeline import WanPipeline
from inference.video import read_video
from inference.webui import UI_LORA_PREFIX, InputError, main, run_generation

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red circle moving left"


@pytest.fixture(scope="module")
def pipe(tiny_t2v_dir, make_config) -> WanPipeline:
    """This module's own T2V pipeline (3 UniPC steps, CFG 5, 5x32x32): its runtime LoRAs stay out of other tests."""
    return load_pipeline(make_config("t2v"), tiny_t2v_dir)


def gen(pipe, out_dir, **kw):
    return run_generation(pipe, kw.pop("prompt", PROMPT), output_dir=out_dir, **kw)


# ---- run_generation -----------------------------------------------------------------------------------------------
def test_mp4_has_the_requested_frames_progress_and_nfe(pipe, tmp_path):
    calls = []
    res = gen(pipe, tmp_path, frames=9, height=48, width=32, seed=3, progress=lambda i, n: calls.append((i, n)))
    assert res.video.parent == tmp_path and res.video.suffix == ".mp4"
    frames = read_video(res.video)
    assert frames.shape == res.frames.shape == (9, 48, 32, 3)
    assert np.abs(frames.astype(float) - res.frames.astype(float)).mean() < 8  # H.264 is lossy, but it is this video
    assert calls == [(1, 3), (2, 3), (3, 3)]  # the progress bar gets every denoising step
    assert res.nfe == 6 and res.steps == 3  # 3 steps x (cond + uncond)
    assert set(res.stages) >= {"text_encoder", "dit", "vae_decode"} and res.seconds > 0
    assert "9 frames, 32x48" in res.summary() and "NFE): 6" in res.summary()
    # The same seed gives the same video; cfg_scale 1 switches CFG off (half the DiT evaluations).
    np.testing.assert_array_equal(gen(pipe, tmp_path, frames=9, height=48, width=32, seed=3).frames, res.frames)
    assert gen(pipe, tmp_path, cfg_scale=1).nfe == 3


def test_more_steps_and_random_seed(pipe, tmp_path):
    res = gen(pipe, tmp_path, steps=5, seed=-1)
    assert res.steps == 5 and res.nfe == 10 and 0 <= res.seed < 2**31
    assert f"seed {res.seed}" in res.summary()


@pytest.mark.parametrize("kw, rule", [
    (dict(frames=16), r"frames must be 4n\+1"),
    (dict(frames=0), r"frames must be 4n\+1"),
    (dict(height=50), "height must be a positive multiple of 16"),
    (dict(width=0), "width must be a positive multiple of 16"),
    (dict(frames=8.5), "frames must be a whole number"),
    (dict(seed=1.5), "seed must be a whole number"),
    (dict(steps=0), "steps must be >= 1"),
    (dict(shift=0), "shift must be > 0"),
    (dict(cfg_scale=-1), "CFG scale must be >= 0"),
    (dict(prompt="  "), "the prompt is empty"),
    (dict(lora_path="no/such/lora.safetensors"), "LoRA file not found: no/such/lora.safetensors"),
])
def test_bad_input_is_an_input_error_stating_the_rule(pipe, tmp_path, kw, rule):
    with pytest.raises(InputError, match=rule):
        gen(pipe, tmp_path, **kw)
    assert not list(tmp_path.iterdir())  # rejected before anything was generated or written


def test_distilled_model_has_fixed_steps_and_warns_about_cfg(pipe, tmp_path):
    cfg = pipe.cfg.replace(denoising_step_list=[1000, 500], enable_cfg=False)
    distill = WanPipeline(cfg, pipe.dit, pipe.vae, pipe.text_encoder, None, "cpu")
    with pytest.raises(InputError, match=r"runs exactly 2 steps \(denoising_step_list \[1000, 500\]\), got steps=3"):
        gen(distill, tmp_path, steps=3)
    res = gen(distill, tmp_path)
    assert res.nfe == 2 and res.warnings == []
    res = gen(distill, tmp_path, cfg_scale=4)  # allowed, but the user is told why it is a bad idea
    assert res.nfe == 4 and any("enable_cfg is true with a few-step distill" in w for w in res.warnings)


def test_i2v_needs_an_image_and_uses_it(i2v_pipe, tmp_path):
    with pytest.raises(InputError, match="image-to-video .* upload a start image"):
        gen(i2v_pipe, tmp_path)
    rng = np.random.default_rng(0)
    red, noise = np.zeros((32, 32, 3), np.uint8), rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)  # RGBA works
    red[..., 0] = 255
    a, b = gen(i2v_pipe, tmp_path, image=red), gen(i2v_pipe, tmp_path, image=noise)
    assert a.frames.shape == (5, 32, 32, 3) and read_video(a.video).shape == (5, 32, 32, 3)
    assert not np.array_equal(a.frames, b.frames)  # the image conditions the video


def test_t2v_ignores_an_uploaded_image(pipe, tmp_path):
    img = np.full((32, 32, 3), 200, np.uint8)
    np.testing.assert_array_equal(gen(pipe, tmp_path, image=img).frames, gen(pipe, tmp_path).frames)


# ---- runtime LoRA -------------------------------------------------------------------------------------------------
def write_lora(model: nn.Module, path: Path, seed: int, rank: int = 4, wrong_shape: bool = False) -> Path:
    """A LightX2V-format LoRA (diffusion_model.<module>.lora_up/down.weight) on every linear of the DiT's blocks;
    `wrong_shape` makes one pair too wide for this model (as a LoRA for another model size would be)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.startswith("blocks."):
            in_f = m.in_features + (8 if wrong_shape and not out else 0)
            out[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.3
            out[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * 0.3
    save_file(out, str(path))
    return path


@pytest.fixture
def clean_loras(pipe):
    yield
    runtime_loras(pipe.dit).clear()


def test_lora_switching_changes_the_output_without_reloading(pipe, tmp_path, clean_loras):
    out = tmp_path / "out"
    a = write_lora(pipe.dit, tmp_path / "a.safetensors", seed=1)
    write_lora(pipe.dit, tmp_path / "b.safetensors", seed=2)
    dit, ptrs = pipe.dit, {k: v.data_ptr() for k, v in pipe.dit.state_dict().items()}
    base = gen(pipe, out).frames
    with_a = gen(pipe, out, lora_path=str(a), lora_strength=1.0)
    assert with_a.lora == "a.safetensors @ 1" and not np.array_equal(with_a.frames, base)
    half_a = gen(pipe, out, lora_path=str(a), lora_strength=0.5).frames  # re-weighted, not re-added
    assert runtime_loras(pipe.dit).names == [f"{UI_LORA_PREFIX}{a.resolve()}"]
    assert not np.array_equal(half_a, with_a.frames) and not np.array_equal(half_a, base)
    np.testing.assert_array_equal(gen(pipe, out, lora_path=str(a), lora_strength=0.0).frames, base)
    # lora_dir: a bare file name resolves there. Switching a -> b replaces the LoRA.
    with_b = gen(pipe, out, lora_path="b.safetensors", lora_dir=tmp_path, lora_strength=1.0)
    assert runtime_loras(pipe.dit).names == [f"{UI_LORA_PREFIX}{(tmp_path / 'b.safetensors').resolve()}"]
    assert not np.array_equal(with_b.frames, with_a.frames) and not np.array_equal(with_b.frames, base)
    np.testing.assert_array_equal(gen(pipe, out, lora_path=str(a)).frames, with_a.frames)  # back to a: same video
    np.testing.assert_array_equal(gen(pipe, out, lora_path="").frames, base)  # no LoRA: the base model again
    assert runtime_loras(pipe.dit).names == []
    assert pipe.dit is dit and {k: v.data_ptr() for k, v in pipe.dit.state_dict().items()} == ptrs  # no reload


def test_a_lora_for_another_model_is_an_input_error_and_keeps_the_previous_one(pipe, tmp_path, clean_loras):
    a = write_lora(pipe.dit, tmp_path / "a.safetensors", seed=1)
    bad = write_lora(pipe.dit, tmp_path / "bad.safetensors", seed=2, wrong_shape=True)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with_a = gen(pipe, tmp_path / "out", lora_path=str(a)).frames
    with pytest.raises(InputError, match="cannot use LoRA .*bad.safetensors"):
        gen(pipe, tmp_path / "out", lora_path=str(bad))
    with pytest.raises(InputError, match="cannot use LoRA .*junk.safetensors"):
        gen(pipe, tmp_path / "out", lora_path=str(junk))
    np.testing.assert_array_equal(gen(pipe, tmp_path / "out", lora_path=str(a)).frames, with_a)


# ---- the page and the CLI -----------------------------------------------------------------------------------------
def test_page_defaults_come_from_the_config(pipe, i2v_pipe, tmp_path):
    import gradio as gr

    from inference.webui import build_ui

    def components(p, cfg) -> dict:
        demo = build_ui(p, cfg, lora_dir=tmp_path, output_dir=tmp_path)
        assert isinstance(demo, gr.Blocks)
        return {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}

    write_lora(pipe.dit, tmp_path / "style.safetensors", seed=0)
    t2v = components(pipe, pipe.cfg)
    assert (t2v["frames"].value, t2v["height"].value, t2v["width"].value) == (5, 32, 32)
    assert t2v["cfg_scale"].value == 5.0 and t2v["steps"].value == 3 and t2v["steps"].interactive is not False
    assert t2v["image"].visible is False and t2v["negative"].value == "blurry, static"
    assert ("style.safetensors", "style.safetensors") in t2v["lora_path"].choices
    distill_cfg = pipe.cfg.replace(denoising_step_list=[1000, 750, 500, 250], enable_cfg=False)
    distill = components(pipe, distill_cfg)
    assert distill["cfg_scale"].value == 1.0 and distill["steps"].value == 4 and distill["steps"].interactive is False
    assert components(i2v_pipe, i2v_pipe.cfg)["image"].visible is True


def test_cli_errors_before_serving(tmp_path, write_config, tiny_t2v_dir, capsys):
    assert main(["--config", str(tmp_path / "missing.json")]) == 2
    assert "inference config not found" in capsys.readouterr().err
    config = write_config(tmp_path / "c.json", model_path=str(tiny_t2v_dir))
    assert main(["--config", str(config), "--lora_dir", str(tmp_path / "nope")]) == 2
    assert "--lora_dir is not a folder" in capsys.readouterr().err


# ---- a real browser -----------------------------------------------------------------------------------------------
def find_chromium() -> tuple[str | None, str]:
    """(executable, "") for a Chromium to drive; executable None = Playwright's own download. ("", why) if none."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return "", "the python package playwright is not installed (pip install playwright)"
    if os.environ.get("CHROMIUM_PATH"):
        return os.environ["CHROMIUM_PATH"], ""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name), ""
    with sync_playwright() as p:
        if Path(p.chromium.executable_path).exists():
            return None, ""
    return "", "no Chromium found (apt-get install chromium, or python -m playwright install chromium)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path, write_config, tiny_t2v_dir):
    """`python -m inference.webui` on a free loopback port; yields its URL. Serves WEBUI_TEST_CONFIG if set, else a
    random tiny T2V model (3 UniPC steps, CFG, 5 frames of 32x32)."""
    config = os.environ.get("WEBUI_TEST_CONFIG") or str(write_config(tmp_path / "c.json", model_path=str(tiny_t2v_dir)))
    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "inference.webui", "--config", config, "--port", str(port),
                             "--output_dir", str(tmp_path / "videos")], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"the web UI did not start (exit code {proc.poll()}):\n{log.read()}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def chromium(request) -> str | None:
    """The Chromium to drive. Missing: a skip with the reason, or a failure where the browser test was asked for
    (`-m browser`, or WEBUI_BROWSER_REQUIRED=1 as `make test-browser` sets)."""
    exe, why = find_chromium()
    if exe == "":
        required = os.environ.get("WEBUI_BROWSER_REQUIRED") == "1" or request.config.getoption("-m") == "browser"
        (pytest.fail if required else pytest.skip)(f"browser test: {why}; `make test-browser` installs it")
    return exe


@pytest.mark.browser
def test_browser_generates_a_playable_video(chromium, server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    shot = Path(os.environ.get("WEBUI_SCREENSHOT") or tmp_path / "webui_screenshot.png")
    with sync_playwright() as p:
        # --no-sandbox: Chromium refuses to run as root (CI containers) with its sandbox on.
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(server)
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#frames input").fill("9")
            page.locator("#generate").click()
            video = page.locator("#video video")
            expect(video).to_have_attribute("src", re.compile(r"\.mp4$"), timeout=60_000)
            # The browser itself decoded it: enough data for the current frame, with the video's size.
            page.wait_for_function("v => v.readyState >= 2 && v.videoWidth > 0", arg=video.element_handle(),
                                   timeout=30_000)
            width = video.evaluate("v => v.videoWidth")
            src = video.get_attribute("src")
            body = page.request.get(src if src.startswith("http") else server.rstrip("/") + src).body()
            expect(page.locator("#info")).to_contain_text("DiT evaluations (NFE)")
            info = page.locator("#info").inner_text()
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            page.locator("#frames input").fill("16")  # bad input: the rule is shown, the server keeps serving
            page.locator("#generate").click()
            expect(page.get_by_text("frames must be 4n+1").first).to_be_visible(timeout=30_000)
        finally:
            browser.close()
    (tmp_path / "served.mp4").write_bytes(body)
    frames = read_video(tmp_path / "served.mp4")
    assert frames.shape[0] == 9 and frames.shape[2] == width  # the frames field reached the model
    assert f"9 frames, {width}x{frames.shape[1]}" in info
    assert shot.stat().st_size > 10_000
