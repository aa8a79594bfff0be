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
import math
import re
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
    """Component table: `components.json` of a tiny folder, or the real Wan file names with each present
    network's config read off its tensor shapes (so any width and depth of the same architecture loads)."""
    path = folder / COMPONENTS
    if path.is_file():
        return read_json(path)
    table = json.loads(json.dumps(WAN_COMPONENTS))
    infer_vae = wan_vae_config_from_state
    if not (folder / table["vae"]["file"]).is_file():  # Wan2.2 TI2V-5B folders hold Wan2.2_VAE.pth instead
        from models.vae22 import WAN22_VAE_FILE
        from models.vae22_keys import wan22_vae_config_from_state

        if (folder / WAN22_VAE_FILE).is_file():
            table["vae"] = {"type": "wan22_vae", "file": WAN22_VAE_FILE, "config": {}}
            infer_vae = wan22_vae_config_from_state
    for name, infer in (("vae", infer_vae), ("text_encoder", umt5_config_from_state),
                        ("image_encoder", clip_config_from_state)):
        file = folder / table[name]["file"]
        if file.is_file():
            table[name]["config"] = infer(read_state_dict(file))
    return table


# ------------------------------------------------------------------------------------------------------------
# Component configs from tensor shapes. The official .pth files carry no config; every width and depth is
# read off the tensors, so the real files and narrower/shallower files of the same architecture load alike.

def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    """Number of distinct integers captured by `pattern` (one group) over the keys."""
    return len({m[1] for k in state if (m := re.match(pattern, k))})


def _shape(state: dict[str, torch.Tensor], key: str, what: str) -> tuple[int, ...]:
    if key not in state:
        raise KeyMismatchError(f"{what}: key {key!r} not found; is this the right file?")
    return tuple(state[key].shape)


def umt5_config_from_state(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """`UMT5Encoder` arguments from an official umT5 state dict: vocabulary and width from the embedding,
    heads and buckets from the relative-position table, depth from the block count."""
    what = "umT5 encoder"
    vocab, dim = _shape(state, "token_embedding.weight", what)
    dim_attn = _shape(state, "blocks.0.attn.q.weight", what)[0]
    dim_ffn = _shape(state, "blocks.0.ffn.fc1.weight", what)[0]
    buckets, heads = _shape(state, "blocks.0.pos_embedding.embedding.weight", what)
    return dict(vocab_size=vocab, dim=dim, dim_attn=dim_attn, dim_ffn=dim_ffn, num_heads=heads,
                num_layers=_count(state, r"blocks\.(\d+)\."), num_buckets=buckets)


# open-clip ViT-H/14 splits its width into heads of 80 channels; head count is not stored in the file.
CLIP_HEAD_DIM = 80


def clip_config_from_state(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """`CLIPImageEncoder` arguments from the official open-clip file (`visual.*` keys; others are ignored by
    the loader): width and patch from the patch conv, image size from the position table, MLP ratio, head
    projection and depth from their tensors; heads = width / 80 as in ViT-H/14 (1280 -> 16)."""
    what = "CLIP image encoder"
    dim, _, patch, _ = _shape(state, "visual.patch_embedding.weight", what)
    tokens = _shape(state, "visual.pos_embedding", what)[1]
    side = math.isqrt(tokens - 1)
    if side * side != tokens - 1:
        raise KeyMismatchError(f"{what}: {tokens} position embeddings is not 1 + a square number of patches")
    if dim % CLIP_HEAD_DIM:
        raise KeyMismatchError(f"{what}: width {dim} is not a multiple of the ViT-H/14 head width {CLIP_HEAD_DIM}")
    hidden = _shape(state, "visual.transformer.0.mlp.0.weight", what)[0]
    return dict(image_size=side * patch, patch_size=patch, dim=dim, mlp_ratio=hidden / dim,
                out_dim=_shape(state, "visual.head", what)[1], num_heads=dim // CLIP_HEAD_DIM,
                num_layers=_count(state, r"visual\.transformer\.(\d+)\."))


def _vae_encoder_blocks(state: dict[str, torch.Tensor]) -> list[tuple[str, int]]:
    """The encoder's `downsamples` list in order: ("residual", out channels), ("attention", 0),
    ("downsample2d" | "downsample3d", 0)."""
    kinds: dict[int, tuple[str, int]] = {}
    for key, value in state.items():
        m = re.match(r"encoder\.downsamples\.(\d+)\.(\w+)", key)
        if not m:
            continue
        n, part = int(m[1]), m[2]
        if part == "residual" and key.endswith("residual.2.weight"):
            kinds[n] = ("residual", value.shape[0])
        elif part == "to_qkv":
            kinds[n] = ("attention", 0)
        elif part == "time_conv":
            kinds[n] = ("downsample3d", 0)
        elif part == "resample" and kinds.get(n, ("",))[0] != "downsample3d":
            kinds[n] = ("downsample2d", 0)
    return [kinds[n] for n in sorted(kinds)]


def wan_vae_config_from_state(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """`WanVAE` arguments from an official VAE state dict (`Wan2.1_VAE.pth`): base width, latent channels,
    per-level widths, residual blocks per level, attention levels and temporal downsampling, all read off the
    encoder's tensors (the decoder mirrors them)."""
    what = "Wan VAE"
    dim = _shape(state, "encoder.conv1.weight", what)[0]
    z_dim = _shape(state, "conv2.weight", what)[0]
    levels: list[list[tuple[str, int]]] = [[]]
    temporal: list[bool] = []
    for kind, width in _vae_encoder_blocks(state):
        if kind.startswith("downsample"):
            temporal.append(kind == "downsample3d")
            levels.append([])
        else:
            levels[-1].append((kind, width))
    widths = [next(w for k, w in level if k == "residual") for level in levels]
    res_blocks = {sum(k == "residual" for k, _ in level) for level in levels}
    if len(res_blocks) != 1 or any(w % dim for w in widths):
        raise KeyMismatchError(f"{what}: irregular encoder (residual blocks per level {sorted(res_blocks)}, "
                               f"widths {widths} for base width {dim})")
    attn = [1.0 / 2**i for i, level in enumerate(levels) if any(k == "attention" for k, _ in level)]
    return dict(dim=dim, z_dim=z_dim, dim_mult=[w // dim for w in widths], num_res_blocks=res_blocks.pop(),
                attn_scales=attn, temporal_downsample=temporal)


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
