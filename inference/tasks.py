"""The video server's task store: the request schema, tasks, and the one-worker FIFO that runs them.

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

import base64
import binascii
import collections
import dataclasses
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from inference.video import FORMATS, decode_image

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
    image_path: str | None = Field(None, description="I2V conditioning image: a file relative to --input_dir, "
                                                     "base64 image bytes, or a data URL (data:image/png;base64,...)")
    seed: int | None = Field(None, ge=0, lt=2**63, description="default: the config's seed")
    save_result_path: str | None = Field(None, description=".mp4/.gif/.npy relative to --output_dir; "
                                                           "default <task_id>.mp4")
    target_video_length: int | None = Field(None, ge=1, description="frames, 4n+1")
    target_height: int | None = Field(None, ge=16, description="pixels, a multiple of 16 (I2V: sets the area)")
    target_width: int | None = Field(None, ge=16, description="pixels, a multiple of 16 (I2V: sets the area)")
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

    @field_validator("target_height", "target_width")
    @classmethod
    def _multiple_of_16(cls, v: int | None) -> int | None:
        if v is not None and v % 16:
            raise ValueError(f"must be a multiple of 16 (VAE stride 8 x patch 2), got {v}")
        return v

    @field_validator("image_path", "save_result_path", "lora_name", "negative_prompt")
    @classmethod
    def _empty_is_unset(cls, v: str | None) -> str | None:
        # LightX2V clients send "" for "not given"
        return v or None


class RequestError(Exception):
    """A request the task queue refuses: `status` (HTTP-style code) and `detail` (a message, or FastAPI's list of
    field errors). The queue knows nothing of HTTP; inference/server.py maps this onto a response."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(detail if isinstance(detail, str) else str(detail))
        self.status_code, self.detail = status, detail


def field_error(name: str, msg: str, value: Any = None) -> RequestError:
    """A 422 shaped like FastAPI's own validation errors, for checks that need the server's state."""
    return RequestError(422, detail=[{"type": "value_error", "loc": ["body", name], "msg": msg, "input": value}])


# ---- limits (issue 15: one request must not tie up the server) -------------------------------------
@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for; larger requests are refused (422, or 413 for the body) before they queue.

    Defaults (`for_model`) follow the loaded config, which says what the deployment is for: its frame count and
    its area (height x width; a 480p config serves up to 480p, a 720p one up to 720p), steps up to 100 (or the
    config's, if more), prompts up to 8 characters per token of the DiT's text length (the encoder truncates beyond
    it anyway). Cost grows with frames x area x steps; raise a limit with its flag."""

    max_frames: int
    max_pixels: int  # target_height * target_width
    max_steps: int
    max_prompt_chars: int
    max_image_bytes: int = 16 * 2**20  # a decoded image_path (file or base64)
    max_body_bytes: int = 24 * 2**20  # the JSON body: a base64 image of max_image_bytes fits (4/3 expansion)

    def __post_init__(self) -> None:
        bad = {k: v for k, v in dataclasses.asdict(self).items() if not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"server limits must be positive integers, got {bad}")

    @classmethod
    def for_model(cls, cfg, text_len: int, **overrides: int | None) -> ServerLimits:
        """Defaults derived from the inference config and the DiT's text length; `overrides` (CLI flags) win."""
        limits = {"max_frames": cfg.target_video_length,
                  "max_pixels": cfg.target_height * cfg.target_width,
                  "max_steps": max(cfg.infer_steps, 100), "max_prompt_chars": 8 * text_len}
        return cls(**{**limits, **{k: v for k, v in overrides.items() if v is not None}})


def check_limits(req: VideoRequest, limits: ServerLimits, cfg) -> None:
    """422 naming the field, its value and the limit (with the flag that raises it)."""
    frames = req.target_video_length
    if frames is not None and frames > limits.max_frames:
        raise field_error("target_video_length", f"{frames} frames exceed this server's limit of "
                                                 f"{limits.max_frames} (--max_frames)", frames)
    height, width = req.target_height or cfg.target_height, req.target_width or cfg.target_width
    if height * width > limits.max_pixels:
        name = "target_height" if req.target_height is not None else "target_width"
        raise field_error(name, f"{height}x{width} = {height * width} pixels exceed this server's limit of "
                                f"{limits.max_pixels} (--max_pixels)", getattr(req, name))
    if req.infer_steps is not None and req.infer_steps > limits.max_steps:
        raise field_error("infer_steps", f"{req.infer_steps} steps exceed this server's limit of "
                                         f"{limits.max_steps} (--max_steps)", req.infer_steps)
    for name in ("prompt", "negative_prompt"):
        text = getattr(req, name)
        if text is not None and len(text) > limits.max_prompt_chars:
            raise field_error(name, f"{len(text)} characters exceed this server's limit of "
                                    f"{limits.max_prompt_chars} (--max_prompt_chars)", text[:40] + "...")


# ---- images: a file in --input_dir, base64 or a data URL ----------------------------------------
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s_-]+")
# The first bytes of the picture formats Pillow reads most often (PNG, JPEG, GIF, WebP's RIFF, BMP).
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM")


def inline_image(text: str) -> str | None:
    """The base64 payload if `image_path` carries the image itself (as LightX2V clients send it): a data URL,
    base64 whose first bytes are an image signature, or base64 too long to be a file name. None for a path."""
    if text.startswith("data:"):
        head, sep, payload = text.partition(",")
        if not sep or not head.endswith(";base64") or not head[5:].startswith("image/"):
            raise field_error("image_path", "a data URL must look like data:image/<type>;base64,<data>", text[:40])
        return payload
    if not _BASE64.fullmatch(text):
        return None
    if len(text) > 255:  # no file name is longer than 255 bytes
        return text
    try:
        head = base64.b64decode(text[:16].replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        return None
    return text if head.startswith(_IMAGE_MAGIC) else None


def decode_inline_image(payload: str, max_bytes: int) -> bytes:
    """Base64 -> image bytes, size-limited and checked to be a picture (422 naming image_path otherwise)."""
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise field_error("image_path", f"the inline image is about {len(payload) * 3 // 4} bytes, more than this "
                                        f"server's limit of {max_bytes} (--max_image_bytes)", payload[:40])
    text = re.sub(r"\s", "", payload).replace("-", "+").replace("_", "/")  # url-safe alphabet too
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error as e:
        raise field_error("image_path", f"not valid base64: {e}", payload[:40]) from None
    try:
        decode_image(data, "image_path (base64)")
    except ValueError as e:
        raise field_error("image_path", str(e), payload[:40]) from None
    return data


def read_confined_image(base: Path, path: Path, max_bytes: int) -> bytes:
    """The bytes of an input image, re-checked when the task opens it: still inside `base` with symlinks followed,
    the last component opened without following a symlink (a file swapped for a link after submission is
    refused), and not larger than `max_bytes`. ValueError naming the problem."""
    try:
        resolved = confined_path(base, str(path), "image_path")
    except RequestError as e:
        raise ValueError(f"image_path changed since submission: {e.detail}") from None
    try:
        fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise ValueError(f"cannot open image_path {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"image_path {path} is larger than this server's limit of {max_bytes} bytes")
    return data


# ---- paths ---------------------------------------------------------------------------------------
def confined_path(base: Path, user_path: str, field_name: str) -> Path:
    """`user_path` (relative to `base`, or absolute) resolved with symlinks followed; 400 unless it stays in `base`.

    `..` components are refused outright, even when the result would land inside: a client has no reason to use them.
    """
    root = base.resolve()
    p = Path(user_path)
    if "\x00" in user_path:
        raise RequestError(400, f"{field_name} contains a NUL byte (\\x00), which no file name can hold")
    if ".." in p.parts:
        raise RequestError(400, f"{field_name} must not contain '..': got {user_path!r}")
    resolved = (root / p).resolve()  # an absolute p replaces root; resolve() follows symlinks on the way
    if not resolved.is_relative_to(root):
        raise RequestError(400, f"{field_name} {user_path!r} leads outside the server's directory for it "
                                 f"({root}); give a path inside it")
    return resolved


def lora_files(lora_dir: Path) -> list[str]:
    """The LoRA file names a request may ask for."""
    return sorted(p.name for p in lora_dir.iterdir() if p.suffix in LORA_SUFFIXES and p.is_file())


def find_lora(lora_dir: Path | None, name: str) -> Path:
    """The file for `lora_name`: a plain file name in `lora_dir`, the extension optional; 400/404 otherwise."""
    if lora_dir is None:
        raise RequestError(400, "lora_name needs a server started with --lora_dir")
    if name in (".", "..") or Path(name).name != name or "\\" in name or "\x00" in name:
        raise RequestError(400, f"lora_name must be a file name in the LoRA directory, got {name!r}")
    names = [name] if Path(name).suffix in LORA_SUFFIXES else [name + s for s in LORA_SUFFIXES]
    for candidate in names:
        path = lora_dir / candidate
        if path.is_file():
            return confined_path(lora_dir, candidate, "lora_name")  # a symlink out of lora_dir is refused
    raise RequestError(404, f"no LoRA named {name!r} in the LoRA directory; available: {lora_files(lora_dir)}")


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
    image_bytes: bytes | None = field(default=None, repr=False)  # an inline (base64) image, decoded
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
        if cfg.task == "i2v" and req.image_path is None:
            raise field_error("image_path", "this server runs i2v: image_path (relative to the input directory) "
                                            "is required")
        if cfg.task == "t2v" and req.image_path is not None:
            raise RequestError(400, "image_path is for i2v; this server runs t2v")
        overrides: dict[str, int] = {}
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


