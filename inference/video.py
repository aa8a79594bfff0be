"""Write and read videos: `.mp4` (H.264 via imageio-ffmpeg), `.gif`, `.npy` (raw uint8 [F, H, W, 3], lossless)."""

from __future__ import annotations

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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
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
    tmp.replace(path)
    return path


def read_video(path: str | Path) -> np.ndarray:
    """Read a video written by `save_video` back to uint8 [F, H, W, 3]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    if path.suffix == ".npy":
        return np.load(path)
    return np.stack([np.asarray(f)[..., :3] for f in imageio.mimread(path, memtest=False)])


def read_image(path: str | Path) -> np.ndarray:
    """Read an RGB image as uint8 [H, W, 3] with a clear error for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        img = np.asarray(imageio.imread(path))
    except Exception as e:  # imageio raises several types for non-images
        raise ValueError(f"cannot read {path} as an image: {e}") from e
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise ValueError(f"{path}: expected an RGB image, got array shape {img.shape}")
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))
