"""Load a Wan2.2 A14B two-expert folder (docs/wan22.md) into an `ExpertPair` and the shared components.

Two layouts:

- official (Wan-AI/Wan2.2-{T2V,I2V}-A14B): `high_noise_model/` and `low_noise_model/`, each a DiT folder
  (config.json + diffusion_pytorch_model*.safetensors, sharded with an index in the real ones); at the root the
  shared Wan2.1 VAE (`Wan2.1_VAE.pth`), umT5 (`models_t5_umt5-xxl-enc-bf16.pth`) and `google/umt5-xxl/`. No CLIP
  file: the I2V experts have no image branch. Students: `distill_models/<expert>/distill_model.safetensors`
  (LightX2V's path) or explicit files (`high_noise_original_ckpt` / `low_noise_original_ckpt`).
- diffusers (Wan-AI/Wan2.2-*-A14B-Diffusers): `transformer/` is the high-noise expert, `transformer_2/` the
  low-noise one, `boundary_ratio` in model_index.json; `vae/`, `text_encoder/`, `tokenizer/`; no image_encoder.

`load_moe_folder` returns the same `Components` as a one-DiT folder, with `dit` a `LoadedExperts`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.components import Components, build_dit, load_encoders
from models.convert import from_diffusers_state_dict
from models.loading import (
    DISTILL_DIR,
    DISTILL_NAMES,
    DIT_CONFIG,
    DIT_WEIGHTS,
    load_into,
    read_components,
    read_json,
    read_sharded,
    read_state_dict,
)
from models.moe import EXPERTS, ExpertPair

DIFFUSERS_EXPERTS = ("transformer", "transformer_2")  # diffusers: high-noise, low-noise (WanPipeline docs)
MODEL_INDEX = "model_index.json"
EXPERTS_FILE = "experts.json"  # {"boundary": ...} written next to the expert folders by this project's exports
MOE_LAYOUT = ("expected a Wan2.2 A14B folder: high_noise_model/ and low_noise_model/ (each config.json + "
              "diffusion_pytorch_model*.safetensors) with Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth and "
              "google/umt5-xxl/ at the root, or the diffusers layout (model_index.json, transformer/, "
              "transformer_2/, vae/, text_encoder/, tokenizer/)")


class LoadedExperts(ExpertPair):
    """An `ExpertPair` read from a folder; the attributes the pipeline, server and logs read off a DiT come from
    the experts (which share one config)."""

    @property
    def config(self) -> dict[str, Any]:
        return self.high_noise_model.config

    @property
    def text_len(self) -> int:
        return self.high_noise_model.text_len

    @property
    def model_type(self) -> str:
        return self.high_noise_model.model_type

    @property
    def clip_dim(self) -> int | None:
        return getattr(self.high_noise_model, "clip_dim", None) if hasattr(self.high_noise_model, "img_emb") else None

    @property
    def experts(self) -> tuple[nn.Module, nn.Module]:
        return self.high_noise_model, self.low_noise_model

    @property
    def weights_source(self) -> str:
        return " + ".join(str(getattr(e, "weights_source", "?")) for e in self.experts)


def moe_layout(folder: str | Path) -> str | None:
    """"official" (an expert folder at the root), "diffusers" (model_index.json with transformer_2 or a
    boundary_ratio) or None (a one-DiT folder)."""
    folder = Path(folder)
    if any((folder / name).is_dir() for name in EXPERTS):
        return "official"
    index = folder / MODEL_INDEX
    if index.is_file():
        data = read_json(index)
        if (data.get("transformer_2") or [None])[0] is not None or data.get("boundary_ratio") is not None:
            return "diffusers"
    return None


def expert_dirs(folder: str | Path) -> tuple[Path, Path]:
    """The (high, low) expert folders of a MoE folder; FileNotFoundError naming a missing one."""
    folder = Path(folder)
    layout = moe_layout(folder)
    names = DIFFUSERS_EXPERTS if layout == "diffusers" else EXPERTS
    dirs = tuple(folder / n for n in names)
    missing = [f"{n}/" for n, d in zip(names, dirs, strict=True) if not (d / DIT_CONFIG).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: the Wan2.2 expert folder(s) {missing} (with {DIT_CONFIG}) are missing; "
                                f"{MOE_LAYOUT}")
    return dirs  # type: ignore[return-value]


def diffusers_boundary(folder: str | Path) -> float | None:
    """model_index.json's boundary_ratio of a diffusers MoE folder (None for other folders)."""
    index = Path(folder) / MODEL_INDEX
    return read_json(index).get("boundary_ratio") if index.is_file() else None


def stored_boundary(folder: str | Path) -> float | None:
    """The boundary a folder records: `experts.json`'s "boundary" (this project's exported two-expert students,
    distill/moe.py), else a diffusers folder's boundary_ratio; None when neither (the official folders keep it in
    code)."""
    path = Path(folder) / EXPERTS_FILE
    if path.is_file():
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("boundary"), int | float):
            raise ValueError(f"{path} must be a JSON object with a numeric \"boundary\" (fraction of 1000)")
        return float(data["boundary"])
    return diffusers_boundary(folder)


def expert_config(expert_dir: Path, diffusers: bool) -> dict[str, Any]:
    """One expert's DiT config in the official field names. The Wan2.2 I2V experts have no CLIP branch: an i2v
    config that does not name clip_dim (the official config.json does not) gets clip_dim None, and a diffusers
    config without image_dim whose input is wider than its output (x + mask + image latent) is i2v."""
    raw = read_json(expert_dir / DIT_CONFIG)
    if diffusers:
        from models.diffusers_folder import dit_config_from_diffusers

        config = dit_config_from_diffusers(raw)
        if config["model_type"] == "t2v" and config["in_dim"] != config["out_dim"]:
            config.update(model_type="i2v", clip_dim=None)
        return config
    config = {k: v for k, v in raw.items() if not k.startswith("_")}
    if config.get("model_type") == "i2v":
        config.setdefault("clip_dim", None)
    return config


def check_expert_configs(folder: Path, configs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """Both experts must be the same architecture: ValueError naming every field that differs."""
    from inference.moe import expert_configs_differ

    diff = expert_configs_differ(*configs)
    if diff:
        raise ValueError(f"{folder}: the two experts' configs differ ({'; '.join(diff)}); Wan2.2 A14B's experts "
                         "share one architecture (high_noise_model vs low_noise_model)")


def find_expert_weights(folder: Path, expert: str, expert_dir: Path, distill: bool,
                        explicit: str | None) -> tuple[Path, str]:
    """(path, kind) of one expert's weights: explicit file > distill_models/<expert>/distill_model.* (distill) >
    the expert folder's base weights; kind is "explicit" | "distill" | "base"."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            key = expert.removesuffix("_model") + "_original_ckpt"  # high_noise_original_ckpt (LightX2V's key)
            raise FileNotFoundError(f"{expert} checkpoint not found: {path} (config key {key})")
        return path, "explicit"
    if distill:
        for name in DISTILL_NAMES:
            if (folder / DISTILL_DIR / expert / name).is_file():
                return folder / DISTILL_DIR / expert / name, "distill"
    return expert_dir, "base"


def load_expert(config: dict[str, Any], source: Path, kind: str, dtype: torch.dtype | None,
                diffusers: bool) -> nn.Module:
    """One expert: built on `meta` from `config`, its tensors (official or diffusers key names) assigned."""
    state = read_sharded(source, DIT_WEIGHTS, dtype) if kind == "base" else read_state_dict(source, dtype)
    if diffusers or any(k.startswith(("condition_embedder.", "proj_out.")) for k in state):
        state = from_diffusers_state_dict(state)
    model = load_into(build_dit(config, "meta"), state, f"DiT weights {source}")
    model.weights_source = str(source)
    return model


def load_moe_folder(folder: str | Path, task: str, boundary: float, distill: bool = False,
                    ckpts: tuple[str | None, str | None] = (None, None), dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> Components:
    """Both experts (a `LoadedExperts` with `boundary`), the VAE (fp32), umT5 and no image encoder.

    `ckpts`: explicit (high, low) expert files; `distill`: prefer distill_models/<expert>/ weights."""
    folder = Path(folder)
    layout = moe_layout(folder)
    if layout is None:
        raise FileNotFoundError(f"{folder} is not a Wan2.2 A14B folder: {MOE_LAYOUT}")
    dirs = expert_dirs(folder)
    diffusers = layout == "diffusers"
    configs = (expert_config(dirs[0], diffusers), expert_config(dirs[1], diffusers))
    check_expert_configs(folder, configs)
    if (task == "i2v") != (configs[0]["model_type"] == "i2v"):
        raise ValueError(f"task {task!r} does not match the experts in {folder} (model_type "
                         f"{configs[0]['model_type']!r})")
    experts = []
    for name, d, config, ckpt in zip(EXPERTS, dirs, configs, ckpts, strict=True):
        source, kind = find_expert_weights(folder, name, d, distill, ckpt)
        experts.append(load_expert(config, source, kind, dtype, diffusers and kind == "base").to(device).eval()
                       .requires_grad_(False))
    pair = LoadedExperts(experts[0], experts[1], boundary)
    text_len = pair.text_len
    if diffusers:
        from models.diffusers_folder import load_diffusers_text_encoder, load_diffusers_vae

        vae, text = load_diffusers_vae(folder), load_diffusers_text_encoder(folder, text_len, dtype)
        table = {"layout": {"type": "diffusers", "path": str(folder)}}
    else:
        vae, text, _ = load_encoders(folder, "t2v", text_len, dtype)  # "t2v": the experts take no CLIP features
        table = read_components(folder)
    return Components(pair, vae.to(device), text.to(device), None, table)
