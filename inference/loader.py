"""`load_pipeline(config, model_path=None)`: from an inference config to a ready `WanPipeline`."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from inference.config import InferConfig, load_config
from inference.lora import apply_lora_configs
from inference.pipeline import WanPipeline
from models.components import load_dit, load_model_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPU, fp32 on CPU (the tiny models are trained in fp32)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def resolve_model_path(cfg: InferConfig, model_path: str | Path | None) -> Path:
    """--model_path wins; else the config's model_path, relative to the repository root."""
    path = model_path or cfg.model_path
    if path is None:
        raise ValueError("no model folder: pass --model_path DIR or set model_path in the config")
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    return path


def load_pipeline(config: str | Path | InferConfig, model_path: str | Path | None = None,
                  **overrides) -> WanPipeline:
    """Load the networks named by `config` (a JSON path or an InferConfig) once; returns the pipeline."""
    cfg = load_config(config, **overrides) if not isinstance(config, InferConfig) else config
    if overrides and isinstance(config, InferConfig):
        cfg = cfg.replace(**{k: v for k, v in overrides.items() if v is not None})
    folder = resolve_model_path(cfg, model_path)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    dit_loader, dit_ckpt = load_dit, cfg.dit_original_ckpt
    if cfg.dit_quantized:  # <folder>/[distill_]<scheme>/ or dit_quantized_ckpt
        from inference.quantized import load_quantized_dit  # here: imports models with a loaded pipeline

        dit_loader = functools.partial(load_quantized_dit, scheme=cfg.dit_quant_scheme)
        dit_ckpt = cfg.dit_quantized_ckpt
    comps = load_model_folder(folder, cfg.task, distill=cfg.model_cls == "wan2.1_distill",
                              dit_ckpt=dit_ckpt, dtype=dtype, device=device,
                              text_device="cpu" if cfg.cpu_offload else None, dit_loader=dit_loader)
    apply_lora_configs(comps.dit, cfg.lora_configs, cfg.lora_mode, base_dir=REPO_ROOT)  # runtime: runtime_loras(dit)
    return WanPipeline(cfg, comps.dit, comps.vae, comps.text_encoder, comps.image_encoder, device, dtype)
