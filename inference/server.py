"""HTTP video-generation server with LightX2V's routes: one model, one worker, a bounded FIFO queue.

    python -m inference.server --config configs/tiny/t2v_distill_4step.json --port 8000 \
        --output_dir outputs/server [--input_dir inputs] [--lora_dir loras/] [--max_queue_size 10]

    curl -s -X POST localhost:8000/v1/tasks/video/ -H 'Content-Type: application/json' \
        -d '{"prompt": "a red circle moving left", "seed": 1}'          # {"task_id": ..., "task_status": "pending"}
    curl -s localhost:8000/v1/tasks/<task_id>/status                   # pending|processing|completed|failed|cancelled
    curl -s -o out.mp4 localhost:8000/v1/tasks/<task_id>/result        # 404 with the status until completed
    curl -s -X DELETE localhost:8000/v1/tasks/<task_id>                # cancel (pending or mid-run)

Routes (docs/lightx2v_formats.md "HTTP server"): POST /v1/tasks/video/, GET /v1/tasks/{id}/status, GET
/v1/tasks/{id}/result,
DELETE /v1/tasks/{id}, GET /v1/tasks/queue/status, GET /v1/service/status.

The pipeline is loaded once at startup. `TaskManager` (`inference/tasks.py`: the request schema, tasks and the
worker) owns it: a deque of pending tasks (at most `max_queue_size`; one more is HTTP 429) and one worker thread
that runs them in order. Everything a request asks for is checked when it is submitted (fields: 422 naming the
field; paths and LoRA names: 400/404), so a queued task fails only for reasons that show up while running (an
unreadable image, a LoRA that does not fit the model, out of memory): the task is marked failed with the message
and the worker carries on. Cancelling a running task sets its flag, which the sampler polls before every
denoising step (`inference.sampling.Cancelled`). Stopping the server cancels the running task, drops the queue
and joins the worker.

Paths in requests are confined: `save_result_path` resolves inside --output_dir, `image_path` inside --input_dir and
`lora_name` is a file name in --lora_dir; `..`, absolute paths elsewhere and symlinks that lead out are refused (400).
Per-request LoRAs use the runtime (unmerged) path of `inference.lora`, so switching LoRAs needs no reload.
The server has no authentication: it binds to 127.0.0.1 by default; put a proxy in front to expose it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse

from inference.tasks import CANCELLED, COMPLETED, MEDIA_TYPES, QueueFull, TaskManager, VideoRequest


# ---- the app -------------------------------------------------------------------------------------
def create_app(manager: TaskManager) -> FastAPI:
    """The FastAPI app over `manager`; its lifespan starts the worker and stops it with the server."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        manager.start()
        yield
        import asyncio

        await asyncio.to_thread(manager.stop)

    app = FastAPI(title="stepdistill video server", lifespan=lifespan)
    app.state.manager = manager

    @app.post("/v1/tasks/video/")
    def create_video_task(req: VideoRequest) -> JSONResponse:
        task = manager.make_task(req)
        try:
            manager.submit(task)
        except QueueFull as e:
            return JSONResponse({"detail": str(e), "max_queue_size": manager.max_queue_size}, status_code=429,
                                headers={"Retry-After": "1"})
        body = {"task_id": task.task_id, "task_status": task.status, "save_result_path": str(task.save_path)}
        if req.model_extra:
            body["ignored_fields"] = sorted(req.model_extra)
        return JSONResponse(body)

    # before /v1/tasks/{task_id}/status, which would otherwise take "queue" for a task id
    @app.get("/v1/tasks/queue/status")
    def queue_status() -> dict[str, Any]:
        return manager.queue_status()

    @app.get("/v1/tasks/{task_id}/status")
    def task_status(task_id: str) -> dict[str, Any]:
        return manager.status(task_id)

    @app.get("/v1/tasks/{task_id}/result")
    def task_result(task_id: str):
        task = manager.get(task_id)
        if task.status != COMPLETED:
            return JSONResponse({"detail": f"no result: the task is {task.status}", "task_id": task_id,
                                 "status": task.status, "error": task.error}, status_code=404)
        if not task.save_path.is_file():
            return JSONResponse({"detail": f"the result file {task.save_path} is gone", "task_id": task_id,
                                 "status": task.status}, status_code=404)
        return FileResponse(task.save_path, media_type=MEDIA_TYPES[task.save_path.suffix.lower()],
                            filename=task.save_path.name)

    @app.delete("/v1/tasks/{task_id}")
    def cancel_task(task_id: str) -> dict[str, Any]:
        task = manager.cancel(task_id)
        msg = "cancelled" if task.status == CANCELLED else "cancellation requested; stops at the next step"
        return {"task_id": task_id, "status": task.status, "message": msg}

    @app.get("/v1/service/status")
    def service_status() -> dict[str, Any]:
        return manager.service_status()

    return app


def build_manager(config: str | Path, model_path: str | Path | None = None, task: str | None = None,
                  output_dir: str | Path = "outputs/server", input_dir: str | Path | None = None,
                  lora_dir: str | Path | None = None, max_queue_size: int = 10, **overrides: Any) -> TaskManager:
    """Load the pipeline of `config` (overrides: InferConfig fields, e.g. target_video_length) into a manager."""
    from inference.config import load_config
    from inference.loader import load_pipeline, resolve_model_path

    cfg = load_config(config, task=task, **overrides)
    folder = resolve_model_path(cfg, model_path)
    pipe = load_pipeline(cfg, folder)
    return TaskManager(pipe, str(folder.resolve()), output_dir, input_dir, lora_dir, max_queue_size)


# ---- running it ----------------------------------------------------------------------------------
class BackgroundServer:
    """uvicorn serving `app` from a thread on a loopback port (tests, the load benchmark); a context manager.

        with BackgroundServer(create_app(manager)) as server:
            httpx.get(server.url + "/v1/service/status")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        # Bind here (port 0 = a free port chosen by the OS) and hand the socket over: no race for the port.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="uvicorn",
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start on {self.url} within {timeout} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Ask uvicorn to exit (lifespan shutdown stops the worker) and join its thread."""
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive():
                raise RuntimeError(f"the server on {self.url} did not stop within {timeout} s")

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="LightX2V-style inference JSON")
    p.add_argument("--model_path", help="Wan-style model folder (default: the config's model_path)")
    p.add_argument("--task", choices=["t2v", "i2v"], help="override the config's task")
    p.add_argument("--host", default="127.0.0.1", help="bind address (no authentication: keep it local)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--output_dir", default="outputs/server", help="results go here; save_result_path is relative "
                                                                  "to it and cannot leave it")
    p.add_argument("--input_dir", default="inputs", help="image_path (I2V) is relative to it and cannot leave it")
    p.add_argument("--max_queue_size", type=int, default=10, help="pending tasks beyond this get HTTP 429")
    p.add_argument("--lora_dir", help="folder of LoRA files that requests may name (lora_name)")
    p.add_argument("--log_level", default="info")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    try:
        manager = build_manager(args.config, args.model_path, args.task, args.output_dir, args.input_dir,
                                args.lora_dir, args.max_queue_size)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = manager.service_status()
    print(f"loaded {s['model']} ({s['task']}, {s['model_cls']}, {s['steps']} steps) on {s['device']} in "
          f"{time.perf_counter() - t0:.1f}s; outputs -> {manager.output_dir}")
    uvicorn.run(create_app(manager), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
