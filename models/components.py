"""Build the four components of a Wan model from a folder (real or tiny) or from a registry spec.

`load_model_folder(path, ...)` reads config.json / components.json, builds every network on the `meta` device
and assigns the tensors read from disk (no double copy), then casts to the requested dtype and device.
`save_components(...)` writes the non-DiT components of a tiny folder (with its `components.json`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from models.clip import CLIPImageEncoder
from models.codec import PCACodec
from models.loading import (
    COMPONENTS,
    DIT_CONFIG,
    WAN_COMPONENTS,
    find_dit_weights,
    load_into,
    read_components,
    read_json,
    read_sharded,
    read_state_dict,
    write_dit_folder,
    write_safetensors,
)
from models.registry import get_spec
from models.t5 import ByteTokenizer, HFTokenizer, TextEncoder, UMT5Encoder
from models.wan_model import WanModel

if TYPE_CHECKING:
    from tokenizers import Tokenizer

TOKENIZER_DIR = "tokenizer"  # tiny folders: a tokenizer.json written by save_components


@dataclass
class Components:
    dit: WanModel | None
    vae: nn.Module
    text_encoder: TextEncoder
    image_encoder: CLIPImageEncoder | None
    table: dict[str, dict[str, Any]]  # the components.json entries they came from


def _on_meta(cls, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return cls(**kwargs)


def build_dit(config: dict[str, Any], device: str | torch.device = "cpu") -> WanModel:
    """A DiT from official config.json fields; on `meta` for loading, or initialised for training."""
    with torch.device(device):
        return WanModel.from_config(config)


def load_dit(folder: str | Path, distill: bool = False, explicit: str | None = None,
             dtype: torch.dtype | None = None) -> WanModel:
    """DiT of a Wan folder: config.json + base weights, distill_models/ weights, or an explicit checkpoint."""
    folder = Path(folder)
    config = read_json(folder / DIT_CONFIG)
    src = find_dit_weights(folder, distill, explicit)
    state = read_sharded(folder, dtype=dtype) if src.kind == "base" else read_state_dict(src.path, dtype)
    model = load_into(build_dit(config, "meta"), state, f"DiT weights {src.path}")
    model.weights_source = str(src.path)
    return model


def _build_vae(entry: dict[str, Any], folder: Path) -> nn.Module:
    kind, path = entry["type"], folder / entry["file"]
    if kind == "pca_codec":
        return PCACodec.load(path)
    if kind == "wan_vae":
        from models.vae import WanVAE  # imported here: tiny folders never need it

        return load_into(_on_meta(WanVAE, **entry.get("config", {})), read_state_dict(path, torch.float32),
                         f"VAE {path}")
    if kind == "wan22_vae":  # Wan2.2 TI2V-5B (Wan2.2_VAE.pth)
        from models.vae22 import Wan22VAE

        return load_into(_on_meta(Wan22VAE, **entry.get("config", {})), read_state_dict(path, torch.float32),
                         f"VAE {path}")
    raise ValueError(f"unknown vae type {kind!r} in {folder / COMPONENTS}; expected pca_codec, wan_vae or wan22_vae")


def _build_text_encoder(entry: dict, tok_entry: dict, folder: Path, text_len: int,
                        dtype: torch.dtype = torch.float32) -> TextEncoder:
    if entry["type"] != "umt5":
        raise ValueError(f"unknown text_encoder type {entry['type']!r}; expected umt5")
    model = _on_meta(UMT5Encoder, **entry.get("config", {}))
    path = folder / entry["file"]
    load_into(model, read_state_dict(path, dtype), f"text encoder {path}")
    model.eval().requires_grad_(False)
    if tok_entry["type"] == "byte":
        tokenizer = ByteTokenizer()
    elif tok_entry["type"] == "hf":
        tokenizer = HFTokenizer(folder / tok_entry["path"])
    else:
        raise ValueError(f"unknown tokenizer type {tok_entry['type']!r}; expected byte or hf")
    return TextEncoder(model, tokenizer, text_len=text_len)


def _build_image_encoder(entry: dict, folder: Path, dtype: torch.dtype = torch.float32) -> CLIPImageEncoder:
    if entry["type"] != "clip":
        raise ValueError(f"unknown image_encoder type {entry['type']!r}; expected clip")
    model = _on_meta(CLIPImageEncoder, **entry.get("config", {}))
    path = folder / entry["file"]
    state = {k: v for k, v in read_state_dict(path, dtype).items() if k.startswith("visual.")}
    load_into(model, state, f"image encoder {path}")
    return model.eval().requires_grad_(False)


def encoder_task(task: str, dit: nn.Module) -> str:
    """The task whose encoders `load_encoders` should build for `dit`: "t2v" (no image encoder) for an I2V DiT
    without a CLIP branch (the Wan2.2 I2V-A14B experts: y only), else `task`."""
    takes_clip = hasattr(dit, "img_emb") or (hasattr(dit, "experts") and dit.clip_dim is not None)  # a DiT | a pair
    return "t2v" if task == "i2v" and not takes_clip else task


def load_encoders(folder: str | Path, task: str, text_len: int, dtype: torch.dtype = torch.float32
                  ) -> tuple[nn.Module, TextEncoder, nn.Module | None]:
    """VAE (or codec) in fp32, text encoder and, for I2V, the CLIP image encoder (in `dtype`) of a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    table = read_components(folder)
    vae = _build_vae(table["vae"], folder).eval().requires_grad_(False)
    text = _build_text_encoder(table["text_encoder"], table["tokenizer"], folder, text_len, dtype)
    image = _build_image_encoder(table["image_encoder"], folder, dtype) if task == "i2v" else None
    return vae, text, image


def load_model_folder(folder: str | Path, task: str, distill: bool = False, dit_ckpt: str | None = None,
                      dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                      text_device: str | torch.device | None = None,
                      dit_loader: Callable[..., nn.Module] = load_dit) -> Components:
    """All components of a Wan-style folder: DiT, text and image encoders in `dtype` on `device` (the text
    encoder on `text_device` when given, e.g. "cpu" to offload umT5-XXL), the VAE in fp32. `dit_loader(folder,
    distill, dit_ckpt, dtype)` reads the DiT (e.g. inference.quantized.load_quantized_dit for quantized weights)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    dit = dit_loader(folder, distill, dit_ckpt, dtype).to(device).eval().requires_grad_(False)
    if (task == "i2v") != (dit.model_type in ("i2v", "flf2v")):
        raise ValueError(f"task {task!r} does not match the DiT in {folder} (model_type {dit.model_type!r})")
    vae, text, image = load_encoders(folder, task, dit.text_len, dtype)
    text = text.to(text_device or device)
    return Components(dit, vae.to(device), text, None if image is None else image.to(device),
                      read_components(folder))


def save_components(folder: str | Path, vae: nn.Module, text_model: UMT5Encoder, image_model: nn.Module | None,
                    tokenizer: str | Tokenizer = "byte") -> Path:
    """Write a tiny folder's non-DiT components + components.json (safetensors, fp32).

    `tokenizer`: "byte" (no file), or a `tokenizers.Tokenizer` written to `tokenizer/tokenizer.json` and read
    back through the umT5 tokenizer path (type "hf").
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table: dict[str, Any] = {}
    if isinstance(vae, PCACodec):
        vae.save(folder / "codec.safetensors")
        table["vae"] = {"type": "pca_codec", "file": "codec.safetensors"}
    else:
        write_safetensors(vae.state_dict(), folder / "vae.safetensors")
        table["vae"] = {"type": getattr(vae, "COMPONENT_TYPE", "wan_vae"), "file": "vae.safetensors",
                        "config": vae.config}
    write_safetensors(text_model.state_dict(), folder / "text_encoder.safetensors")
    table["text_encoder"] = {"type": "umt5", "file": "text_encoder.safetensors", "config": text_model.config}
    if isinstance(tokenizer, str):
        table["tokenizer"] = {"type": tokenizer}
    else:
        (folder / TOKENIZER_DIR).mkdir(exist_ok=True)
        tokenizer.save(str(folder / TOKENIZER_DIR / HFTokenizer.FILE))
        table["tokenizer"] = {"type": "hf", "path": TOKENIZER_DIR}
    if image_model is not None:
        write_safetensors(image_model.state_dict(), folder / "image_encoder.safetensors")
        table["image_encoder"] = {"type": "clip", "file": "image_encoder.safetensors", "config": image_model.config}
    (folder / COMPONENTS).write_text(json.dumps(table, indent=2) + "\n")
    return folder


def copy_components(src: str | Path, dst: str | Path) -> None:
    """Copy the non-DiT files of a folder: components.json and the files it names (tiny), or, in a real Wan
    folder, the VAE (Wan2.1 or Wan2.2), umT5 and CLIP files and the tokenizer folder that are present."""
    from models.vae22 import WAN22_VAE_FILE

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if not (src / COMPONENTS).is_file():
        for name in [e.get("file") or e["path"] for e in WAN_COMPONENTS.values()] + [WAN22_VAE_FILE]:
            if (src / name).is_dir():
                shutil.copytree(src / name, dst / name, dirs_exist_ok=True)
            elif (src / name).is_file():
                shutil.copy2(src / name, dst / name)
        return
    table = read_json(src / COMPONENTS)
    shutil.copy2(src / COMPONENTS, dst / COMPONENTS)
    for entry in table.values():
        if "file" in entry:
            shutil.copy2(src / entry["file"], dst / entry["file"])
        elif "path" in entry:
            shutil.copytree(src / entry["path"], dst / entry["path"], dirs_exist_ok=True)


TINY_COMPONENTS = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-components"


def make_tiny_model(out: str | Path, spec: str = "tiny-t2v", components: str | Path = TINY_COMPONENTS,
                    seed: int = 0, **dit_overrides: Any) -> Path:
    """Write a Wan-style folder with a random DiT of registry `spec` plus the shared tiny components.

    The head is initialised non-zero (Wan's init zeroes it, which would make every output constant). Used by
    tests, benchmarks and `python -m scripts.make_tiny_model`."""
    torch.manual_seed(seed)
    dit = build_dit({**get_spec(spec).dit, **dit_overrides})
    torch.nn.init.normal_(dit.head.head.weight, std=0.02)
    write_dit_folder(out, dit)
    copy_components(components, out)
    return Path(out)
