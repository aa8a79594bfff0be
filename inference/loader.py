"""`load_pipeline(config, model_path=None)`: from an inference config to a ready `WanPipeline`."""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import torch

from inference import moe
from inference.config import InferConfig, load_config
from inference.lora import apply_lora_configs
from inference.lora_keys import resolve_lora_path
from inference.pipeline import WanPipeline
from inference.schedule import SCHEDULE_FILE, read_schedule
from inference.ti2v_pipeline import (
    TI2V_MODEL_CLS,
    TI2V_MODEL_TYPE,
    TI2VPipeline,
    check_ti2v_request,
    folder_model_type,
)
from models.components import load_dit
from models.diffusers_folder import load_any_folder
from models.loading import DISTILL_DIR, DISTILL_NAMES, DIT_WEIGHTS, find_dit_weights

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


# ---- checks before any weight is read ---------------------------------------------------------------------------
def check_safetensors(path: str | Path, what: str) -> None:
    """A truncated or corrupt `.safetensors` file (an interrupted download) -> ValueError naming the file.

    Reads only the header: its JSON must parse and the tensors it lists must end exactly at the end of the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        raw = f.read(n) if 0 <= n <= size - 8 else b""
    try:
        header = json.loads(raw)
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError):
        raise ValueError(f"{what} {path} is not a readable safetensors file (truncated or corrupt header; "
                         f"{size} bytes): download or write it again") from None
    if 8 + n + end != size:
        raise ValueError(f"{what} {path} is truncated or corrupt: its header lists {8 + n + end} bytes, the file "
                         f"has {size}; download or write it again")


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors header ({} if none or unreadable: check_safetensors names that)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            return dict(json.loads(f.read(min(n, 100 * 2**20))).get("__metadata__") or {})
    except (OSError, ValueError, AttributeError):
        return {}


def merged_loras(path: Path) -> bool:
    """Whether the converter recorded LoRAs merged into this file (its `loras` metadata: a JSON list)."""
    try:
        return bool(json.loads(safetensors_metadata(path).get("loras") or "[]"))
    except ValueError:
        return False


def reads_distilled(cfg: InferConfig) -> bool:
    """Whether the loader reads `distill_models/`: model_cls wan2.1_distill, or wan2.2 (TI2V-5B, for which LightX2V
    has no distill class) with a student's denoising_step_list (this project's TI2V DMD export)."""
    return cfg.model_cls == "wan2.1_distill" or (cfg.model_cls == TI2V_MODEL_CLS and cfg.is_distill)


def dit_files(cfg: InferConfig, folder: Path) -> tuple[list[Path], bool]:
    """The DiT weight files the loader will read, and whether they are distilled (or explicitly chosen) weights."""
    distill = reads_distilled(cfg)
    if cfg.dit_quantized:
        from inference.quantized import find_quantized_weights

        found = find_quantized_weights(folder, cfg.dit_quant_scheme, distill, cfg.dit_quantized_ckpt)
        files = sorted(found.parent.glob("*.safetensors")) if found.name.endswith(".index.json") else [found]
        # the converter writes a base DiT with its (distill) LoRA merged into <scheme>/ and records the LoRA
        merged = bool(files) and merged_loras(files[0])
        chosen = cfg.dit_quantized_ckpt is not None or found.parent.name.startswith("distill_") or merged
        return files, chosen
    src = find_dit_weights(folder, distill, cfg.dit_original_ckpt)
    if src.kind == "base":
        return sorted(folder.glob(DIT_WEIGHTS.replace(".safetensors", "*.safetensors"))), False
    return [Path(src.path)], True


BASE_WEIGHTS_POLICIES = ("error", "warn")


class BaseWeightsWarning(UserWarning):
    """A distill schedule runs on base weights (allowed through the Python API for deliberate comparisons)."""


def check_distill_source(cfg: InferConfig, folder: Path, distilled: bool, on_base_weights: str = "error") -> None:
    """A few-step schedule on base weights with no LoRA makes blurry videos silently: refuse it (the command lines)
    or warn (`on_base_weights="warn"`, the Python API's default), naming the fix either way."""
    if on_base_weights not in BASE_WEIGHTS_POLICIES:
        raise ValueError(f"on_base_weights must be one of {list(BASE_WEIGHTS_POLICIES)}, got {on_base_weights!r}")
    if not cfg.is_distill or distilled or cfg.lora_configs:
        return
    has_distill = any((folder / DISTILL_DIR / name).is_file() for name in DISTILL_NAMES)
    if has_distill and not reads_distilled(cfg):
        fix = (f"{folder / DISTILL_DIR} holds distilled weights: pass --model_cls wan2.1_distill (or set "
               "\"model_cls\": \"wan2.1_distill\" in the config) to load them")
    else:
        fix = (f"put the distilled DiT in {folder / DISTILL_DIR / DISTILL_NAMES[0]} (with --model_cls wan2.1_distill), "
               "set dit_original_ckpt, or add the distill LoRA (lora_configs / --lora_path); for a few-step run of "
               "the base model on purpose, use infer_steps without a denoising_step_list")
    msg = (f"the config's denoising_step_list {cfg.denoising_step_list} is a distilled model's schedule, but only the "
           f"base (teacher) weights of {folder} would load: the video would be blurry. {fix}")
    if on_base_weights == "error":
        raise ValueError(msg)
    warnings.warn(msg, BaseWeightsWarning, stacklevel=4)  # the caller of load_pipeline


def check_weight_files(cfg: InferConfig, folder: Path, on_base_weights: str = "error") -> None:
    """Everything about the weight files that can be known without reading them: distilled weights for a distill
    schedule, and no truncated safetensors file (DiT and LoRAs), each named."""
    moe.check_moe_request(cfg, folder)
    check_ti2v_request(cfg, folder)  # model_cls wan2.2 <-> a TI2V-5B folder, and its sizes
    if cfg.is_moe:
        files = _moe_files(cfg, folder, on_base_weights)
    else:
        files, distilled = dit_files(cfg, folder)
        check_distill_source(cfg, folder, distilled, on_base_weights)
    for f in files:
        if f.suffix == ".safetensors" and f.is_file():
            check_safetensors(f, "DiT weights")
    for spec in cfg.lora_configs:
        lora = resolve_lora_path(spec.path, REPO_ROOT)
        if lora.suffix == ".safetensors" and lora.is_file():
            check_safetensors(lora, "LoRA file")


def _moe_files(cfg: InferConfig, folder: Path, on_base_weights: str) -> list[Path]:
    """Both experts' weight files; a student schedule on an expert's base weights with no LoRA for it is refused
    or warned about, as for one DiT (check_distill_source)."""
    if on_base_weights not in BASE_WEIGHTS_POLICIES:
        raise ValueError(f"on_base_weights must be one of {list(BASE_WEIGHTS_POLICIES)}, got {on_base_weights!r}")
    base = moe.base_weight_experts(cfg, folder)
    if base:
        msg = moe.moe_base_weights_message(cfg, folder, base)
        if on_base_weights == "error":
            raise ValueError(msg)
        warnings.warn(msg, BaseWeightsWarning, stacklevel=4)
    files = []
    for _, path, kind in moe.moe_weight_sources(cfg, folder):
        files += sorted(Path(path).glob("*.safetensors")) if kind == "base" else [Path(path)]
    return files


def with_folder_schedule(cfg: InferConfig, folder: Path) -> InferConfig:
    """An exported student folder carries the schedule it was trained with (`schedule.json`): a config without a
    schedule adopts it (no hand-written config needed), a config whose schedule differs is an error naming both."""
    trained = read_schedule(folder)
    if trained is None:
        if cfg.model_cls == "wan2.1_distill" and not cfg.is_distill:
            raise ValueError(f"model_cls 'wan2.1_distill' needs the student's schedule: {folder} has no "
                             f"{SCHEDULE_FILE}, so set denoising_step_list (e.g. [1000, 750, 500, 250]) and "
                             f"sample_shift in the config")
        return cfg
    if not cfg.is_distill:
        student = "wan2.2_moe_distill" if cfg.is_moe else \
            TI2V_MODEL_CLS if folder_model_type(folder) == TI2V_MODEL_TYPE else "wan2.1_distill"
        return cfg.replace(model_cls=student, denoising_step_list=list(trained.denoising_step_list),
                           sample_shift=trained.shift, distill_update=trained.update, enable_cfg=False)
    if not cfg.schedule().same_timesteps(trained):
        raise ValueError(f"the config's schedule ({cfg.schedule().describe()}) differs from the one the student in "
                         f"{folder} was trained with ({trained.describe()}, {folder / SCHEDULE_FILE}): a student "
                         f"only works at its own timesteps; remove denoising_step_list / sample_shift from the "
                         f"config to use the folder's, or set them to match")
    return cfg


def check_before_loading(cfg: InferConfig, model_path: str | Path | None = None) -> Path:
    """What the command lines check before any network loads: the model folder exists, its schedule agrees with
    the config's, no truncated weight file, and a distill schedule has distilled weights or a LoRA (an error
    here, not a warning). Returns the folder."""
    folder = resolve_model_path(cfg, model_path)
    cfg = with_folder_schedule(cfg, folder)
    check_weight_files(cfg, folder, on_base_weights="error")
    return folder


def config_for_folder(folder: str | Path, **overrides) -> InferConfig:
    """An inference config for an exported model folder alone: the task from its DiT config.json, the schedule
    from its schedule.json (`with_folder_schedule`), every other key a default or an override."""
    from models.moe_loading import expert_dirs, moe_layout

    moe_cls = {}
    cfg_file = Path(folder) / "config.json"
    if moe_layout(folder) is not None:  # Wan2.2 A14B: the task from the high-noise expert's config
        cfg_file = expert_dirs(folder)[0] / "config.json"
        moe_cls = {"model_cls": "wan2.2_moe"}
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a model folder (pass an inference config)")
    task = json.loads(cfg_file.read_text()).get("model_type", "t2v")
    if task == "ti2v":  # Wan2.2 TI2V-5B: LightX2V's model_cls wan2.2, text-only unless an image is given
        task, moe_cls = "t2v", {"model_cls": "wan2.2"}
    return InferConfig(**{"task": task, "model_path": str(folder), **moe_cls, **overrides})


def load_pipeline(config: str | Path | InferConfig | None, model_path: str | Path | None = None,
                  on_base_weights: str = "warn", **overrides) -> WanPipeline:
    """Load the networks named by `config` (a JSON path or an InferConfig) once; returns the pipeline.

    `config=None` with `model_path` an exported student folder needs no config file: the folder's task and
    schedule are used (`config_for_folder`), other keys come from the defaults and `overrides`.

    `on_base_weights`: a distill schedule with only base weights and no LoRA (blurry videos) is an "error" (what
    infer.py, the server and the web UI ask for) or a BaseWeightsWarning ("warn": deliberate comparisons)."""
    if config is None:
        if model_path is None:
            raise ValueError("load_pipeline needs a config, or model_path (an exported model folder) to read one from")
        cfg = config_for_folder(resolve_model_path(InferConfig(), model_path), **overrides)
    elif isinstance(config, InferConfig):
        cfg = config.replace(**{k: v for k, v in overrides.items() if v is not None}) if overrides else config
    else:
        cfg = load_config(config, **overrides)
    folder = resolve_model_path(cfg, model_path)
    cfg = with_folder_schedule(cfg, folder)
    check_weight_files(cfg, folder, on_base_weights)
    if cfg.use_tiling_vae:
        check_vae_tiling(folder, cfg.vae_tile_size, cfg.vae_tile_overlap)  # the tile rule, before any weight is read
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    dit_loader, dit_ckpt = load_dit, cfg.dit_original_ckpt
    if cfg.dit_quantized:  # <folder>/[distill_]<scheme>/ or dit_quantized_ckpt
        from inference.quantized import load_quantized_dit  # here: imports models with a loaded pipeline

        dit_loader = functools.partial(load_quantized_dit, scheme=cfg.dit_quant_scheme)
        dit_ckpt = cfg.dit_quantized_ckpt
    if cfg.lazy_load:  # blocks stay in the safetensors files until the offloader reads them
        from inference.offload import load_dit_lazy

        dit_loader = functools.partial(load_dit_lazy, scheme=cfg.dit_quant_scheme if cfg.dit_quantized else None)
    offloads = _component_offloads(cfg)
    home = "cpu" if offloads or cfg.cpu_offload else device  # offloaded parts load on the host, the rest moves below
    if cfg.is_moe:  # Wan2.2 A14B: two experts (inference/moe.py)
        comps = moe.load_moe(cfg, folder, dtype, home, REPO_ROOT)
        if cfg.use_tiling_vae:
            enable_vae_tiling(comps.vae, cfg.vae_tile_size, cfg.vae_tile_overlap)
        offloaded = moe.place_experts(cfg, comps.dit, device)
        stages = _place_components(cfg, comps, device, offloads, dit_placed=True)
        return WanPipeline(cfg, comps.dit, comps.vae, comps.text_encoder, comps.image_encoder, device, dtype,
                           offload=stages, experts_offloaded=offloaded)
    ti2v = check_ti2v_request(cfg, folder)  # TI2V-5B: no CLIP to load, TI2VPipeline (inference/ti2v_pipeline.py)
    task = "t2v" if ti2v else cfg.task
    comps = load_any_folder(folder, task, distill=reads_distilled(cfg),  # official/diffusers
                            dit_ckpt=dit_ckpt, dtype=dtype, device=home, dit_loader=dit_loader)
    apply_lora_configs(comps.dit, cfg.lora_configs, cfg.lora_mode, base_dir=REPO_ROOT)  # runtime: runtime_loras(dit)
    if cfg.text_len is not None and cfg.text_len != comps.dit.text_len:  # accepted, not honoured: say so
        warnings.warn(f"text_len {cfg.text_len} in the inference config is not used: the DiT's config.json decides "
                      f"({comps.dit.text_len} tokens)", stacklevel=2)
    if cfg.use_tiling_vae:
        enable_vae_tiling(comps.vae, cfg.vae_tile_size, cfg.vae_tile_overlap)
    stages = _place_components(cfg, comps, device, offloads)
    pipeline = TI2VPipeline if ti2v else WanPipeline
    return pipeline(cfg, comps.dit, comps.vae, comps.text_encoder, comps.image_encoder, device, dtype,
                    offload=stages)


# ---- offload (inference/offload.py) ----------------------------------------------------------------------
def _component_offloads(cfg: InferConfig) -> list[str]:
    """Pipeline stages whose component rests on the host: text_encoder, image_encoder, vae."""
    flags = {"text_encoder": cfg.t5_cpu_offload, "image_encoder": cfg.clip_cpu_offload, "vae": cfg.vae_cpu_offload}
    return [name for name, on in flags.items() if on]


def _place_components(cfg: InferConfig, comps, device: torch.device, offloads: list[str], dit_placed: bool = False):
    """DiT: block offload (cpu_offload) or the device (unless `dit_placed`: the MoE experts); other components:
    the device or their stage only."""
    from inference.offload import ComponentOffload, enable_offload

    if not dit_placed and cfg.cpu_offload:
        enable_offload(comps.dit, device, cfg.offload_granularity, getattr(comps.dit, "lazy_files", None))
    elif not dit_placed:
        comps.dit.to(device)
    modules = {"text_encoder": comps.text_encoder.model, "vae": comps.vae, "image_encoder": comps.image_encoder}
    for name, module in modules.items():
        if module is not None and name not in offloads:
            module.to(device)
    resting = {n: modules[n] for n in offloads if modules[n] is not None}
    return ComponentOffload(device, resting) if resting else None


def check_vae_tiling(folder: Path, tile: int, overlap: int) -> None:
    """The tiling rules checked on the folder's VAE built on `meta` from its component table (official and tiny
    folders; a diffusers folder is checked once its VAE is loaded)."""
    from models.diffusers_folder import is_diffusers_folder
    from models.loading import read_components

    if is_diffusers_folder(folder):
        return
    entry = read_components(folder)["vae"]
    if entry["type"] not in ("wan_vae", "wan22_vae"):
        raise ValueError(f"use_tiling_vae needs the Wan VAE; {folder} has a {entry['type']} (the tiny PCA codec "
                         "works on independent 4x4x4 blocks and needs no tiling)")
    from models.vae import WanVAE
    from models.vae22 import Wan22VAE

    with torch.device("meta"):
        cls = Wan22VAE if entry["type"] == "wan22_vae" else WanVAE
        cls(**entry.get("config", {})).enable_tiling(tile, overlap)


def enable_vae_tiling(vae, tile: int, overlap: int) -> None:
    """Spatial tiling of the Wan VAE (use_tiling_vae); a codec without it is an error naming what supports it."""
    if not hasattr(vae, "enable_tiling"):
        raise ValueError(f"use_tiling_vae needs the Wan VAE; this folder's {type(vae).__name__} has no tiling "
                         "(the tiny PCA codec works on independent 4x4x4 blocks and needs none)")
    vae.enable_tiling(tile, overlap)
