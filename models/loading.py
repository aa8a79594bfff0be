"""Load and save Wan-style model folders.

A real Wan2.1 folder (docs/lightx2v_formats.md, "Model folders"):

    config.json, diffusion_pytorch_model*.safetensors (+ .index.json when sharded), Wan2.1_VAE.pth,
    models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/ (tokenizer),
    I2V: models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth
    optional: distill_models/distill_model.safetensors (or .pt), a full distilled DiT

Tiny folders of this project look the same and add `components.json`, which names the tiny components (PCA
codec, byte tokenizer, small umT5/CLIP) and their configs. Weights are streamed: networks are built on the
`meta` device and the tensors read from safetensors (mmap) are assigned, so no second copy is materialised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from models.registry import WAN_FILES

DIT_CONFIG = "config.json"
COMPONENTS = "components.json"
DIT_WEIGHTS = "diffusion_pytorch_model.safetensors"
DISTILL_DIR = "distill_models"
DISTILL_NAMES = ("distill_model.safetensors", "distill_model.pt", "distill_model.pth")

# Component defaults of a real Wan folder (no components.json).
WAN_COMPONENTS: dict[str, dict[str, Any]] = {
    "vae": {"type": "wan_vae", "file": WAN_FILES["vae"], "config": {}},
    "text_encoder": {"type": "umt5", "file": WAN_FILES["text_encoder"], "config": {}},
    "tokenizer": {"type": "hf", "path": WAN_FILES["tokenizer"]},
    "image_encoder": {"type": "clip", "file": WAN_FILES["image_encoder"], "config": {}},
}
WAN_LAYOUT = ("expected a Wan model folder with config.json, diffusion_pytorch_model*.safetensors, "
              "Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth and google/umt5-xxl/ "
              "(I2V also models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth)")


class KeyMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not match the network."""


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path} ({WAN_LAYOUT})")
    return path


def read_state_dict(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read a `.safetensors` (mmap) or `.pt/.pth` (mmap, weights only: no pickled code) state dict."""
    path = _require(Path(path), "checkpoint file")
    if path.suffix == ".safetensors":
        out = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out
    sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in sd.items()}


def read_sharded(folder: Path, stem: str = DIT_WEIGHTS, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read `stem` or its shards listed in `stem.index.json` (the 14B layout)."""
    index = folder / f"{stem}.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(read_state_dict(folder / shard, dtype))
        return out
    single = folder / stem
    if single.is_file():
        return read_state_dict(single, dtype)
    shards = sorted(folder.glob(stem.replace(".safetensors", "*.safetensors")))
    if not shards:
        raise FileNotFoundError(f"no DiT weights in {folder}: expected {stem} or shards with {stem}.index.json")
    out = {}
    for shard in shards:
        out.update(read_state_dict(shard, dtype))
    return out


def check_keys(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise `KeyMismatchError` listing missing/unexpected keys and shape mismatches (first few + counts)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(f"{len(keys)} {label} key(s), e.g. {keys[:5]}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es), e.g. "
                     + ", ".join(f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}" for k in shapes[:3]))
    raise KeyMismatchError(f"{what}: checkpoint does not match the network: " + "; ".join(parts))


def load_into(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Strictly load `state` into `model` (which may live on `meta`) by assigning the tensors."""
    check_keys(model, state, what)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def read_json(path: Path) -> dict[str, Any]:
    _require(path, path.name)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def read_components(folder: Path) -> dict[str, dict[str, Any]]:
    """Component table: `components.json` of a tiny folder, or the real Wan file names."""
    path = folder / COMPONENTS
    return read_json(path) if path.is_file() else json.loads(json.dumps(WAN_COMPONENTS))


@dataclass
class DitSource:
    """Where the DiT weights come from, for logs."""

    path: Path
    kind: str  # base | distill | explicit


def find_dit_weights(folder: Path, distill: bool, explicit: str | None) -> DitSource:
    """explicit `dit_original_ckpt` > `distill_models/` (when distill) > the base DiT of the folder."""
    if explicit:
        return DitSource(_require(Path(explicit), "dit_original_ckpt"), "explicit")
    if distill:
        for name in DISTILL_NAMES:
            if (folder / DISTILL_DIR / name).is_file():
                return DitSource(folder / DISTILL_DIR / name, "distill")
    return DitSource(folder, "base")


def write_dit_folder(folder: str | Path, model: nn.Module, dtype: torch.dtype | None = None,
                     weights_name: str = DIT_WEIGHTS) -> Path:
    """Write `config.json` + `diffusion_pytorch_model.safetensors` (contiguous, optionally cast)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DIT_CONFIG).write_text(json.dumps(model.config, indent=2) + "\n")
    write_safetensors(model.state_dict(), folder / weights_name, dtype)
    return folder


def write_safetensors(state: dict[str, torch.Tensor], path: str | Path, dtype: torch.dtype | None = None,
                      metadata: dict[str, str] | None = None) -> Path:
    """Atomically write a safetensors file (temp file + rename), casting floating tensors to `dtype`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
               for k, v in state.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path
