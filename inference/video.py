"""Write and read videos: `.mp4` (H.264 via imageio-ffmpeg), `.gif`, `.npy` (raw uint8 [F, H, W, 3], lossless)."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import imageio.v2 as imageio
import numpy as np

FORMATS = ("mp4", "gif", "npy")


def save_video(frames: np.ndarray, path: str | Path, fps: int = 16) -> Path:
    """Save uint8 frames [F, H, W, 3]; the format follows the extension. Written atomically (temp + rename)."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"unsupported video format {path.suffix!r} for {path}; use one of {list(FORMATS)}")
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
    if path.is_dir():  # checked before the temp file exists: nothing is left behind
        raise ValueError(f"cannot write the video to {path}: it is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        _write(frames, tmp, fmt, fps)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write or rename leaves no temp file
    return path


def _write(frames: np.ndarray, tmp: Path, fmt: str, fps: int) -> None:
    if fmt == "npy":
        with open(tmp, "wb") as f:
            np.save(f, frames)
    elif fmt == "gif":
        imageio.mimsave(tmp, list(frames), duration=1000 / fps, loop=0)
    else:
        # yuv420p for players; macro_block_size 1 keeps small tiny-model frames (e.g. 64x64) unpadded.
        with imageio.get_writer(tmp, fps=fps, codec="libx264", quality=8, pixelformat="yuv420p",
                                macro_block_size=1, ffmpeg_log_level="error") as w:
            for frame in frames:
                w.append_data(frame)


def read_video(path: str | Path) -> np.ndarray:
    """Read a video written by `save_video` back to uint8 [F, H, W, 3]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    if path.suffix == ".npy":
        return np.load(path)
    return np.stack([np.asarray(f)[..., :3] for f in imageio.mimread(path, memtest=False)])


# Larger pictures are refused before decoding (a small file can expand to gigabytes: a "decompression bomb").
MAX_IMAGE_PIXELS = 8192 * 8192


def check_path_text(path: str | Path, what: str) -> None:
    """A NUL byte cannot be in a file name: refuse it by name instead of an OS error about something else."""
    if "\x00" in str(path):
        raise ValueError(f"{what} contains a NUL byte (\\x00), which no file name can hold: {str(path)!r}")


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode image bytes (PNG, JPEG, WebP, BMP, ... anything Pillow reads) to uint8 RGB [H, W, 3].

    `name` (a path, or a description of where the bytes came from) goes into every error. Not an image, a corrupt
    one, or one of more than MAX_IMAGE_PIXELS pixels -> ValueError naming the problem."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"{name}: the image is {img.width}x{img.height}, more than the "
                                 f"{MAX_IMAGE_PIXELS} pixels accepted")
            rgb = np.array(img.convert("RGB"), dtype=np.uint8)  # a writable copy
    except UnidentifiedImageError:
        raise ValueError(f"cannot read {name} as an image: not a picture format Pillow knows (PNG, JPEG, WebP, "
                         f"BMP, ...); {len(data)} bytes starting {data[:8]!r}") from None
    except (OSError, Image.DecompressionBombError, SyntaxError) as e:  # truncated or corrupt picture data
        raise ValueError(f"cannot read {name} as an image: {e}") from None
    return rgb


def read_image(path: str | Path) -> np.ndarray:
    """Read an RGB image file as uint8 [H, W, 3]; a clear error for a missing file, a folder or a non-image."""
    check_path_text(path, "image path")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"image path {path} is a directory, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    return decode_image(path.read_bytes(), str(path))


def check_writable_file(path: str | Path, what: str) -> Path:
    """Fail early, before any model work, if a result cannot be written to `path` (folders created on the way).

    A path that is a directory, a parent that is a file, or a folder without write permission -> ValueError.
    Writes and removes a probe file, which is what counts (permission bits do not bind root)."""
    check_path_text(path, what)
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory; give a file name such as {path / 'out.mp4'}")
    check_writable_dir(path.parent, f"the folder of {what}")
    return path


def check_writable_dir(folder: str | Path, what: str) -> Path:
    """Create `folder` if needed and prove that a file can be written in it; ValueError naming it otherwise."""
    check_path_text(folder, what)
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_check_"):
            pass
    except FileExistsError:
        raise ValueError(f"{what} {folder} is a file, not a folder") from None
    except OSError as e:
        raise ValueError(f"{what} {folder} is not writable: {e.strerror or e}") from None
    return folder
