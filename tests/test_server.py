"""The HTTP server (inference/server.py), served for real by uvicorn on a free loopback port and spoken to over HTTP.

Three module-scoped servers on the shipped tiny models: the 4-step T2V student (submit, download, validation, paths,
LoRA), the T2V teacher with max_queue_size 2 (long runs: cancellation mid-run, a full queue) and the 4-step I2V
student (images). Videos are 5 frames so that a task takes a fraction of a second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from inference.server import BackgroundServer, build_manager, create_app
from inference.tasks import TaskManager

pytestmark = pytest.mark.filterwarnings("ignore::inference.lora.LoraCoverageWarning")  # partial LoRAs on purpose

FRAMES = 5  # 4n+1; the smallest useful video
PROMPT = "a red circle moving left"


@dataclass
class Served:
    url: str
    client: httpx.Client
    manager: TaskManager
    out: Path  # --output_dir
    inp: Path  # --input_dir
    loras: Path  # --lora_dir


def serve(tmp: Path, config: str, **kw):
    """Start a real server on a free port; stop it afterwards and check that its worker thread is gone."""
    out, inp, loras = tmp / "out", tmp / "in", tmp / "loras"
    inp.mkdir()
    loras.mkdir()
    manager = build_manager(config, output_dir=out, input_dir=inp, lora_dir=loras, target_video_length=FRAMES, **kw)
    server = BackgroundServer(create_app(manager)).start()
    client = httpx.Client(base_url=server.url, timeout=30.0)
    try:
        yield Served(server.url, client, manager, out.resolve(), inp.resolve(), loras.resolve())
    finally:
        client.close()
        server.stop()
        assert not manager.worker_alive, "the worker thread outlived the server"
        assert not server.thread.is_alive()


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("t2v"), "configs/infer/tiny/t2v_distill_4step.json")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("teacher"), "configs/infer/tiny/t2v_teacher.json", max_queue_size=2,
                     limits={"max_steps": 1000})  # long runs on purpose


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("i2v"), "configs/infer/tiny/i2v_distill_4step.json")


def submit(s: Served, **body) -> str:
    r = s.client.post("/v1/tasks/video/", json={"prompt": PROMPT, **body})
    assert r.status_code == 200, r.text
    assert r.json()["task_status"] == "pending"
    return r.json()["task_id"]


def wait(s: Served, task_id: str, until=("completed", "failed", "cancelled"), timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = s.client.get(f"/v1/tasks/{task_id}/status").json()
        if st["status"] in until:
            return st
        assert time.monotonic() < deadline, f"task stuck: {st}"
        time.sleep(0.01)


def video_size(s: Served) -> tuple[int, int]:
    return s.manager.pipe.cfg.target_height, s.manager.pipe.cfg.target_width


# ---- T2V student: the normal path ---------------------------------------------------------------
def test_submit_poll_download_playable_mp4(t2v, tmp_path):
    r = t2v.client.post("/v1/tasks/video/", json={"prompt": PROMPT, "seed": 3, "save_result_path": "sub/a.mp4",
                                                  "use_prompt_enhancer": False})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task_status"] == "pending" and body["save_result_path"] == str(t2v.out / "sub" / "a.mp4")
    assert body["ignored_fields"] == ["use_prompt_enhancer"]
    st = wait(t2v, body["task_id"])
    assert st["status"] == "completed", st
    assert st["progress"] == {"step": 4, "total": 4} and st["seed"] == 3 and st["error"] is None
    assert st["start_time"] <= st["end_time"] and st["run_s"] > 0

    r = t2v.client.get(f"/v1/tasks/{body['task_id']}/result")
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    (tmp_path / "got.mp4").write_bytes(r.content)
    frames = imageio.mimread(tmp_path / "got.mp4", memtest=False)
    assert len(frames) == FRAMES
    assert np.asarray(frames[0]).shape[:2] == video_size(t2v)
    assert (t2v.out / "sub" / "a.mp4").read_bytes() == r.content

    service = t2v.client.get("/v1/service/status").json()
    assert service["task"] == "t2v" and service["model_cls"] == "wan2.1_distill"
    assert service["device"] == str(t2v.manager.pipe.device)
    assert service["counts"]["completed"] >= 1 and service["max_queue_size"] == 10
    assert t2v.client.get("/v1/tasks/queue/status").json()["max_queue_size"] == 10


def test_unknown_task_is_404(t2v):
    for method, path in (("GET", "/v1/tasks/nope/status"), ("GET", "/v1/tasks/nope/result"),
                         ("DELETE", "/v1/tasks/nope")):
        r = t2v.client.request(method, path)
        assert r.status_code == 404 and "nope" in r.json()["detail"], (method, path, r.text)


@pytest.mark.parametrize("body, name", [
    ({}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": PROMPT, "target_video_length": 6}, "target_video_length"),
    ({"prompt": PROMPT, "seed": "abc"}, "seed"),
    ({"prompt": PROMPT, "seed": -1}, "seed"),
    ({"prompt": PROMPT, "infer_steps": 8}, "infer_steps"),  # a distill config: steps are its denoising_step_list
    ({"prompt": PROMPT, "save_result_path": "a.txt"}, "save_result_path"),
    ({"prompt": PROMPT, "lora_strength": "strong"}, "lora_strength"),
])
def test_bad_fields_are_422_naming_the_field(t2v, body, name):
    r = t2v.client.post("/v1/tasks/video/", json=body)
    assert r.status_code == 422, r.text
    assert [e["loc"][-1] for e in r.json()["detail"]] == [name]


def test_distill_infer_steps_error_explains(t2v):
    r = t2v.client.post("/v1/tasks/video/", json={"prompt": PROMPT, "infer_steps": 8})
    assert "denoising_step_list" in r.json()["detail"][0]["msg"]
    task = submit(t2v, infer_steps=4)  # the config's own step count is accepted
    assert wait(t2v, task)["status"] == "completed"


@pytest.mark.parametrize("kind", ["dotdot", "dotdot_inside", "absolute_outside", "symlink_dir", "symlink_file"])
def test_save_result_path_cannot_escape(t2v, tmp_path, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    if kind == "dotdot":
        path = "../escaped.mp4"
    elif kind == "dotdot_inside":
        path = "sub/../escaped.mp4"
    elif kind == "absolute_outside":
        path = str(outside / "escaped.mp4")
    elif kind == "symlink_dir":
        (t2v.out / f"link_{tmp_path.name}").symlink_to(outside, target_is_directory=True)
        path = f"link_{tmp_path.name}/escaped.mp4"
    else:
        (t2v.out / f"file_{tmp_path.name}.mp4").symlink_to(outside / "escaped.mp4")
        path = f"file_{tmp_path.name}.mp4"
    before = sum(t2v.client.get("/v1/service/status").json()["counts"].values())
    r = t2v.client.post("/v1/tasks/video/", json={"prompt": PROMPT, "save_result_path": path})
    assert r.status_code == 400, r.text
    assert "save_result_path" in r.json()["detail"]
    assert sum(t2v.client.get("/v1/service/status").json()["counts"].values()) == before  # nothing was queued
    assert not (outside / "escaped.mp4").exists() and not (t2v.out.parent / "escaped.mp4").exists()


def test_absolute_save_path_inside_output_dir_is_allowed(t2v):
    task = submit(t2v, save_result_path=str(t2v.out / "abs.gif"))
    assert wait(t2v, task)["status"] == "completed"
    r = t2v.client.get(f"/v1/tasks/{task}/result")
    assert r.headers["content-type"] == "image/gif" and (t2v.out / "abs.gif").is_file()


def test_image_path_on_t2v_server_is_400(t2v):
    r = t2v.client.post("/v1/tasks/video/", json={"prompt": PROMPT, "image_path": "x.png"})
    assert r.status_code == 400 and "i2v" in r.json()["detail"]


# ---- LoRA by name ------------------------------------------------------------------------------
def write_lora(path: Path, dit, rank: int = 4, scale: float = 0.5, out_extra: int = 0) -> Path:
    """A LightX2V-format LoRA on every block's self-attention q and o (shapes read from the model)."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, block in enumerate(dit.blocks):
        for name in ("q", "o"):
            out_dim, in_dim = getattr(block.self_attn, name).weight.shape
            key = f"diffusion_model.blocks.{i}.self_attn.{name}"
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, in_dim, generator=g) * scale
            tensors[f"{key}.lora_up.weight"] = torch.randn(out_dim + out_extra, rank, generator=g) * scale
    save_file(tensors, str(path))
    return path


def result_npy(s: Served, **body) -> np.ndarray:
    task = submit(s, save_result_path=f"{time.monotonic_ns()}.npy", seed=1, **body)
    st = wait(s, task)
    assert st["status"] == "completed", st
    return np.load(st["save_result_path"])


def test_lora_by_name_switches_without_reload(t2v, tmp_path):
    write_lora(t2v.loras / "style.safetensors", t2v.manager.pipe.dit)
    base = result_npy(t2v)
    styled = result_npy(t2v, lora_name="style", lora_strength=1.0)
    assert np.abs(styled.astype(int) - base).mean() > 1, "the LoRA changed nothing"
    assert np.array_equal(result_npy(t2v), base)  # a request without lora_name right after runs the base
    assert np.array_equal(result_npy(t2v, lora_name="style.safetensors", lora_strength=0.0), base)
    assert np.array_equal(result_npy(t2v, lora_name="style", lora_strength=1.0), styled)
    assert t2v.client.get("/v1/service/status").json()["loras"] == ["style.safetensors"]

    r = t2v.client.post("/v1/tasks/video/", json={"prompt": PROMPT, "lora_name": "nope"})
    assert r.status_code == 404 and "style.safetensors" in r.json()["detail"]
    for bad in ("../style", "sub/style", ".."):
        r = t2v.client.post("/v1/tasks/video/", json={"prompt": PROMPT, "lora_name": bad})
        assert r.status_code == 400, (bad, r.text)
    write_lora(tmp_path / "outside.safetensors", t2v.manager.pipe.dit)
    (t2v.loras / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    r = t2v.client.post("/v1/tasks/video/", json={"prompt": PROMPT, "lora_name": "link"})
    assert r.status_code == 400 and "lora_name" in r.json()["detail"]
    (t2v.loras / "link.safetensors").unlink()


def test_lora_that_does_not_fit_fails_that_task_only(t2v):
    write_lora(t2v.loras / "wrong.safetensors", t2v.manager.pipe.dit, out_extra=8)
    st = wait(t2v, submit(t2v, lora_name="wrong"))
    assert st["status"] == "failed" and "does not fit" in st["error"], st
    assert wait(t2v, submit(t2v))["status"] == "completed"


# ---- teacher: long runs, cancellation, a full queue -----------------------------------------------
def test_cancel_pending_and_running_tasks_and_queue_full(teacher):
    s = teacher
    long_task = submit(s, infer_steps=500)  # ~10 s if never cancelled
    st = wait(s, long_task, until=("processing",))
    while st["progress"]["step"] < 1:
        st = s.client.get(f"/v1/tasks/{long_task}/status").json()
    pending = [submit(s, infer_steps=2), submit(s, infer_steps=2)]
    r = s.client.post("/v1/tasks/video/", json={"prompt": PROMPT})
    assert r.status_code == 429 and "queue is full" in r.json()["detail"], r.text
    assert s.client.get("/v1/tasks/queue/status").json() == {
        "queue_size": 2, "max_queue_size": 2, "pending": pending, "processing": long_task}

    r = s.client.get(f"/v1/tasks/{long_task}/result")
    assert r.status_code == 404 and r.json()["status"] == "processing"
    assert s.client.get(f"/v1/tasks/{pending[0]}/result").json()["status"] == "pending"

    r = s.client.delete(f"/v1/tasks/{pending[0]}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    st = s.client.get(f"/v1/tasks/{pending[0]}/status").json()
    assert st["status"] == "cancelled" and st["start_time"] is None
    assert s.client.get("/v1/tasks/queue/status").json()["pending"] == [pending[1]]

    t0 = time.monotonic()
    r = s.client.delete(f"/v1/tasks/{long_task}")
    assert r.status_code == 200 and r.json()["status"] in ("processing", "cancelled")
    st = wait(s, long_task, timeout=10)
    assert st["status"] == "cancelled" and "cancelled" in st["error"], st
    assert time.monotonic() - t0 < 5 and st["progress"]["step"] < 500
    assert s.client.get(f"/v1/tasks/{long_task}/result").status_code == 404

    st = wait(s, pending[1])
    assert st["status"] == "completed" and st["progress"]["total"] == 2, st
    r = s.client.delete(f"/v1/tasks/{pending[1]}")
    assert r.status_code == 409 and "completed" in r.json()["detail"]
    counts = s.client.get("/v1/service/status").json()["counts"]
    assert counts["cancelled"] == 2 and counts["completed"] == 1 and counts["pending"] == 0


def test_shutdown_cancels_the_running_task_and_joins_the_worker(tmp_path):
    manager = build_manager("configs/infer/tiny/t2v_teacher.json", output_dir=tmp_path, target_video_length=FRAMES,
                            limits={"max_steps": 1000})
    server = BackgroundServer(create_app(manager)).start()
    with httpx.Client(base_url=server.url) as client:
        running = client.post("/v1/tasks/video/", json={"prompt": PROMPT, "infer_steps": 1000}).json()["task_id"]
        queued = client.post("/v1/tasks/video/", json={"prompt": PROMPT}).json()["task_id"]
        while client.get(f"/v1/tasks/{running}/status").json()["status"] != "processing":
            time.sleep(0.01)
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 10
    assert not manager.worker_alive and not server.thread.is_alive()
    for task_id in (running, queued):
        st = manager.status(task_id)
        assert st["status"] == "cancelled" and st["error"] == "the server shut down", st


# ---- I2V: images ---------------------------------------------------------------------------------
def test_i2v_without_image_is_422(i2v):
    r = i2v.client.post("/v1/tasks/video/", json={"prompt": PROMPT})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "image_path"]


@pytest.mark.parametrize("kind", ["dotdot", "absolute_outside", "symlink", "missing"])
def test_image_path_cannot_escape_input_dir(i2v, tmp_path, kind):
    outside = tmp_path / "secret.png"
    imageio.imwrite(outside, np.zeros((32, 32, 3), np.uint8))
    path = {"dotdot": "../secret.png", "absolute_outside": str(outside), "missing": "none.png",
            "symlink": f"link_{tmp_path.name}.png"}[kind]
    if kind == "symlink":
        (i2v.inp / path).symlink_to(outside)
    r = i2v.client.post("/v1/tasks/video/", json={"prompt": PROMPT, "image_path": path})
    assert r.status_code == 400 and "image_path" in r.json()["detail"], r.text


def test_non_image_fails_that_task_and_the_next_completes(i2v, tmp_path):
    (i2v.inp / "fake.png").write_text("not an image")
    h, w = video_size(i2v)
    imageio.imwrite(i2v.inp / "frame.png", np.full((h, w, 3), 200, np.uint8))
    bad = submit(i2v, image_path="fake.png")
    good = submit(i2v, image_path="frame.png")
    st = wait(i2v, bad)
    assert st["status"] == "failed" and "cannot read" in st["error"] and "fake.png" in st["error"], st
    st = wait(i2v, good)
    assert st["status"] == "completed", st
    (tmp_path / "i2v.mp4").write_bytes(i2v.client.get(f"/v1/tasks/{good}/result").content)
    assert len(imageio.mimread(tmp_path / "i2v.mp4", memtest=False)) == FRAMES
    assert i2v.manager.worker_alive


# ---- the load benchmark --------------------------------------------------------------------------
def test_load_benchmark_small_run(capsys, tmp_path):
    from benchmarks.load_server import main, run_load

    summary = main(["--config", "configs/infer/tiny/t2v_distill_4step.json", "--requests", "4", "--concurrency", "2",
                    "--target_video_length", str(FRAMES), "--out", str(tmp_path / "load")])
    assert summary["completed"] == 4 and summary["failed"] == 0
    assert summary["throughput_videos_per_s"] > 0
    for key in ("latency_s", "queue_wait_s", "run_s"):
        p = summary[key]
        assert 0 <= p["p50"] <= p["p90"] <= p["max"], (key, p)
    assert summary["latency_s"]["max"] >= summary["run_s"]["max"]
    assert "videos/s" in capsys.readouterr().out and (tmp_path / "load.json").is_file()
    with pytest.raises(ValueError, match="loopback"):
        run_load("http://192.0.2.1:8000", 1, 1)
