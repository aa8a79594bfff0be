"""What a video request may ask for, checked when it is submitted: the request schema (`VideoRequest`), the
server's limits (`ServerLimits`, 422 naming the limit), paths confined to the server's folders (`confined_path`),
inline images (base64 / data URLs) and LoRA files. Refusals are `RequestError`s (an HTTP-style status and a
detail); the task queue (inference/tasks.py) and the routes (inference/server.py) use them, and only the routes
know HTTP.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from inference.video import decode_image

LORA_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


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
