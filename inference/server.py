"""HTTP video-generation server with LightX2V's routes: one model, one worker, a bounded FIFO queue.

    python -m inference.server --config configs/infer/tiny/t2v_distill_4step.json --port 8000 \
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
denoising step and a forward pre-hook checks in every attention / FFN / VAE block, so even one long step or decode
stops within a layer. Stopping the server cancels the running task, drops the queue and joins the worker.

Limits (`ServerLimits`, flags --max_frames, --max_pixels, --max_steps, --max_prompt_chars, --max_image_bytes,
--max_body_bytes; defaults from the config): larger requests get 422 naming the limit, larger bodies 413. A
`save_result_path` another task owns, or a file already there, is 409: each task has its own result file.

Paths in requests are confined: `save_result_path` resolves inside --output_dir, `image_path` inside --input_dir and
`lora_name` is a file name in --lora_dir; `..`, absolute paths elsewhere and symlinks that lead out are refused (400);
the image is checked again when the task opens it. `image_path` may also carry the image itself (base64 or a data
URL, as LightX2V clients send it). Per-request LoRAs use the runtime (unmerged) path of `inference.lora`, so
switching LoRAs needs no reload. Optional API key (--api_key or $STEPDISTILL_API_KEY): every route then needs
`Authorization: Bearer <key>` or `X-API-Key: <key>`. It binds to 127.0.0.1 by default; binding elsewhere without a
key prints a loud warning. docs/serving.md has the details.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse

from inference.config import add_model_args, positive_int
from inference.requests import RequestError, ServerLimits, VideoRequest, confined_path
from inference.tasks import CANCELLED, COMPLETED, MEDIA_TYPES, QueueFull, TaskManager

API_KEY_ENV = "STEPDISTILL_API_KEY"
log = logging.getLogger("inference.server")


# ---- protection: body size, API key, bind address -------------------------------------------------
class BodySizeLimit:
    """ASGI middleware: a request body larger than `max_bytes` is answered 413 before the app parses it.

    A declared Content-Length is checked up front; a body without one (chunked) is read up to the limit and then
    handed on, so a 100 MB prompt never reaches the JSON parser. Before answering 413 the rest of the upload is read
    and dropped (up to DRAIN_FACTOR x the limit, no memory kept): closing a socket with unread data resets it, and
    the client would see a broken connection instead of the answer."""

    DRAIN_FACTOR = 8

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                await self._drain(receive, 0)
                return await self._refuse(send, length.decode("latin-1"))
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, receive, send)  # the client left: let the app see the disconnect
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                if more:
                    await self._drain(receive, size)
                return await self._refuse(send, f"more than {size}")
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _drain(self, receive, size: int) -> None:
        """Read and drop the rest of the body, up to DRAIN_FACTOR x the limit in all."""
        while size <= self.DRAIN_FACTOR * self.max_bytes:
            message = await receive()
            size += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                return

    async def _refuse(self, send, size: str) -> None:
        body = json.dumps({"detail": f"the request body ({size} bytes) exceeds this server's limit of "
                                     f"{self.max_bytes} bytes (--max_body_bytes)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def require_api_key(api_key: str | None):
    """A FastAPI dependency: with a key set, every route needs `Authorization: Bearer <key>` or `X-API-Key: <key>`
    (compared in constant time); 401 otherwise. No key: open (loopback use)."""

    def check(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer <key>' or "
                                     "'X-API-Key: <key>'", headers={"WWW-Authenticate": "Bearer"})

    return check


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and 'localhost' reach only this machine; anything else (0.0.0.0, a LAN address) does not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def bind_warning(host: str, api_key: str | None) -> str | None:
    """The loud warning printed when the server is reachable from other machines without an API key."""
    if api_key is not None or is_loopback(host):
        return None
    bar = "!" * 78
    return (f"{bar}\nWARNING: --host {host} serves every client that can reach this machine, and no API key is "
            f"set:\nanyone can submit jobs (GPU time) and download results. Set --api_key or {API_KEY_ENV}, or "
            f"bind to 127.0.0.1\nbehind an authenticating proxy.\n{bar}")


# ---- the app -------------------------------------------------------------------------------------
def create_app(manager: TaskManager, api_key: str | None = None) -> FastAPI:
    """The FastAPI app over `manager`; its lifespan starts the worker and stops it with the server.

    Bodies larger than `manager.limits.max_body_bytes` get 413; with `api_key`, every route needs the key (401)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        manager.start()
        yield
        import asyncio

        await asyncio.to_thread(manager.stop)

    app = FastAPI(title="stepdistill video server", lifespan=lifespan, dependencies=[Depends(require_api_key(api_key))])
    app.add_middleware(BodySizeLimit, max_bytes=manager.limits.max_body_bytes)
    app.state.manager = manager

    @app.exception_handler(RequestError)
    async def refused(_: Request, e: RequestError) -> JSONResponse:  # the queue's refusals, as HTTP answers
        return JSONResponse({"detail": e.detail}, status_code=e.status_code)

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
        if task.save_path.is_symlink() or not task.save_path.is_file():  # replaced since it was written
            return JSONResponse({"detail": f"the result file {task.save_path.name} is gone or was replaced by a "
                                           "link", "task_id": task_id, "status": task.status}, status_code=404)
        confined_path(manager.output_dir, str(task.save_path), "save_result_path")  # its folders too (400)
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
                  lora_dir: str | Path | None = None, max_queue_size: int = 10,
                  limits: dict[str, int | None] | None = None, **overrides: Any) -> TaskManager:
    """Load the pipeline of `config` (overrides: InferConfig fields, e.g. target_video_length) into a manager.

    `limits`: ServerLimits fields (None keeps the default derived from the model)."""
    from inference.config import load_config
    from inference.loader import check_before_loading
    from inference.parallel import group_task_manager_class, load_pipeline_launched

    cfg = load_config(config, task=task, **overrides)
    folder = check_before_loading(cfg, model_path)  # weight files: truncation, a distill schedule on base weights
    pipe = load_pipeline_launched(cfg, folder)  # under torchrun: on the group of the config's parallel block
    # on a group, rank 0's manager announces each task to the other ranks (inference/parallel.py)
    manager_cls = TaskManager if pipe.parallel is None else group_task_manager_class()
    return manager_cls(pipe, str(folder.resolve()), output_dir, input_dir, lora_dir, max_queue_size,
                       limits=ServerLimits.for_model(pipe.cfg, pipe.dit.text_len, **(limits or {})))


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
    add_model_args(p)
    p.add_argument("--task", choices=["t2v", "i2v"], help="override the config's task")
    p.add_argument("--host", default="127.0.0.1", help="bind address; beyond loopback, set --api_key")
    p.add_argument("--api_key", default=os.environ.get(API_KEY_ENV) or None,
                   help=f"require this key on every route (Authorization: Bearer / X-API-Key); default: ${API_KEY_ENV}")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--output_dir", default="outputs/server", help="results go here; save_result_path is relative "
                                                                  "to it and cannot leave it")
    p.add_argument("--input_dir", default="inputs", help="image_path (I2V) is relative to it and cannot leave it")
    p.add_argument("--max_queue_size", type=int, default=10, help="pending tasks beyond this get HTTP 429")
    p.add_argument("--lora_dir", help="folder of LoRA files that requests may name (lora_name)")
    p.add_argument("--log_level", default="info")
    lim = p.add_argument_group("request limits (422 naming the limit; default: derived from the model, see "
                               "ServerLimits)")
    for name, what in LIMIT_FLAGS.items():
        lim.add_argument(f"--{name}", type=positive_int, help=what)
    return p.parse_args(argv)


LIMIT_FLAGS = {
    "max_frames": "largest target_video_length (default: the config's)",
    "max_pixels": "largest target_height x target_width (default: the config's area)",
    "max_steps": "largest infer_steps (default: 100 or the config's, if larger)",
    "max_prompt_chars": "longest prompt / negative_prompt in characters (default: 8 x the DiT's text_len)",
    "max_image_bytes": "largest image_path image, file or base64 (default: 16 MiB)",
    "max_body_bytes": "largest request body, 413 beyond (default: 24 MiB)",
}


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warning = bind_warning(args.host, args.api_key)
    if warning:  # before the (long) model load, and again once serving
        print(warning, file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        manager = build_manager(args.config, args.model_path, args.task, args.output_dir, args.input_dir,
                                args.lora_dir, args.max_queue_size, model_cls=args.model_cls,
                                limits={name: getattr(args, name) for name in LIMIT_FLAGS})
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from inference.parallel import follow, is_main

    if not is_main(manager.pipe):  # torchrun rank > 0: repeat rank 0's tasks until the server stops
        follow(manager)
        return 0
    s = manager.service_status()
    print(f"loaded {s['model']} ({s['task']}, {s['model_cls']}, {s['steps']} steps) on {s['device']} in "
          f"{time.perf_counter() - t0:.1f}s; outputs -> {manager.output_dir}")
    print(f"limits: {manager.limits}")
    if warning:
        log.warning("serving on %s without an API key", args.host)
        print(warning, file=sys.stderr, flush=True)
    try:
        uvicorn.run(create_app(manager, api_key=args.api_key), host=args.host, port=args.port,
                    log_level=args.log_level)
    finally:  # also when uvicorn never started: the follower ranks of a group must be told to stop
        manager.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
