"""Shared fixtures: random tiny T2V / I2V model folders (built once per session) and small inference configs.

The folders come from `models.components.make_tiny_model` (a random tiny DiT + the committed
checkpoints/tiny-components) with a shrunken DiT (SMALL_DIT) so that a whole generation of 5 frames at 32x32
takes milliseconds on a CPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from inference.config import InferConfig

# DiT overrides of the tiny specs: 2 blocks of width 64 (the codec / text / CLIP components stay as committed).
SMALL_DIT = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2)
# 5 frames at 32x32 -> latent [16, 2, 8, 8] -> 32 tokens after the (1, 2, 2) patch.
SMALL_SAMPLE = dict(target_video_length=5, target_height=32, target_width=32)
BASE_CONFIG = dict(task="t2v", model_cls="wan2.1", infer_steps=3, sample_solver="unipc", sample_shift=3.0,
                   enable_cfg=True, sample_guide_scale=5.0, sample_neg_prompt="blurry, static", fps=8, seed=0,
                   dtype="fp32", device="cpu", **SMALL_SAMPLE)


@pytest.fixture
def one_thread():
    """Run a test on one CPU thread (a training job shares the machine; also makes fp32 results repeatable)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _make_folder(tmp_path_factory, spec: str) -> Path:
    from models.components import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp(spec), spec, seed=0, **SMALL_DIT)


@pytest.fixture(scope="session")
def tiny_t2v_dir(tmp_path_factory) -> Path:
    """A random tiny T2V Wan-style folder (config.json, diffusion_pytorch_model.safetensors, components)."""
    return _make_folder(tmp_path_factory, "tiny-t2v")


@pytest.fixture(scope="session")
def tiny_i2v_dir(tmp_path_factory) -> Path:
    """A random tiny I2V folder (DiT in_dim = 2 z + 4, plus the tiny CLIP image encoder)."""
    return _make_folder(tmp_path_factory, "tiny-i2v")


@pytest.fixture(scope="session")
def make_config() -> Callable[..., InferConfig]:
    """make_config(task="t2v", **overrides) -> a small, fast InferConfig (3 UniPC steps, CFG on, 5x32x32)."""

    def make(task: str = "t2v", **overrides) -> InferConfig:
        return InferConfig(**{**BASE_CONFIG, "task": task, **overrides})

    return make


@pytest.fixture(scope="session")
def write_config() -> Callable[..., Path]:
    """write_config(path, **overrides) -> path of a LightX2V-style JSON file with BASE_CONFIG + overrides."""

    def write(path: Path, **overrides) -> Path:
        path = Path(path)
        path.write_text(json.dumps({**BASE_CONFIG, **overrides}, ensure_ascii=False, indent=2))
        return path

    return write


@pytest.fixture(scope="session")
def t2v_pipe(tiny_t2v_dir, make_config):
    """One loaded T2V pipeline for the session (tests patch its attributes with monkeypatch only)."""
    from inference.loader import load_pipeline

    return load_pipeline(make_config("t2v"), tiny_t2v_dir)


@pytest.fixture(scope="session")
def i2v_pipe(tiny_i2v_dir, make_config):
    """One loaded I2V pipeline for the session."""
    from inference.loader import load_pipeline

    return load_pipeline(make_config("i2v"), tiny_i2v_dir)
