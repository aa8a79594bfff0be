"""Server hardening (issue 15) and LightX2V request compatibility (issue 13 item 5), over HTTP to real loopback
servers: request limits (422 naming the limit, 413 for the body), an API key, duplicate result paths (409),
cancellation inside a long stage, image paths re-checked when the task opens them, and base64 / data-URL images.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import threading
import time

import httpx
import imageio.v2 as imageio
import numpy as np
import pytest

from inference import server as server_mod
from inference.config import InferConfig
from inference.requests import ServerLimits, VideoRequest, decode_inline_image
from inference.server import BackgroundServer, bind_warning, build_manager, create_app, is_loopback
from inference.tasks import FAILED
from tests.test_server import FRAMES, PROMPT, Served, serve, submit, wait

KEY = "s3cret-key"
STUDENT = "configs/infer/tiny/t2v_distill_4step.json"


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("t2v_hard"), "configs/infer/tiny/t2v_distill_4step.json")


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """Small limits and an API key."""
    tmp = tmp_path_factory.mktemp("strict")
    manager = build_manager(STUDENT, output_dir=tmp / "out", target_video_length=FRAMES,
                            limits={"max_body_bytes": 4096, "max_prompt_chars": 64, "max_frames": 9,
                                    "max_pixels": 48 * 48})
    with BackgroundServer(create_app(manager, api_key=KEY)) as server:
        with httpx.Client(base_url=server.url, timeout=30.0, headers={"X-API-Key": KEY}) as client:
            yield Served(server.url, client, manager, manager.output_dir, tmp, tmp)


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("i2v_hard"), "configs/infer/tiny/i2v_distill_4step.json")


def detail(r: httpx.Response) -> str:
    d = r.json()["detail"]
    return d if isinstance(d, str) else " ".join(f"{e['loc'][-1]}: {e['msg']}" for e in d)


# ---- limits ------------------------------------------------------------------------------------------------
def test_default_limits_follow_the_model(t2v):
    cfg = t2v.manager.pipe.cfg
    lim = t2v.manager.limits
    assert lim == ServerLimits.for_model(cfg, t2v.manager.pipe.dit.text_len)
    assert (lim.max_frames, lim.max_pixels, lim.max_steps) == (FRAMES, cfg.target_height * cfg.target_width, 100)
    assert t2v.client.get("/v1/service/status").json()["limits"] == dataclasses.asdict(lim)
    assert lim.max_prompt_chars == 8 * t2v.manager.pipe.dit.text_len
    assert ServerLimits.for_model(InferConfig(infer_steps=150), 512).max_steps == 150
    assert ServerLimits.for_model(cfg, 512, max_frames=121).max_frames == 121
    with pytest.raises(ValueError, match="positive integers"):
        ServerLimits.for_model(cfg, 512, max_frames=0)


@pytest.mark.parametrize("body, field, needle", [
    ({"target_video_length": 100001}, "target_video_length", "100001 frames exceed this server's limit of 9"),
    ({"target_height": 4096, "target_width": 4096}, "target_height", "16777216 pixels exceed"),
    ({"target_width": 64}, "target_width", "48x64 = 3072 pixels exceed this server's limit of 2304 (--max_pixels)"),
    ({"prompt": "a red circle " * 10}, "prompt", "130 characters exceed this server's limit of 64"),
    ({"negative_prompt": "x" * 65}, "negative_prompt", "--max_prompt_chars"),
    ({"target_height": 40}, "target_height", "multiple of 16"),
])
def test_limits_are_422_naming_the_limit(strict, body, field, needle):
    before = strict.client.get("/v1/service/status").json()["counts"]
    r = strict.client.post("/v1/tasks/video/", json={"prompt": PROMPT, **body})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][-1] == field and needle in detail(r), r.text
    assert strict.client.get("/v1/service/status").json()["counts"] == before  # nothing queued


def test_steps_limit(teacher_small):
    r = teacher_small.client.post("/v1/tasks/video/", json={"prompt": PROMPT, "infer_steps": 101})
    assert r.status_code == 422 and "101 steps exceed this server's limit of 100 (--max_steps)" in detail(r)


@pytest.fixture(scope="module")
def teacher_small(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("teacher_small"), "configs/infer/tiny/t2v_teacher.json")


def test_huge_body_is_413_before_parsing(strict):
    r = strict.client.post("/v1/tasks/video/", json={"prompt": "x" * 10_000})
    assert r.status_code == 413 and "exceeds this server's limit of 4096 bytes (--max_body_bytes)" in detail(r)

    def chunks():  # no Content-Length: chunked transfer, counted while it arrives
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    r = strict.client.post("/v1/tasks/video/", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text


def test_small_chunked_body_passes(strict):
    def chunks():
        yield b'{"prompt": "a red circle'
        yield b' moving left", "seed": 2}'

    r = strict.client.post("/v1/tasks/video/", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert wait(strict, r.json()["task_id"])["status"] == "completed"


# ---- API key -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers, ok", [
    ({}, False), ({"X-API-Key": "wrong"}, False), ({"Authorization": "Bearer wrong"}, False),
    ({"Authorization": f"Basic {KEY}"}, False), ({"X-API-Key": KEY}, True), ({"Authorization": f"Bearer {KEY}"}, True),
    ({"authorization": f"bearer {KEY}"}, True),
])
def test_api_key_on_every_route(strict, headers, ok):
    with httpx.Client(base_url=strict.url, timeout=30.0, headers=headers) as client:
        for method, path in (("GET", "/v1/service/status"), ("GET", "/v1/tasks/queue/status"),
                             ("GET", "/v1/tasks/x/status"), ("DELETE", "/v1/tasks/x"),
                             ("POST", "/v1/tasks/video/")):
            r = client.request(method, path, json={"prompt": PROMPT, "target_video_length": 99999})
            if ok:
                assert r.status_code != 401, (method, path)
            else:
                assert r.status_code == 401 and "API key" in r.json()["detail"], (method, path, r.text)
                assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("host, warns", [("127.0.0.1", False), ("127.0.0.2", False), ("::1", False),
                                         ("localhost", False), ("0.0.0.0", True), ("::", True),
                                         ("192.168.1.5", True), ("myhost.example", True)])
def test_bind_warning_beyond_loopback_without_key(host, warns):
    assert is_loopback(host) is not warns
    text = bind_warning(host, None)
    assert (text is not None) is warns
    if warns:
        assert "WARNING" in text and host in text and "--api_key" in text and "STEPDISTILL_API_KEY" in text
    assert bind_warning(host, "k") is None


def test_cli_api_key_from_env_and_lightx2v_flags(monkeypatch):
    monkeypatch.setenv("STEPDISTILL_API_KEY", "from-env")
    args = server_mod.parse_args(["--config_json", "c.json", "--model_cls", "wan2.1_distill", "--max_frames", "17"])
    assert (args.config, args.model_cls, args.api_key, args.max_frames) == ("c.json", "wan2.1_distill", "from-env", 17)
    assert server_mod.parse_args(["--config", "c.json", "--api_key", "k"]).api_key == "k"
    monkeypatch.delenv("STEPDISTILL_API_KEY")
    assert server_mod.parse_args(["--config", "c.json"]).api_key is None
    with pytest.raises(SystemExit):
        server_mod.parse_args(["--config", "c.json", "--max_frames", "0"])


def test_cli_refuses_unsupported_model_cls_before_loading(capsys):
    assert server_mod.main(["--config", "configs/infer/tiny/t2v_distill_4step.json", "--model_cls", "wan2.1_sf",
                            "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "WARNING" in err and "model_cls 'wan2.1_sf'" in err and "Self-Forcing" in err


# ---- one task, one result file ---------------------------------------------------------------------------------
def test_duplicate_save_result_path_is_409(t2v):
    first = submit(t2v, save_result_path="dup.npy", seed=1)
    r = t2v.client.post("/v1/tasks/video/", json={"prompt": PROMPT, "seed": 2, "save_result_path": "dup.npy"})
    assert r.status_code == 409 and first in r.json()["detail"], r.text
    assert wait(t2v, first)["status"] == "completed"
    r = t2v.client.post("/v1/tasks/video/", json={"prompt": PROMPT, "save_result_path": str(t2v.out / "dup.npy")})
    assert r.status_code == 409, r.text  # the same file by its absolute name, after completion
    (t2v.out / "left_over.npy").write_bytes(b"")
    r = t2v.client.post("/v1/tasks/video/", json={"prompt": PROMPT, "save_result_path": "left_over.npy"})
    assert r.status_code == 409 and "already exists" in r.json()["detail"]
    got = np.load(io.BytesIO(t2v.client.get(f"/v1/tasks/{first}/result").content))
    assert np.array_equal(got, np.load(t2v.out / "dup.npy"))


def test_result_replaced_by_a_link_is_not_served(t2v, tmp_path):
    task = submit(t2v, save_result_path="linked.npy")
    assert wait(t2v, task)["status"] == "completed"
    (tmp_path / "secret.npy").write_bytes(b"secret")
    (t2v.out / "linked.npy").unlink()
    (t2v.out / "linked.npy").symlink_to(tmp_path / "secret.npy")  # after the task wrote it
    r = t2v.client.get(f"/v1/tasks/{task}/result")
    assert r.status_code == 404 and "replaced by a link" in r.json()["detail"] and b"secret" not in r.content


# ---- cancellation inside a long stage ----------------------------------------------------------------------------
def slow_layers(module, seconds: float):
    """Make every layer of `module` take `seconds` (a long stage made of many layers); returns the hook handles."""
    def sleep(*_):
        time.sleep(seconds)
    return [m.register_forward_pre_hook(sleep) for m in module.modules()]


@pytest.mark.parametrize("stage", ["dit", "text_encoder"])
def test_cancel_stops_inside_a_long_stage(t2v, stage):
    pipe = t2v.manager.pipe
    net = {"dit": pipe.dit, "text_encoder": pipe.text_encoder.model}[stage]
    n = sum(1 for _ in net.modules())
    hooks = slow_layers(net, 0.05)  # one pass through the stage: n x 50 ms
    try:
        task = submit(t2v, save_result_path=f"cancel_{stage}.npy", prompt=f"a {stage} circle moving left")
        wait(t2v, task, until=("processing",))
        time.sleep(0.3)  # well inside the stage
        t0 = time.monotonic()
        assert t2v.client.delete(f"/v1/tasks/{task}").status_code == 200
        st = wait(t2v, task, timeout=10)
        took = time.monotonic() - t0
    finally:
        for h in hooks:
            h.remove()
    assert st["status"] == "cancelled" and "stopped inside" in st["error"], st
    assert took < min(1.0, n * 0.05 / 2), (took, n)  # one layer, not the rest of the stage
    assert not (t2v.out / f"cancel_{stage}.npy").exists()
    assert wait(t2v, submit(t2v))["status"] == "completed"  # the worker carries on


def test_cancel_stops_inside_the_wan_vae_decode(tmp_path):
    """The Wan VAE (a small random one in place of the tiny codec, same strides and z_dim) decodes through many
    causal-conv layers: a cancel after the last denoising step stops it within one layer, and nothing is written."""
    from models.vae import WanVAE

    manager = build_manager(STUDENT, output_dir=tmp_path, target_video_length=FRAMES)
    manager.pipe.vae = WanVAE(dim=8, z_dim=manager.pipe.vae.z_dim).eval()
    n = sum(1 for _ in manager.pipe.vae.decoder.modules())
    with BackgroundServer(create_app(manager)) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        hooks = slow_layers(manager.pipe.vae.decoder, 0.05)
        try:
            s = Served(server.url, client, manager, manager.output_dir, tmp_path, tmp_path)
            task = submit(s, save_result_path="vae.npy")
            st = wait(s, task, until=("processing",))
            while st["progress"]["total"] is None or st["progress"]["step"] < st["progress"]["total"]:
                st = client.get(f"/v1/tasks/{task}/status").json()  # the denoising steps are done: decoding
            time.sleep(0.2)
            t0 = time.monotonic()
            client.delete(f"/v1/tasks/{task}")
            st = wait(s, task, timeout=20)
            took = time.monotonic() - t0
        finally:
            for h in hooks:
                h.remove()
    assert st["status"] == "cancelled" and "stopped inside" in st["error"], st
    assert took < min(1.0, n * 0.05 / 2), (took, n)
    assert not (tmp_path / "vae.npy").exists()


def test_shutdown_inside_a_long_stage_takes_seconds(tmp_path):
    manager = build_manager(STUDENT, output_dir=tmp_path, target_video_length=FRAMES)
    server = BackgroundServer(create_app(manager)).start()
    hooks = slow_layers(manager.pipe.dit, 0.2)  # a DiT forward of ~minutes
    try:
        with httpx.Client(base_url=server.url) as client:
            task = client.post("/v1/tasks/video/", json={"prompt": PROMPT}).json()["task_id"]
            while client.get(f"/v1/tasks/{task}/status").json()["status"] != "processing":
                time.sleep(0.01)
        t0 = time.monotonic()
        server.stop()
        assert time.monotonic() - t0 < 5
    finally:
        for h in hooks:
            h.remove()
    assert manager.status(task)["status"] == "cancelled" and not manager.worker_alive


# ---- images: re-checked at open, base64 and data URLs ---------------------------------------------------------
def png_bytes(h: int, w: int, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    imageio.imwrite(buf, np.full((h, w, 3), colour, np.uint8), format="png")
    return buf.getvalue()


def test_image_swapped_for_a_symlink_after_submission_is_refused(i2v, tmp_path):
    (tmp_path / "secret.png").write_bytes(png_bytes(48, 48))
    (i2v.inp / "swap.png").write_bytes(png_bytes(48, 48))
    task = i2v.manager.make_task(VideoRequest(prompt=PROMPT, image_path="swap.png",
                                              save_result_path="swap.npy"))
    (i2v.inp / "swap.png").unlink()
    (i2v.inp / "swap.png").symlink_to(tmp_path / "secret.png")  # between submission and the task opening it
    i2v.manager._run(task)  # what the worker does with it
    assert task.status == FAILED and "image_path changed since submission" in task.error, task.error
    assert "leads outside" in task.error and not (i2v.out / "swap.npy").exists()


def test_base64_and_data_url_images(i2v):
    h, w = i2v.manager.pipe.cfg.target_height, i2v.manager.pipe.cfg.target_width
    data = png_bytes(h, w, (30, 200, 60))
    (i2v.inp / "green.png").write_bytes(data)
    b64 = base64.b64encode(data).decode()
    results = {}
    for name, image_path in (("file", "green.png"), ("base64", b64), ("data_url", f"data:image/png;base64,{b64}")):
        task = submit(i2v, image_path=image_path, seed=4, save_result_path=f"img_{name}.npy")
        assert wait(i2v, task)["status"] == "completed"
        results[name] = np.load(i2v.out / f"img_{name}.npy")
    np.testing.assert_array_equal(results["base64"], results["file"])  # same bytes, same code path after decoding
    np.testing.assert_array_equal(results["data_url"], results["file"])


@pytest.mark.parametrize("image_path, needle", [
    ("data:image/png;base64,!!!notbase64", "not valid base64"),
    ("data:text/plain;base64,aGVsbG8=", "data:image/<type>;base64"),
    ("data:image/png,rawbytes", "data:image/<type>;base64"),
    (base64.b64encode(b"GIF89a but not really an image " * 20).decode(), "cannot read image_path (base64)"),
])
def test_bad_inline_images_are_422(i2v, image_path, needle):
    r = i2v.client.post("/v1/tasks/video/", json={"prompt": PROMPT, "image_path": image_path})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "image_path", r.text
    assert needle in detail(r), r.text


def test_inline_image_size_limit():
    payload = base64.b64encode(png_bytes(64, 64)).decode()
    assert decode_inline_image(payload, 10_000) == base64.b64decode(payload)
    with pytest.raises(Exception) as e:
        decode_inline_image(payload, 100)
    assert e.value.status_code == 422 and "--max_image_bytes" in str(e.value.detail)


def test_small_request_completes_while_an_abusive_one_is_refused(t2v):
    """A second client's normal request is served in its normal time while huge ones are turned away."""
    t0 = time.monotonic()
    normal = wait(t2v, submit(t2v))
    alone = time.monotonic() - t0
    stop = threading.Event()

    def abuse():
        with httpx.Client(base_url=t2v.url, timeout=30.0) as c:
            while not stop.is_set():
                assert c.post("/v1/tasks/video/", json={"prompt": PROMPT, "target_video_length": 100001}
                              ).status_code == 422

    thread = threading.Thread(target=abuse)
    thread.start()
    try:
        t0 = time.monotonic()
        st = wait(t2v, submit(t2v))
        meanwhile = time.monotonic() - t0
    finally:
        stop.set()
        thread.join()
    assert normal["status"] == st["status"] == "completed"
    assert meanwhile < max(3 * alone, 2.0), (alone, meanwhile)


# ---- the abuse benchmark ---------------------------------------------------------------------------------------
def test_abuse_benchmark_holds_every_case(tmp_path, capsys):
    from benchmarks.load_server import main

    summary = main(["--config", STUDENT, "--abuse", "--out", str(tmp_path / "abuse")])
    failed = [c for c in summary["cases"] if c["held"] is False]
    assert summary["held"] == summary["total"] >= 13 and not failed, failed
    # a distill run may end before the DELETE: only that case may go unmeasured, and then it says so
    unmeasured = [c["case"] for c in summary["cases"] if c["held"] is None]
    assert unmeasured in ([], ["cancel during a long run"]) and summary["not_measured"] == len(unmeasured)
    assert f"held {summary['total']} of {summary['total']}" in capsys.readouterr().out
    assert (tmp_path / "abuse.md").read_text().startswith("**held")
    assert summary["model"] == "checkpoints/tiny-t2v-distill-4step"  # no machine path in results files


def test_sigterm_during_a_long_run_exits_in_seconds(tmp_path):
    """The issue's probe: `python -m inference.server` with a long task running, then SIGTERM."""
    import re
    import signal
    import subprocess
    import sys

    teacher = "configs/infer/tiny/t2v_teacher.json"
    proc = subprocess.Popen([sys.executable, "-m", "inference.server", "--config", teacher,
                             "--port", "0", "--output_dir", str(tmp_path), "--max_steps", "1000",
                             "--log_level", "info"], stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stderr:  # uvicorn announces the port it bound
            if m := re.search(r"Uvicorn running on (http://\S+)", line):
                url = m.group(1)
                break
        assert url, "the server did not start"
        with httpx.Client(base_url=url, timeout=30) as client:
            task = client.post("/v1/tasks/video/", json={"prompt": PROMPT, "infer_steps": 1000}).json()["task_id"]
            while client.get(f"/v1/tasks/{task}/status").json()["progress"]["step"] < 1:
                time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        took = time.monotonic() - t0
        rest = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    # uvicorn shuts down gracefully, then re-raises the signal it caught: exit status -SIGTERM (or 0 on older ones)
    assert rc in (0, -signal.SIGTERM) and took < 5, (rc, took, rest[-2000:])
    assert "Application shutdown complete" in rest
    assert "did not stop" not in rest and "Traceback" not in rest, rest[-2000:]
