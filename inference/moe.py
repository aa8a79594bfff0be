"""Sampling with Wan2.2 A14B's two experts (docs/wan22.md): which expert runs each step, its guidance scale, and
the offload option that keeps only the active expert on the device.

The inference config follows LightX2V's keys:

- `model_cls`: "wan2.2_moe" (teacher) or "wan2.2_moe_distill" (few-step student).
- `boundary`: a fraction of the 1000 training timesteps; a step whose timestep t >= boundary * 1000 runs
  `high_noise_model`, a lower one `low_noise_model` (None: the task's default, T2V 0.875, I2V 0.9).
- `boundary_step_index` (students): steps [0, index) run `high_noise_model`, the rest `low_noise_model`, as
  LightX2V's distill runner does (its configs: 2 for [1000, 750, 500, 250]). None: by `boundary` on the shifted
  timesteps, which gives the same split for that list at shift 5 ([1000, 937.5] >= 900 > [833.3, 625]).
- `sample_guide_scale`: one number for both experts or the pair [w_high_noise, w_low_noise] (LightX2V's order:
  index 0 while the high-noise expert runs; the official Wan2.2 configs write (low, high)).
- `lora_configs[].name`: the expert a LoRA applies to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from inference.config import InferConfig

MOE_MODEL_CLASSES = ("wan2.2_moe", "wan2.2_moe_distill")
EXPERT_NAMES = ("high_noise_model", "low_noise_model")  # LightX2V's names: lora_configs[].name, plan indices 0/1
HIGH, LOW = 0, 1
# The official boundaries (Wan2.2 wan/configs/wan_{t2v,i2v}_A14B.py), also in models/registry.py's specs.
DEFAULT_BOUNDARY = {"t2v": 0.875, "i2v": 0.900}


def check_moe_keys(cfg: InferConfig) -> None:
    """The rules of sample_guide_scale (one number, or the MoE pair) and of the MoE keys; ValueError naming them."""
    w = cfg.sample_guide_scale
    if isinstance(w, list) and (not cfg.is_moe or len(w) != 2):
        raise ValueError(f"sample_guide_scale as a list is Wan2.2 MoE's pair [high_noise, low_noise] (two numbers, "
                         f"model_cls one of {list(MOE_MODEL_CLASSES)}); got {w} with model_cls {cfg.model_cls!r}: "
                         "use one number")
    if any(v < 0 for v in cfg.guide_scales()):
        raise ValueError(f"sample_guide_scale must be >= 0, got {w}")
    moe_keys = [k for k in ("boundary", "boundary_step_index", "high_noise_original_ckpt", "low_noise_original_ckpt")
                if getattr(cfg, k) is not None]
    if moe_keys and not cfg.is_moe:
        raise ValueError(f"{moe_keys} are Wan2.2 MoE keys: set model_cls to one of {list(MOE_MODEL_CLASSES)} "
                         f"(got {cfg.model_cls!r})")
    if cfg.boundary is not None and not 0.0 < cfg.boundary < 1.0:
        raise ValueError(f"boundary is a fraction of the 1000 training timesteps in (0, 1) (Wan2.2 T2V-A14B 0.875, "
                         f"I2V-A14B 0.9), got {cfg.boundary}")
    if cfg.model_cls == "wan2.2_moe_distill" and not cfg.is_distill:
        raise ValueError("model_cls 'wan2.2_moe_distill' is a few-step student: set denoising_step_list (e.g. "
                         "[1000, 750, 500, 250]) and sample_shift")
    if cfg.model_cls == "wan2.2_moe" and cfg.is_distill:
        raise ValueError("a denoising_step_list is a distilled student's schedule: use model_cls "
                         "'wan2.2_moe_distill' (distilled experts or distill LoRAs), or infer_steps for the teacher")
    if cfg.boundary_step_index is not None:
        if cfg.model_cls != "wan2.2_moe_distill":
            raise ValueError("boundary_step_index splits a student's denoising_step_list between the experts: it "
                             "needs model_cls 'wan2.2_moe_distill' (a teacher uses boundary)")
        n = len(cfg.denoising_step_list)
        if not 0 <= cfg.boundary_step_index <= n:
            raise ValueError(f"boundary_step_index must be in [0, {n}] (steps before it run high_noise_model), got "
                             f"{cfg.boundary_step_index}")
    no_clip = cfg.is_moe or cfg.model_cls == "wan2.2"  # the A14B experts and TI2V-5B (inference/ti2v_pipeline.py)
    if cfg.use_image_encoder is not None and cfg.use_image_encoder == no_clip:
        raise ValueError(f"use_image_encoder {str(cfg.use_image_encoder).lower()} does not fit model_cls "
                         f"{cfg.model_cls!r}: the Wan2.2 A14B experts and TI2V-5B have no CLIP branch (false), a "
                         "Wan2.1 I2V DiT "
                         "needs its CLIP features (true, or leave the key out)")
    for i, spec in enumerate(cfg.lora_configs):
        if cfg.is_moe and spec.name not in EXPERT_NAMES:
            raise ValueError(f"lora_configs[{i}].name must name the expert it applies to, one of "
                             f"{list(EXPERT_NAMES)} (Wan2.2 MoE), got {spec.name!r}")
        if not cfg.is_moe and spec.name is not None:
            raise ValueError(f"lora_configs[{i}].name {spec.name!r} names a Wan2.2 expert, but model_cls "
                             f"{cfg.model_cls!r} has one DiT: remove the name")


def boundary_of(cfg: InferConfig) -> float:
    """The config's boundary, or the official one of its task."""
    return cfg.boundary if cfg.boundary is not None else DEFAULT_BOUNDARY[cfg.task]


def expert_plan(timesteps: Sequence[float] | torch.Tensor, boundary: float,
                boundary_step_index: int | None = None) -> list[int]:
    """The expert of every sampler step: HIGH (0) or LOW (1). timesteps: [n] on the 0-1000 scale.

    By timestep (t >= boundary * 1000 -> HIGH, the official rule and ExpertPair.expert_for's), or, when
    `boundary_step_index` is given, by position (steps before it HIGH), LightX2V's rule for students."""
    ts = [float(t) for t in (timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)]
    if boundary_step_index is not None:
        return [HIGH if i < boundary_step_index else LOW for i in range(len(ts))]
    return [HIGH if t >= boundary * 1000.0 else LOW for t in ts]


def step_scales(plan: Sequence[int], scales: tuple[float, float]) -> list[float]:
    """The guidance scale of each step: scales[HIGH] where the high-noise expert runs, scales[LOW] elsewhere."""
    return [scales[e] for e in plan]


class ExpertSwitch:
    """Calls the planned expert of each step and, with offloading, keeps only that expert on the device.

    `experts`: (high_noise_model, low_noise_model). `offloaded`: each expert carries a BlockOffloader
    (inference/offload.py; cpu_offload with any granularity): when the plan crosses the boundary the expert
    that stops is released (its units back to the host) before the next one runs, so at most one expert's
    weights are on the device. Without offloading both experts stay resident. `calls` counts calls per expert."""

    def __init__(self, experts: Sequence[nn.Module], offloaded: bool = False) -> None:
        self.experts = tuple(experts)
        self.offloaded = offloaded
        self.active: int | None = None
        self.calls = [0, 0]

    def select(self, index: int) -> nn.Module:
        """The expert `index` (HIGH | LOW), after releasing the other one from the device when offloading."""
        if self.offloaded and self.active is not None and self.active != index:
            self.release(self.active)
        self.active = index
        self.calls[index] += 1
        return self.experts[index]

    def release(self, index: int | None = None) -> None:
        """Release one expert's (or, None, both experts') offloaded weights from the device."""
        from inference.offload import offloader

        for i in (range(2) if index is None else (index,)):
            off = offloader(self.experts[i])
            if off is not None:
                off.release()
        if index is None or index == self.active:
            self.active = None


def describe_plan(plan: Sequence[int]) -> str:
    """'2 steps high_noise_model, 2 steps low_noise_model' (logs, errors)."""
    return ", ".join(f"{plan.count(e)} steps {EXPERT_NAMES[e]}" for e in (HIGH, LOW))


def expert_configs_differ(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Config fields whose values differ between the two experts (ignoring the writer's metadata)."""
    keys = sorted((set(a) | set(b)) - {"_class_name", "_diffusers_version", "_name_or_path"})
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


# ---- loading (called by inference/loader.py) -------------------------------------------------------------------
def check_moe_request(cfg: InferConfig, folder) -> None:
    """The folder and the config agree on being a Wan2.2 MoE, and the config asks for nothing the MoE path lacks
    (quantized or lazily loaded experts); ValueError / FileNotFoundError naming the fix."""
    from models.moe_loading import expert_dirs, moe_layout

    layout = moe_layout(folder)
    if layout is not None and not cfg.is_moe:
        raise ValueError(f"{folder} is a Wan2.2 A14B two-expert folder ({layout} layout): set model_cls to "
                         f"'wan2.2_moe' (teacher) or 'wan2.2_moe_distill' (4-step student), got {cfg.model_cls!r}")
    if not cfg.is_moe:
        return
    expert_dirs(folder)  # both experts present (names the missing one), also for a one-DiT folder
    unsupported = [k for k in ("dit_quantized", "lazy_load") if getattr(cfg, k)]
    if unsupported:
        raise ValueError(f"{unsupported} are not supported for the Wan2.2 MoE model classes yet: load the experts "
                         "unquantized (cpu_offload keeps only the active expert on the device)")


def moe_weight_sources(cfg: InferConfig, folder) -> list[tuple[str, object, str]]:
    """(expert, path, kind) of both experts' weights as load_moe_folder will read them (kind base | distill |
    explicit), without reading any tensor."""
    from models.moe_loading import expert_dirs, find_expert_weights

    distill = cfg.model_cls == "wan2.2_moe_distill"
    ckpts = (cfg.high_noise_original_ckpt, cfg.low_noise_original_ckpt)
    return [(name, *find_expert_weights(folder, name, d, distill, ckpt))
            for name, d, ckpt in zip(EXPERT_NAMES, expert_dirs(folder), ckpts, strict=True)]


def base_weight_experts(cfg: InferConfig, folder) -> list[str]:
    """The experts a student config would run on base weights with no distill LoRA (blurry videos)."""
    if not cfg.is_distill:
        return []
    with_lora = {spec.name for spec in cfg.lora_configs}
    return [name for name, _, kind in moe_weight_sources(cfg, folder) if kind == "base" and name not in with_lora]


def moe_base_weights_message(cfg: InferConfig, folder, experts: list[str]) -> str:
    return (f"the config's denoising_step_list {cfg.denoising_step_list} is a distilled student's schedule, but "
            f"{experts} would load base (teacher) weights with no distill LoRA: the video would be blurry. Put the "
            f"distilled experts in {folder}/distill_models/<expert>/distill_model.safetensors (model_cls "
            "'wan2.2_moe_distill'), set high_noise_original_ckpt / low_noise_original_ckpt, or add one LoRA per "
            "expert (lora_configs with name 'high_noise_model' / 'low_noise_model')")


def load_moe(cfg: InferConfig, folder, dtype: torch.dtype, home, base_dir) -> Any:
    """`Components` of a MoE folder with a boundary from the config, else the folder (experts.json, a diffusers
    boundary_ratio), else the task's official one; the config's LoRAs applied to the expert each names."""
    from inference.lora import apply_lora_configs
    from models.moe_loading import load_moe_folder, stored_boundary

    boundary = cfg.boundary if cfg.boundary is not None else stored_boundary(folder)
    boundary = boundary if boundary is not None else DEFAULT_BOUNDARY[cfg.task]
    comps = load_moe_folder(folder, cfg.task, boundary, distill=cfg.model_cls == "wan2.2_moe_distill",
                            ckpts=(cfg.high_noise_original_ckpt, cfg.low_noise_original_ckpt), dtype=dtype,
                            device=home)
    for name, expert in zip(EXPERT_NAMES, comps.dit.experts, strict=True):
        specs = [s for s in cfg.lora_configs if s.name == name]
        if specs:
            apply_lora_configs(expert, specs, cfg.lora_mode, base_dir=base_dir)
    return comps


def place_experts(cfg: InferConfig, pair: nn.Module, device: torch.device) -> bool:
    """Both experts on the device, or (cpu_offload) each under its own offloader (inference/offload.py, the
    config's offload_granularity; "model" is LightX2V's expert swap). Returns whether they are offloaded."""
    if not cfg.cpu_offload:
        pair.to(device)
        return False
    from inference.offload import enable_offload

    for expert in (pair.high_noise_model, pair.low_noise_model):
        enable_offload(expert, device, cfg.offload_granularity)
    return True
