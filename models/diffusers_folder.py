"""Load a diffusers-format Wan2.1 folder (e.g. `Wan-AI/Wan2.1-T2V-1.3B-Diffusers`) into this project's networks.

The folder is read as files: `model_index.json`, `transformer/` (diffusers `WanTransformer3DModel`: config.json +
diffusion_pytorch_model*.safetensors), `vae/` (`AutoencoderKLWan`), `text_encoder/` (transformers
`UMT5EncoderModel`: config.json + model*.safetensors), `tokenizer/` (tokenizer.json), and for I2V
`image_encoder/` (transformers `CLIPVisionModel`). Configs are translated to the official field names and the
tensors renamed with `models.convert`; nothing imports diffusers or transformers. The result is the same
`Components` as an official folder gives, and the same networks: official and diffusers twins load to equal
weights. `scheduler/` and `image_processor/` are not read: sampling follows the inference config, and the CLIP
input follows Wan's own preprocessing (resize to the tower's size without cropping), as for official folders.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.clip import CLIPImageEncoder
from models.components import Components, build_dit, load_dit, load_model_folder
from models.convert import (
    clip_config_from_transformers,
    clip_from_transformers_state_dict,
    from_diffusers_state_dict,
    from_diffusers_vae_state_dict,
    umt5_config_from_transformers,
    umt5_from_transformers_state_dict,
)
from models.loading import (
    DIT_CONFIG,
    DIT_WEIGHTS,
    find_dit_weights,
    load_into,
    read_json,
    read_sharded,
    read_state_dict,
)
from models.t5 import HFTokenizer, TextEncoder, UMT5Encoder
from models.vae import WanVAE
from models.wan_model import WanModel

MODEL_INDEX = "model_index.json"
HF_WEIGHTS = "model.safetensors"
# diffusers' Wan pipelines encode prompts to 512 tokens (max_sequence_length); the DiT config does not say.
DIFFUSERS_TEXT_LEN = 512
_META = {"_class_name", "_diffusers_version", "_name_or_path"}
_DIT_FIELDS = {"patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
               "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps", "image_dim",
               "added_kv_proj_dim", "rope_max_seq_len", "pos_embed_seq_len"}
_VAE_FIELDS = {"base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales",
               "temperal_downsample", "dropout", "latents_mean", "latents_std", "is_residual", "in_channels",
               "out_channels", "patch_size", "scale_factor_temporal", "scale_factor_spatial"}


def is_diffusers_folder(folder: str | Path) -> bool:
    """True for a diffusers pipeline folder (has model_index.json and no official config.json)."""
    folder = Path(folder)
    return (folder / MODEL_INDEX).is_file() and not (folder / DIT_CONFIG).is_file()


def _unknown(config: dict[str, Any], known: set[str], what: str) -> None:
    extra = sorted(set(config) - known - _META)
    if extra:
        raise ValueError(f"{what}: unknown config field(s) {extra}; expected a Wan2.1 config ({sorted(known)})")


def dit_config_from_diffusers(config: dict[str, Any]) -> dict[str, Any]:
    """diffusers `WanTransformer3DModel` config -> official `config.json` fields (+ text_dim/clip_dim)."""
    what = "transformer/config.json"
    _unknown(config, _DIT_FIELDS, what)
    heads, dim = config["num_attention_heads"], config["num_attention_heads"] * config["attention_head_dim"]
    problems = []
    if config.get("rope_max_seq_len", 1024) != 1024:
        problems.append(f"rope_max_seq_len {config['rope_max_seq_len']} (Wan2.1: 1024)")
    if config.get("qk_norm", "rms_norm_across_heads") not in ("rms_norm_across_heads", None):
        problems.append(f"qk_norm {config['qk_norm']!r} (Wan2.1: 'rms_norm_across_heads')")
    image_dim = config.get("image_dim")
    if image_dim is not None and config.get("added_kv_proj_dim") != dim:
        problems.append(f"added_kv_proj_dim {config.get('added_kv_proj_dim')} (Wan2.1 I2V: the width {dim})")
    if problems:
        raise ValueError(f"{what}: not a Wan2.1 DiT: " + "; ".join(problems))
    model_type = "t2v" if image_dim is None else ("flf2v" if config.get("pos_embed_seq_len") else "i2v")
    out: dict[str, Any] = dict(
        model_type=model_type, patch_size=list(config.get("patch_size", (1, 2, 2))), text_len=DIFFUSERS_TEXT_LEN,
        in_dim=config["in_channels"], dim=dim, ffn_dim=config["ffn_dim"], freq_dim=config["freq_dim"],
        text_dim=config.get("text_dim", 4096), out_dim=config["out_channels"], num_heads=heads,
        num_layers=config["num_layers"], eps=config.get("eps", 1e-6), qk_norm=config.get("qk_norm") is not None,
        cross_attn_norm=config.get("cross_attn_norm", True))
    if image_dim is not None:
        out["clip_dim"] = image_dim
    return out


def vae_config_from_diffusers(config: dict[str, Any]) -> dict[str, Any]:
    """diffusers `AutoencoderKLWan` config -> `WanVAE` arguments; the Wan2.2 variants are refused."""
    what = "vae/config.json"
    _unknown(config, _VAE_FIELDS, what)
    problems = [f"{k} {config[k]!r}" for k, ok in (("is_residual", False), ("decoder_base_dim", None),
                                                  ("patch_size", None), ("in_channels", 3), ("out_channels", 3))
                if k in config and config[k] != ok]
    if problems:
        raise ValueError(f"{what}: not the Wan2.1 VAE (a Wan2.2 one?): " + ", ".join(problems))
    temporal = list(config.get("temperal_downsample", (False, True, True)))
    out = dict(dim=config.get("base_dim", 96), z_dim=config.get("z_dim", 16),
               dim_mult=list(config.get("dim_mult", (1, 2, 4, 4))), num_res_blocks=config.get("num_res_blocks", 2),
               attn_scales=list(config.get("attn_scales", ())), temporal_downsample=temporal,
               dropout=config.get("dropout", 0.0))
    for ours, theirs in (("latent_mean", "latents_mean"), ("latent_std", "latents_std")):
        if config.get(theirs) is not None:
            out[ours] = list(config[theirs])
    strides = {"scale_factor_spatial": 2 ** (len(out["dim_mult"]) - 1), "scale_factor_temporal": 2 ** sum(temporal)}
    for key, value in strides.items():
        if config.get(key) not in (None, value):
            raise ValueError(f"{what}: {key} {config[key]} does not match the architecture ({value})")
    return out


def _is_diffusers_dit_state(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("condition_embedder.", "proj_out.")) for k in state)


def load_diffusers_dit(folder: str | Path, distill: bool = False, explicit: str | None = None,
                       dtype: torch.dtype | None = None) -> WanModel:
    """The DiT of a diffusers folder (the `models.components.load_dit` interface): transformer/ weights, or
    `distill_models/` / an explicit checkpoint in official or diffusers key names."""
    folder = Path(folder)
    config = dit_config_from_diffusers(read_json(folder / "transformer" / DIT_CONFIG))
    src = find_dit_weights(folder, distill, explicit)
    if src.kind == "base":
        src.path = folder / "transformer"
        state = read_sharded(src.path, DIT_WEIGHTS, dtype)
    else:
        state = read_state_dict(src.path, dtype)
    if _is_diffusers_dit_state(state):
        state = from_diffusers_state_dict(state)
    model = load_into(build_dit(config, "meta"), state, f"DiT weights {src.path}")
    model.weights_source = str(src.path)
    return model


def _on_meta(cls, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return cls(**kwargs)


def load_diffusers_vae(folder: Path) -> WanVAE:
    """vae/ of a diffusers folder as a `WanVAE` (fp32)."""
    sub = folder / "vae"
    config = vae_config_from_diffusers(read_json(sub / DIT_CONFIG))
    state = from_diffusers_vae_state_dict(read_sharded(sub, DIT_WEIGHTS, torch.float32))
    return load_into(_on_meta(WanVAE, **config), state, f"VAE {sub}").eval().requires_grad_(False)


def load_diffusers_text_encoder(folder: Path, text_len: int, dtype: torch.dtype = torch.float32) -> TextEncoder:
    """text_encoder/ (transformers UMT5EncoderModel) + tokenizer/ as a `TextEncoder`."""
    sub = folder / "text_encoder"
    config = umt5_config_from_transformers(read_json(sub / DIT_CONFIG))
    state = umt5_from_transformers_state_dict(read_sharded(sub, HF_WEIGHTS, dtype))
    model = load_into(_on_meta(UMT5Encoder, **config), state, f"text encoder {sub}")
    return TextEncoder(model.eval().requires_grad_(False), HFTokenizer(folder / "tokenizer"), text_len=text_len)


def load_diffusers_image_encoder(folder: Path, dtype: torch.dtype = torch.float32) -> CLIPImageEncoder:
    """image_encoder/ (transformers CLIPVisionModel) as a `CLIPImageEncoder`."""
    sub = folder / "image_encoder"
    config = clip_config_from_transformers(read_json(sub / DIT_CONFIG))
    state = clip_from_transformers_state_dict(read_sharded(sub, HF_WEIGHTS, dtype), config["out_dim"])
    model = load_into(_on_meta(CLIPImageEncoder, **config), state, f"image encoder {sub}")
    return model.eval().requires_grad_(False)


def load_diffusers_folder(folder: str | Path, task: str, distill: bool = False, dit_ckpt: str | None = None,
                          dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                          text_device: str | torch.device | None = None) -> Components:
    """All components of a diffusers folder, as `models.components.load_model_folder` gives them for an
    official one (DiT and encoders in `dtype` on `device`, the text encoder on `text_device` when given, the
    VAE in fp32)."""
    folder = Path(folder)
    index = read_json(folder / MODEL_INDEX)
    needed = ["transformer", "vae", "text_encoder", "tokenizer"] + (["image_encoder"] if task == "i2v" else [])
    missing = [k for k in needed if not index.get(k) or index[k][0] is None or not (folder / k).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder}: a diffusers Wan2.1 {task.upper()} folder needs {needed}; "
                                f"missing {missing}")
    dit = load_diffusers_dit(folder, distill, dit_ckpt, dtype).to(device).eval().requires_grad_(False)
    if (task == "i2v") != (dit.model_type in ("i2v", "flf2v")):
        raise ValueError(f"task {task!r} does not match the DiT in {folder} (model_type {dit.model_type!r})")
    vae = load_diffusers_vae(folder).to(device)
    text = load_diffusers_text_encoder(folder, dit.text_len, dtype).to(text_device or device)
    image = load_diffusers_image_encoder(folder, dtype).to(device) if task == "i2v" else None
    return Components(dit, vae, text, image, {"layout": {"type": "diffusers", "path": str(folder)}})


def load_any_folder(folder: str | Path, task: str, distill: bool = False, dit_ckpt: str | None = None,
                    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    dit_loader: Callable[..., nn.Module] = load_dit) -> Components:
    """`load_model_folder` for official and tiny folders, `load_diffusers_folder` for diffusers ones.

    A diffusers folder takes the plain DiT loader only: quantized or lazily loaded DiT weights are written and
    read in the official layout (`python -m inference.quant` on an official folder)."""
    if not is_diffusers_folder(folder):
        return load_model_folder(folder, task, distill=distill, dit_ckpt=dit_ckpt, dtype=dtype, device=device,
                                 dit_loader=dit_loader)
    if dit_loader is not load_dit:
        raise ValueError(f"{folder} is a diffusers-format folder: quantized (dit_quantized) and lazily loaded "
                         "(lazy_load) DiT weights need the official Wan layout (config.json + "
                         "diffusion_pytorch_model*.safetensors at the top of the folder)")
    return load_diffusers_folder(folder, task, distill=distill, dit_ckpt=dit_ckpt, dtype=dtype, device=device)
