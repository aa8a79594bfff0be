"""Checks of a training run's inputs that need no model: the run directory, the DiT weight files it will read,
the sample images, the shapes world's settings. `train.py` runs them before anything is built, and the trainer
again at build time."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from distill.config import TrainConfig
from distill.data import config_kind, image_fraction, shapes_world
from models.loading import DIT_WEIGHTS, find_dit_weights


def preflight(cfg: TrainConfig) -> None:
    """The input checks that need no model: run directory, DiT weight files, sample image files, shapes world."""
    check_run_dir(Path(cfg.run_dir))
    if cfg.data.source == "shapes":
        shapes_world(cfg.data)  # raises if the object size range does not fit the frame and the travel
    check_weight_files(cfg)
    check_conditioning(cfg)
    missing = [p for p in cfg.logging.sample_images if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"logging.sample_images: image not found: {', '.join(missing)}")


def check_conditioning(cfg: TrainConfig) -> None:
    """The teacher's kind of conditioning (its config.json) against the task and data.image_fraction: a TI2V-5B
    teacher has no ODE initialisation, and data.image_fraction applies to TI2V teachers only."""
    if cfg.task not in ("ode", "dmd"):
        return
    from distill.moe import is_expert_folder

    if is_expert_folder(cfg.model.path):
        kind = "t2v"  # a two-expert folder (distill/moe.py checks it); image_fraction is refused below
    else:
        kind = config_kind(cfg)
    image_fraction(cfg, kind)  # set for a non-TI2V teacher: an error naming it
    if kind == "ti2v" and cfg.task == "ode":
        raise ValueError(f"ODE initialisation from a Wan2.2 TI2V-5B teacher ({cfg.model.path}) is not built (its "
                         "trajectories would need the image-conditioned sampler): run task=dmd from the teacher "
                         "(docs/wan22_ti2v.md)")


def check_run_dir(run_dir: Path) -> None:
    """Fail before any model work if the run directory or its checkpoint folder cannot be folders."""
    for path in (run_dir, run_dir / "checkpoints"):
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path} exists and is a file; run_dir/checkpoints must be a folder: move the file "
                             f"or choose another run_dir")


def dit_weight_files(folder: Path, distill: bool) -> list[Path]:
    """The safetensors files a DiT of `folder` is read from (models.components.load_dit's choice)."""
    src = find_dit_weights(folder, distill, None)
    if src.kind != "base":
        return [Path(src.path)]
    index = folder / f"{DIT_WEIGHTS}.index.json"
    if index.is_file():
        return [folder / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / DIT_WEIGHTS
    return [single] if single.is_file() else sorted(folder.glob(DIT_WEIGHTS.replace(".safetensors", "*.safetensors")))


def check_weight_files(cfg: TrainConfig) -> None:
    """Open the header of every DiT weights file the run will read (teacher, generator init): a truncated or
    garbled file is an error naming it, before any model is built."""
    folders = [("model.path", cfg.model.path, False), ("model.generator_init", cfg.model.generator_init, True)]
    for key, folder, distill in folders:
        if folder is None:
            continue
        if not Path(folder).is_dir():
            hint = " (the tiny I2V teacher is made by: bash scripts/tiny_recipe.sh i2v_teacher)" \
                if Path(folder).name == "tiny-i2v-teacher" else ""
            raise FileNotFoundError(f"{key}: model folder not found: {folder}{hint}")
        for f in dit_weight_files(Path(folder), distill):
            if f.suffix != ".safetensors" or not f.is_file():
                continue
            try:
                with safe_open(str(f), "pt"):
                    pass
            except Exception as e:  # safetensors' own error types (incomplete metadata, header too large, ...)
                raise ValueError(f"{f} ({key}) is not a complete safetensors file: {e}; re-copy or re-export "
                                 f"it") from e
