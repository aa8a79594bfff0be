"""The video server's task store: tasks and the one-worker FIFO that runs them (requests: inference/requests.py).

`TaskManager` owns the loaded pipeline: a deque of pending tasks (at most `max_queue_size`; one more raises
`QueueFull`, HTTP 429 in `inference.server`) and one worker thread that runs them in order. `make_task` checks
everything a request asks for when it is submitted (fields: 422 naming the field; paths and LoRA names:
400/404), so a queued task fails only for reasons that show up while running; the task is then marked failed
with the message and the worker carries on. Requests beyond the `ServerLimits` are refused (422 naming the
limit), and a result path already owned by a task or a file is 409. Cancelling a running task sets its flag, which
the sampler polls before every denoising step and forward pre-hooks check inside the networks (`Interrupted`).
Paths are confined to the server's folders (`confined_path`); an input image is checked again when the task opens
it, or arrives inline (base64 / data URL).
"""


from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from inference.requests import (
    RequestError,
    ServerLimits,
    VideoRequest,
    check_limits,
    confined_path,
    decode_inline_image,
    field_error,
    find_lora,
    inline_image,
    lora_files,
    read_confined_image,
)
from inference.ti2v_pipeline import TI2VPipeline
from inference.video import FORMATS, decode_image

log = logging.getLogger("inference.server")

PENDING, PROCESSING, COMPLETED, FAILED, CANCELLED = "pending", "processing", "completed", "failed", "cancelled"
FINISHED = (COMPLETED, FAILED, CANCELLED)
MEDIA_TYPES = {".mp4": "video/mp4", ".gif": "image/gif", ".npy": "application/octet-stream"}
REQUEST_LORA = "request:"  # name prefix of per-request runtime LoRAs (the config's own LoRAs are never touched)


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


@dataclass(eq=False)  # identity: the queue removes a task by identity
class Task:
    """One request and its life: pending -> processing -> completed | failed | cancelled."""

    task_id: str
    prompt: str
    save_path: Path
    seed: int
    negative_prompt: str | None = None
    image_path: Path | None = None
    image_bytes: bytes | None = field(default=None, repr=False)  # an inline (base64) image, decoded
    lora_path: Path | None = None
    lora_strength: float = 1.0
    overrides: dict[str, Any] = field(default_factory=dict)  # InferConfig fields for this call (TI2V: task)
    status: str = PENDING
    submit_time: float = field(default_factory=time.time)
    start_time: float | None = None
    end_time: float | None = None
    error: str | None = None
    step: int = 0
    num_steps: int | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)

    def to_status(self) -> dict[str, Any]:
        """GET /v1/tasks/{id}/status: LightX2V's fields first, then timings and progress."""
        waited = None if self.start_time is None else self.start_time - self.submit_time
        ran = None if self.start_time is None or self.end_time is None else self.end_time - self.start_time
        return {"task_id": self.task_id, "status": self.status, "start_time": _iso(self.start_time),
                "end_time": _iso(self.end_time), "error": self.error, "save_result_path": str(self.save_path),
                "submit_time": _iso(self.submit_time), "queue_wait_s": waited, "run_s": ran,
                "progress": {"step": self.step, "total": self.num_steps}, "seed": self.seed,
                "cancel_requested": self.cancel_event.is_set()}


class QueueFull(Exception):
    """The pending queue already holds max_queue_size tasks (HTTP 429)."""


INTERRUPT_DEPTH = 3  # module-name depth of the cancellation checks (e.g. "blocks.7.self_attn")


class Interrupted(Exception):
    """Raised inside a network's forward (text encoder, image encoder, DiT block, VAE layer) when the running task
    was cancelled, so that a long stage stops within one layer instead of at the next denoising step."""


class TaskManager:
    """The loaded pipeline, the bounded FIFO of pending tasks and the one worker thread that runs them.

    All task state changes happen under `self._cond`; only the worker touches the pipeline.
    """

    def __init__(self, pipe, model: str, output_dir: str | Path, input_dir: str | Path | None = None,
                 lora_dir: str | Path | None = None, max_queue_size: int = 10, max_history: int = 1000,
                 limits: ServerLimits | None = None) -> None:
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        self.pipe, self.model = pipe, model
        self.limits = limits or ServerLimits.for_model(pipe.cfg, pipe.dit.text_len)
        self._hooks: list = []  # forward pre-hooks that stop a cancelled task inside a stage (_install_interrupts)
        self._worker_ident: int | None = None  # thread id of the worker while it runs
        self.output_dir = Path(output_dir).resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.input_dir = None if input_dir is None else Path(input_dir).resolve()
        self.lora_dir = None if lora_dir is None else Path(lora_dir).resolve()
        if self.lora_dir is not None and not self.lora_dir.is_dir():
            raise FileNotFoundError(f"--lora_dir {self.lora_dir} is not a directory")
        self.max_queue_size, self.max_history = max_queue_size, max_history
        self._tasks: collections.OrderedDict[str, Task] = collections.OrderedDict()
        self._queue: collections.deque[Task] = collections.deque()
        self._cond = threading.Condition()
        self._current: Task | None = None
        self._stopping = False
        self._worker: threading.Thread | None = None
        self._lora: tuple[Path, int] | None = None  # (file, mtime) of the attached per-request LoRA
        self.started = time.time()

    # ---- submission (request threads) ----------------------------------------------------------
    def make_task(self, req: VideoRequest) -> Task:
        """Check a request against this server (paths, task type, LoRA, step override) and build its task."""
        cfg = self.pipe.cfg
        task_id = str(uuid.uuid4())
        check_limits(req, self.limits, cfg)
        overrides: dict[str, Any] = {}
        if isinstance(self.pipe, TI2VPipeline):  # Wan2.2 TI2V-5B runs both tasks: the request's image decides
            overrides["task"] = "t2v" if req.image_path is None else "i2v"
        elif cfg.task == "i2v" and req.image_path is None:
            raise field_error("image_path", "this server runs i2v: image_path (relative to the input directory) "
                                            "is required")
        elif cfg.task == "t2v" and req.image_path is not None:
            raise RequestError(400, "image_path is for i2v; this server runs t2v")
        if req.infer_steps is not None:
            if cfg.is_distill and req.infer_steps != len(cfg.denoising_step_list):
                raise field_error("infer_steps", f"this is a distill config: its steps are denoising_step_list "
                                                 f"{cfg.denoising_step_list} ({len(cfg.denoising_step_list)} steps)"
                                                 "; leave infer_steps out", req.infer_steps)
            if not cfg.is_distill:
                overrides["infer_steps"] = req.infer_steps
        for name in ("target_video_length", "target_height", "target_width"):
            if getattr(req, name) is not None:
                overrides[name] = getattr(req, name)
        save_path = confined_path(self.output_dir, req.save_result_path or f"{task_id}.mp4", "save_result_path")
        if save_path.suffix.lower() not in MEDIA_TYPES:
            raise field_error("save_result_path", f"the extension must be one of {['.' + f for f in FORMATS]}",
                              req.save_result_path)
        image, image_bytes = self._request_image(req.image_path)
        lora = None if req.lora_name is None else find_lora(self.lora_dir, req.lora_name)
        return Task(task_id, req.prompt, save_path, cfg.seed if req.seed is None else req.seed,
                    negative_prompt=req.negative_prompt, image_path=image, image_bytes=image_bytes, lora_path=lora,
                    lora_strength=req.lora_strength, overrides=overrides)

    def _request_image(self, image_path: str | None) -> tuple[Path | None, bytes | None]:
        """(file in --input_dir, None) or (None, decoded inline image bytes) for a request's image_path."""
        if image_path is None:
            return None, None
        payload = inline_image(image_path)
        if payload is not None:
            return None, decode_inline_image(payload, self.limits.max_image_bytes)
        if self.input_dir is None:
            raise RequestError(400, "image_path needs a server started with --input_dir (or send the image as "
                                     "base64 / a data URL)")
        image = confined_path(self.input_dir, image_path, "image_path")
        if not image.is_file():
            raise RequestError(400, f"image_path {image_path!r} is not a file in the input directory")
        return image, None

    def submit(self, task: Task) -> Task:
        with self._cond:
            if self._stopping:
                raise RequestError(503, "the server is shutting down")
            if len(self._queue) >= self.max_queue_size:
                raise QueueFull(f"the queue is full ({len(self._queue)} of {self.max_queue_size} pending); "
                                "retry later")
            self._check_unclaimed(task.save_path)
            self._tasks[task.task_id] = task
            self._queue.append(task)
            self._prune()
            self._cond.notify_all()
        return task

    def _check_unclaimed(self, path: Path) -> None:
        """409 if another task will write (or wrote) `path`, or a file is already there: every task has its own
        result file, so /result of one task never serves another's video. Failed and cancelled tasks wrote
        nothing and release their path."""
        owner = next((t for t in self._tasks.values() if t.save_path == path and t.status not in (FAILED, CANCELLED)),
                     None)
        if owner is not None:
            raise RequestError(409, f"save_result_path {path.name!r} is already the result of task "
                                     f"{owner.task_id} ({owner.status}); choose another name or leave it out")
        if path.exists():
            raise RequestError(409, f"save_result_path {path.name!r} already exists in the output directory; "
                                     "choose another name or leave it out (default: <task_id>.mp4)")

    def _prune(self) -> None:
        """Forget the oldest finished tasks beyond max_history (their files stay)."""
        finished = [k for k, t in self._tasks.items() if t.status in FINISHED]
        for k in finished[: max(0, len(self._tasks) - self.max_history)]:
            del self._tasks[k]

    def get(self, task_id: str) -> Task:
        with self._cond:
            task = self._tasks.get(task_id)
        if task is None:
            raise RequestError(404, f"unknown task id {task_id!r}")
        return task

    def status(self, task_id: str) -> dict[str, Any]:
        task = self.get(task_id)
        with self._cond:
            return task.to_status()

    def cancel(self, task_id: str) -> Task:
        """Pending: out of the queue, cancelled now. Processing: flag set, cancelled at the next step."""
        task = self.get(task_id)
        with self._cond:
            if task.status == PENDING:
                self._queue.remove(task)
                task.status, task.end_time, task.error = CANCELLED, time.time(), "cancelled before it started"
            elif task.status == PROCESSING:
                task.cancel_event.set()
            else:
                raise RequestError(409, f"task {task_id} already finished: {task.status}")
        return task

    # ---- reports -------------------------------------------------------------------------------
    def queue_status(self) -> dict[str, Any]:
        with self._cond:
            return {"queue_size": len(self._queue), "max_queue_size": self.max_queue_size,
                    "pending": [t.task_id for t in self._queue],
                    "processing": None if self._current is None else self._current.task_id}

    def service_status(self) -> dict[str, Any]:
        cfg = self.pipe.cfg
        with self._cond:
            counts = collections.Counter(t.status for t in self._tasks.values())
            status = {"model": self.model, "model_cls": cfg.model_cls, "task": cfg.task,
                      "device": str(self.pipe.device), "dtype": str(self.pipe.dtype).removeprefix("torch."),
                      "steps": cfg.infer_steps, "queue_size": len(self._queue), "max_queue_size": self.max_queue_size,
                      "busy": self._current is not None,
                      "current_task": None if self._current is None else self._current.task_id,
                      "counts": {s: counts.get(s, 0) for s in (PENDING, PROCESSING, *FINISHED)},
                      "uptime_s": time.time() - self.started, "limits": dataclasses.asdict(self.limits)}
        status["loras"] = None if self.lora_dir is None else lora_files(self.lora_dir)
        return status

    # ---- the worker ----------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._worker is not None:
                return
            self._install_interrupts()
            self._stopping = False
            self._worker = threading.Thread(target=self._loop, name="video-worker", daemon=True)
            self._worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running task, drop the queue, join the worker (raises if it does not stop in time)."""
        with self._cond:
            self._stopping = True
            now = time.time()
            for task in self._queue:
                task.status, task.end_time, task.error = CANCELLED, now, "the server shut down"
            self._queue.clear()
            if self._current is not None:
                self._current.cancel_event.set()
            self._cond.notify_all()
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.join(timeout)
            if worker.is_alive():
                raise RuntimeError(f"the worker did not stop within {timeout} s")
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _install_interrupts(self) -> None:
        """A forward pre-hook on every layer of every network: raises `Interrupted` once the running task is
        cancelled (a DELETE or the server stopping). Only the worker runs the networks, so only it can raise."""
        from torch import nn

        def check(module: nn.Module, args: tuple) -> None:
            task = self._current
            if task is not None and task.cancel_event.is_set() and threading.get_ident() == self._worker_ident:
                raise Interrupted(f"stopped inside {type(module).__name__} at step {task.step}")

        text_model = getattr(self.pipe.text_encoder, "model", self.pipe.text_encoder)
        nets = (self.pipe.dit, self.pipe.vae, text_model, self.pipe.image_encoder)
        for net in nets:
            if isinstance(net, nn.Module):
                # Down to attention / FFN / VAE resblock level (names with < INTERRUPT_DEPTH dots): fine enough to
                # stop within a fraction of a step, without a hook on every linear (hooks cost ~5% of a tiny CPU
                # forward when on every module).
                self._hooks += [m.register_forward_pre_hook(check) for name, m in net.named_modules()
                                if name.count(".") < INTERRUPT_DEPTH]

    @property
    def worker_alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def _loop(self) -> None:
        self._worker_ident = threading.get_ident()
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                task = self._queue.popleft()
                task.status, task.start_time, self._current = PROCESSING, time.time(), task
            try:
                self._run(task)
            finally:
                with self._cond:
                    self._current = None

    def _run(self, task: Task) -> None:
        """Run one task; every outcome (result, cancellation, any exception) ends up in the task's status."""
        from inference.sampling import Cancelled

        try:
            self._generate(task)
            status, error = COMPLETED, None
        except (Cancelled, Interrupted) as e:
            status = CANCELLED
            error = "the server shut down" if self._stopping else f"cancelled by request ({e})"
        except Exception as e:  # noqa: BLE001 - a task's failure must never take the worker down
            log.exception("task %s failed", task.task_id)
            status, error = FAILED, f"{type(e).__name__}: {e}"
            self._free_memory()
        with self._cond:
            task.status, task.error, task.end_time = status, error, time.time()

    def _generate(self, task: Task) -> None:
        from inference.sampling import Cancelled
        from inference.video import save_video

        image = self._task_image(task)
        self._use_lora(task.lora_path, task.lora_strength)

        def progress(done: int, total: int) -> None:
            task.step, task.num_steps = done, total

        frames = self.pipe.generate(task.prompt, seed=task.seed, image=image, negative_prompt=task.negative_prompt,
                                    callback=progress, cancel=task.cancel_event.is_set, **task.overrides)
        if task.cancel_event.is_set():  # asked for during the VAE decode: honour it, write nothing
            raise Cancelled(task.step, task.num_steps or task.step)
        # Checked again at write time: a symlink could have appeared in the output directory since submission.
        path = confined_path(self.output_dir, str(task.save_path), "save_result_path")
        save_video(frames[0], path, fps=self.pipe.cfg.fps)

    def _task_image(self, task: Task):
        """uint8 [H, W, 3] of an I2V task: its inline bytes, or its file re-checked now that the task opens it."""
        if task.image_bytes is not None:
            return decode_image(task.image_bytes, "image_path (base64)")
        if task.image_path is None:
            return None
        data = read_confined_image(self.input_dir, task.image_path, self.limits.max_image_bytes)
        return decode_image(data, str(task.image_path))

    def _use_lora(self, path: Path | None, strength: float) -> None:
        """Attach / re-weight / switch the per-request runtime LoRA; none asked for -> strength 0 (the base).

        One request LoRA stays attached between requests so that repeating it costs nothing; a different one
        replaces it (read from disk once). A file changed on disk is read again.
        """
        from inference.lora import runtime_loras

        loras = runtime_loras(self.pipe.dit)
        key = None if path is None else (path, path.stat().st_mtime_ns)
        if self._lora is not None and key != self._lora:
            if path is None:  # keep it for a later request, switched off
                loras.set_strength(REQUEST_LORA + str(self._lora[0]), 0.0)
                return
            loras.remove(REQUEST_LORA + str(self._lora[0]))
            self._lora = None
        if key is None:
            return
        name = REQUEST_LORA + str(path)
        if self._lora is None:
            loras.add(path, strength, name=name)  # checks the LoRA against the model first (LoraError)
            self._lora = key
        loras.set_strength(name, strength)

    def _free_memory(self) -> None:
        import torch

        if self.pipe.device.type == "cuda":
            torch.cuda.empty_cache()


