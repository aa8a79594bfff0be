"""The video server's task store: the request schema, tasks, and the one-worker FIFO that runs them.

`TaskManager` owns the loaded pipeline: a deque of pending tasks (at most `max_queue_size`; one more raises
`QueueFull`, HTTP 429 in `inference.server`) and one worker thread that runs them in order. `make_task` checks
everything a request asks for when it is submitted (fields: 422 naming the field; paths and LoRA names:
400/404), so a queued task fails only for reasons that show up while running; the task is then marked failed
with the message and the worker carries on. Cancelling a running task sets its flag, which the sampler polls
before every denoising step. Paths are confined to the server's folders (`confined_path`).
"""


from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, field_validator

from inference.video import FORMATS

log = logging.getLogger("inference.server")

PENDING, PROCESSING, COMPLETED, FAILED, CANCELLED = "pending", "processing", "completed", "failed", "cancelled"
FINISHED = (COMPLETED, FAILED, CANCELLED)
LORA_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
MEDIA_TYPES = {".mp4": "video/mp4", ".gif": "image/gif", ".npy": "application/octet-stream"}
REQUEST_LORA = "request:"  # name prefix of per-request runtime LoRAs (the config's own LoRAs are never touched)


# ---- the request ---------------------------------------------------------------------------------
class VideoRequest(BaseModel):
    """POST /v1/tasks/video/ body (LightX2V's fields). Keys we do not know are ignored and listed in the reply."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(min_length=1, description="text prompt")
    negative_prompt: str | None = Field(None, description="used only when the config enables CFG")
    image_path: str | None = Field(None, description="I2V conditioning image, relative to --input_dir")
    seed: int | None = Field(None, ge=0, lt=2**63, description="default: the config's seed")
    save_result_path: str | None = Field(None, description=".mp4/.gif/.npy relative to --output_dir; "
                                                           "default <task_id>.mp4")
    target_video_length: int | None = Field(None, ge=1, description="frames, 4n+1")
    infer_steps: int | None = Field(None, ge=1, le=1000, description="teacher configs only")
    lora_name: str | None = Field(None, description="a LoRA file in --lora_dir (with or without extension)")
    lora_strength: float = Field(1.0, allow_inf_nan=False)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must contain non-whitespace text")
        return v

    @field_validator("target_video_length")
    @classmethod
    def _frames_4n1(cls, v: int | None) -> int | None:
        if v is not None and (v - 1) % 4:
            raise ValueError(f"target_video_length must be 4n+1 (e.g. 5, 17, 81), got {v}")
        return v

    @field_validator("image_path", "save_result_path", "lora_name", "negative_prompt")
    @classmethod
    def _empty_is_unset(cls, v: str | None) -> str | None:
        # LightX2V clients send "" for "not given"
        return v or None


def field_error(name: str, msg: str, value: Any = None) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors, for checks that need the server's state."""
    return HTTPException(422, detail=[{"type": "value_error", "loc": ["body", name], "msg": msg, "input": value}])


# ---- paths ---------------------------------------------------------------------------------------
def confined_path(base: Path, user_path: str, field_name: str) -> Path:
    """`user_path` (relative to `base`, or absolute) resolved with symlinks followed; 400 unless it stays in `base`.

    `..` components are refused outright, even when the result would land inside: a client has no reason to use them.
    """
    root = base.resolve()
    p = Path(user_path)
    if "\x00" in user_path or ".." in p.parts:
        raise HTTPException(400, f"{field_name} must not contain '..': got {user_path!r}")
    resolved = (root / p).resolve()  # an absolute p replaces root; resolve() follows symlinks on the way
    if not resolved.is_relative_to(root):
        raise HTTPException(400, f"{field_name} {user_path!r} leads outside the server's directory for it "
                                 f"({root}); give a path inside it")
    return resolved


def lora_files(lora_dir: Path) -> list[str]:
    """The LoRA file names a request may ask for."""
    return sorted(p.name for p in lora_dir.iterdir() if p.suffix in LORA_SUFFIXES and p.is_file())


def find_lora(lora_dir: Path | None, name: str) -> Path:
    """The file for `lora_name`: a plain file name in `lora_dir`, the extension optional; 400/404 otherwise."""
    if lora_dir is None:
        raise HTTPException(400, "lora_name needs a server started with --lora_dir")
    if name in (".", "..") or Path(name).name != name or "\\" in name or "\x00" in name:
        raise HTTPException(400, f"lora_name must be a file name in the LoRA directory, got {name!r}")
    names = [name] if Path(name).suffix in LORA_SUFFIXES else [name + s for s in LORA_SUFFIXES]
    for candidate in names:
        path = lora_dir / candidate
        if path.is_file():
            return confined_path(lora_dir, candidate, "lora_name")  # a symlink out of lora_dir is refused
    raise HTTPException(404, f"no LoRA named {name!r} in the LoRA directory; available: {lora_files(lora_dir)}")


# ---- tasks ---------------------------------------------------------------------------------------
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
    lora_path: Path | None = None
    lora_strength: float = 1.0
    overrides: dict[str, int] = field(default_factory=dict)  # InferConfig fields for this call
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


class TaskManager:
    """The loaded pipeline, the bounded FIFO of pending tasks and the one worker thread that runs them.

    All task state changes happen under `self._cond`; only the worker touches the pipeline.
    """

    def __init__(self, pipe, model: str, output_dir: str | Path, input_dir: str | Path | None = None,
                 lora_dir: str | Path | None = None, max_queue_size: int = 10, max_history: int = 1000) -> None:
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        self.pipe, self.model = pipe, model
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
        if cfg.task == "i2v" and req.image_path is None:
            raise field_error("image_path", "this server runs i2v: image_path (relative to the input directory) "
                                            "is required")
        if cfg.task == "t2v" and req.image_path is not None:
            raise HTTPException(400, "image_path is for i2v; this server runs t2v")
        overrides: dict[str, int] = {}
        if req.infer_steps is not None:
            if cfg.is_distill and req.infer_steps != len(cfg.denoising_step_list):
                raise field_error("infer_steps", f"this is a distill config: its steps are denoising_step_list "
                                                 f"{cfg.denoising_step_list} ({len(cfg.denoising_step_list)} steps)"
                                                 "; leave infer_steps out", req.infer_steps)
            if not cfg.is_distill:
                overrides["infer_steps"] = req.infer_steps
        if req.target_video_length is not None:
            overrides["target_video_length"] = req.target_video_length
        save_path = confined_path(self.output_dir, req.save_result_path or f"{task_id}.mp4", "save_result_path")
        if save_path.suffix.lower() not in MEDIA_TYPES:
            raise field_error("save_result_path", f"the extension must be one of {['.' + f for f in FORMATS]}",
                              req.save_result_path)
        image = None
        if req.image_path is not None:
            if self.input_dir is None:
                raise HTTPException(400, "image_path needs a server started with --input_dir")
            image = confined_path(self.input_dir, req.image_path, "image_path")
            if not image.is_file():
                raise HTTPException(400, f"image_path {req.image_path!r} is not a file in the input directory")
        lora = None if req.lora_name is None else find_lora(self.lora_dir, req.lora_name)
        return Task(task_id, req.prompt, save_path, cfg.seed if req.seed is None else req.seed,
                    negative_prompt=req.negative_prompt, image_path=image, lora_path=lora,
                    lora_strength=req.lora_strength, overrides=overrides)

    def submit(self, task: Task) -> Task:
        with self._cond:
            if self._stopping:
                raise HTTPException(503, "the server is shutting down")
            if len(self._queue) >= self.max_queue_size:
                raise QueueFull(f"the queue is full ({len(self._queue)} of {self.max_queue_size} pending); "
                                "retry later")
            self._tasks[task.task_id] = task
            self._queue.append(task)
            self._prune()
            self._cond.notify_all()
        return task

    def _prune(self) -> None:
        """Forget the oldest finished tasks beyond max_history (their files stay)."""
        finished = [k for k, t in self._tasks.items() if t.status in FINISHED]
        for k in finished[: max(0, len(self._tasks) - self.max_history)]:
            del self._tasks[k]

    def get(self, task_id: str) -> Task:
        with self._cond:
            task = self._tasks.get(task_id)
        if task is None:
            raise HTTPException(404, f"unknown task id {task_id!r}")
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
                raise HTTPException(409, f"task {task_id} already finished: {task.status}")
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
                      "uptime_s": time.time() - self.started}
        status["loras"] = None if self.lora_dir is None else lora_files(self.lora_dir)
        return status

    # ---- the worker ----------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._worker is not None:
                return
            self._stopping = False
            self._worker = threading.Thread(target=self._loop, name="video-worker", daemon=True)
            self._worker.start()

    def stop(self, timeout: float = 60.0) -> None:
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

    @property
    def worker_alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def _loop(self) -> None:
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
        except Cancelled as e:
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
        from inference.video import read_image, save_video

        image = None if task.image_path is None else read_image(task.image_path)
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


