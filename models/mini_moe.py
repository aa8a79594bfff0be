"""Mini Wan2.2 A14B folders: two random experts of the Wan2.1 minis' DiT geometry (models/mini.py) with the shared
mini VAE, umT5 and tokenizer, in the official or the diffusers layout (docs/wan22.md, models/moe_loading.py).

- official: `high_noise_model/` and `low_noise_model/` (config.json + diffusion_pytorch_model.safetensors, or
  shards with an index), `Wan2.1_VAE.pth`, `models_t5_umt5-xxl-enc-bf16.pth`, `google/umt5-xxl/` at the root; no
  CLIP file. The I2V experts' config.json says model_type "i2v" and, like the real one, names no clip_dim.
- diffusers: written by diffusers' own `WanPipeline` / `WanImageToVideoPipeline` with `transformer` (high-noise),
  `transformer_2` (low-noise) and `boundary_ratio`; I2V without image_encoder / image_processor.

The same seed gives the same weights in both layouts; the low-noise expert is drawn after the high-noise one.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from models.loading import DIT_CONFIG, DIT_WEIGHTS, write_safetensors
from models.mini import MiniModel, _random, build_mini, write_sharded_safetensors, write_shared_files
from models.moe import EXPERTS
from models.wan_model import WanModel

DEFAULT_BOUNDARY = {"t2v": 0.875, "i2v": 0.900}  # the official A14B boundaries (models/registry.py)


def moe_dit_config(base: dict) -> dict:
    """A Wan2.1 mini DiT config as a Wan2.2 A14B expert: I2V without the CLIP branch (clip_dim None)."""
    config = dict(base)
    if config["model_type"] == "i2v":
        config["clip_dim"] = None
    return config


@torch.no_grad()
def build_mini_moe(task: str, seed: int = 0) -> tuple[MiniModel, WanModel]:
    """(the mini model with `dit` = the high-noise expert and no image encoder, the low-noise expert)."""
    model = build_mini(task, seed)
    g = torch.Generator().manual_seed(seed + 1_000_003)  # the experts' own stream, independent of the encoders
    config = moe_dit_config(model.dit.config)
    high, low = (_random(lambda: WanModel.from_config(config), g).eval().requires_grad_(False) for _ in range(2))
    return dataclasses.replace(model, dit=high, image_encoder=None), low


def _expert_config_json(dit: WanModel) -> dict:
    """config.json of an official expert folder: the real one names no clip_dim for the I2V experts."""
    config = {"_class_name": "WanModel", "_diffusers_version": "0.33.0", **dit.config}
    if config.get("clip_dim") is None:
        config.pop("clip_dim", None)
    return config


def write_official_moe(out: Path, model: MiniModel, low: WanModel, sharded: bool = False) -> Path:
    """The official Wan2.2 A14B layout (see the module docstring)."""
    write_shared_files(out, model)  # VAE, umT5, tokenizer (no CLIP: the experts take none)
    for name, dit in zip(EXPERTS, (model.dit, low), strict=True):
        sub = out / name
        sub.mkdir()
        (sub / DIT_CONFIG).write_text(json.dumps(_expert_config_json(dit), indent=2) + "\n")
        if sharded:
            write_sharded_safetensors(sub, dit.state_dict(), DIT_WEIGHTS, num_shards=3)
        else:
            write_safetensors(dit.state_dict(), sub / DIT_WEIGHTS)
    return out


def write_diffusers_moe(out: Path, model: MiniModel, low: WanModel, boundary: float, sharded: bool = False) -> Path:
    """model_index.json (with boundary_ratio) + transformer/ (high-noise) + transformer_2/ (low-noise) + shared
    components, through the diffusers pipeline's own `save_pretrained`."""
    import diffusers
    import transformers

    from models.mini import write_tokenizer_folder
    from models.mini_diffusers import text_encoder_of, transformer_of, vae_of

    write_tokenizer_folder(out / "tokenizer", model.tokenizer)
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  num_train_timesteps=1000, flow_shift=3.0)
    experts = [transformer_of(model), transformer_of(dataclasses.replace(model, dit=low))]
    parts = dict(tokenizer=transformers.AutoTokenizer.from_pretrained(str(out / "tokenizer")),
                 text_encoder=text_encoder_of(model), vae=vae_of(model), scheduler=scheduler,
                 transformer=experts[0], transformer_2=experts[1], boundary_ratio=boundary)
    if model.task == "i2v":
        pipe = diffusers.WanImageToVideoPipeline(image_encoder=None, image_processor=None, **parts)
    else:
        pipe = diffusers.WanPipeline(**parts)
    pipe.save_pretrained(str(out), safe_serialization=True)
    if sharded:
        for name, net in zip(("transformer", "transformer_2"), experts, strict=True):
            shutil.rmtree(out / name)
            net.save_pretrained(str(out / name), safe_serialization=True, max_shard_size="200KB")
    return out


def write_mini_moe(out: str | Path, task: str, layout: str = "official", sharded: bool = False, seed: int = 0,
                   boundary: float | None = None) -> Path:
    """Write a mini Wan2.2 A14B folder of `layout` for `task` to `out` (created; must be empty or absent).
    `boundary`: the diffusers layout's boundary_ratio (default: the task's official one)."""
    from models.mini import _check

    _check(task, layout)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    model, low = build_mini_moe(task, seed)
    out.mkdir(parents=True, exist_ok=True)
    if layout == "official":
        return write_official_moe(out, model, low, sharded)
    return write_diffusers_moe(out, model, low, boundary or DEFAULT_BOUNDARY[task], sharded)
