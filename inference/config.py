"""Inference configuration: LightX2V-style JSON files mapped onto one typed schema.

The JSON keys are those of LightX2V (`infer_steps`, `denoising_step_list`, `sample_shift`, `enable_cfg`,
`sample_guide_scale`, `target_video_length`, ...), so users' existing configs load as they are. Unknown keys
are a warning that names them; invalid values are a `ValueError` that names the rule.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Wan2.1's default negative prompt (garish colours, overexposed, static, blurry details, subtitles, ...).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

TASKS = ("t2v", "i2v")
MODEL_CLASSES = ("wan2.1", "wan2.1_distill")
SOLVERS = ("unipc", "euler")
DISTILL_UPDATES = ("euler", "lcm")
DTYPES = ("auto", "fp32", "bf16", "fp16")
QUANT_SCHEMES = ("int8", "fp8")
LORA_MODES = ("merge", "runtime")  # merged into the weights at load, or applied unmerged (inference/lora.py)
# Attention kernels named by LightX2V configs; all run through our attention() (SDPA, or flash-attn if installed).
ATTENTION_TYPES = ("flash_attn2", "flash_attn3", "sage_attn2", "torch_sdpa", "sdpa", "radial_attn")
ATTENTION_KEYS = ("self_attn_1_type", "cross_attn_1_type", "cross_attn_2_type")
# Keys of LightX2V configs that we accept and ignore knowingly (no effect here).
IGNORED_KEYS = ("mm_config", "feature_caching", "teacache_thresh", "use_ret_steps", "rotary_chunk", "clean_cuda_cache",
                "use_tiling_vae", "lazy_load", "t5_cpu_offload", "offload_granularity", "parallel_attn_type")


@dataclass
class LoraSpec:
    path: str
    strength: float = 1.0


@dataclass
class InferConfig:
    """One source of defaults for inference; field names follow LightX2V's JSON keys."""

    task: str = "t2v"
    model_cls: str = "wan2.1"  # "wan2.1_distill" selects the few-step scheduler and distill_models/ weights
    model_path: str | None = None  # relative paths resolve against the repository root
    dit_original_ckpt: str | None = None
    infer_steps: int = 50
    sample_solver: str = "unipc"  # teacher solver: unipc | euler
    denoising_step_list: list[int] | None = None  # set => few-step distill scheduler
    distill_update: str = "euler"  # euler (deterministic) | lcm (fresh noise per step, as in training)
    sample_shift: float = 5.0
    enable_cfg: bool = True
    sample_guide_scale: float = 5.0  # standard CFG: uncond + w (cond - uncond); w = 1 is no guidance
    # [t_min, t_max] on the 0-1000 timestep scale: CFG only at steps whose timestep lies inside, the conditional
    # branch alone elsewhere (one forward instead of two); guidance in a limited interval, Kynkaanniemi et al. 2024.
    # None: every step (LightX2V's behaviour). Not a LightX2V key.
    sample_guide_interval: list[float] | None = None
    sample_neg_prompt: str = WAN_NEGATIVE_PROMPT
    target_video_length: int = 81
    target_height: int = 480
    target_width: int = 832
    text_len: int | None = None  # informative; the DiT's config.json decides
    fps: int = 16
    seed: int = 42
    lora_configs: list[LoraSpec] = field(default_factory=list)  # applied in order, see inference/lora.py
    lora_mode: str = "merge"  # merge | runtime (unmerged: switchable per request, works on quantized weights)
    dit_quantized: bool = False
    dit_quant_scheme: str | None = None  # int8 | fp8: in <model_path>/[distill_]<scheme>/ (inference/quantized.py)
    dit_quantized_ckpt: str | None = None  # explicit quantized DiT file or folder (LightX2V key)
    cpu_offload: bool = False  # keep the text encoder (umT5-XXL, 11 GB in bf16) on the CPU
    attention_type: str = "sdpa"
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    device: str = "auto"

    def __post_init__(self) -> None:
        self.lora_configs = [x if isinstance(x, LoraSpec) else LoraSpec(**x) for x in self.lora_configs]
        if self.denoising_step_list is not None:
            self.denoising_step_list = [int(d) for d in self.denoising_step_list]
        self.validate()

    @property
    def is_distill(self) -> bool:
        return self.denoising_step_list is not None

    def validate(self) -> None:
        _choice("task", self.task, TASKS)
        _choice("model_cls", self.model_cls, MODEL_CLASSES)
        _choice("sample_solver", self.sample_solver, SOLVERS)
        _choice("distill_update", self.distill_update, DISTILL_UPDATES)
        _choice("dtype", self.dtype, DTYPES)
        _choice("attention_type", self.attention_type, ATTENTION_TYPES)
        _choice("lora_mode", self.lora_mode, LORA_MODES)
        if self.infer_steps < 1:
            raise ValueError(f"infer_steps must be >= 1, got {self.infer_steps}")
        if self.sample_shift <= 0:
            raise ValueError(f"sample_shift must be > 0, got {self.sample_shift}")
        if self.sample_guide_scale < 0:
            raise ValueError(f"sample_guide_scale must be >= 0, got {self.sample_guide_scale}")
        interval = self.sample_guide_interval
        if interval is not None and (len(interval) != 2 or not 0 <= interval[0] < interval[1] <= 1000):
            raise ValueError(f"sample_guide_interval must be [t_min, t_max] with 0 <= t_min < t_max <= 1000 "
                             f"(timesteps, 1000 = pure noise), got {interval}")
        check_video_size(self.target_video_length, self.target_height, self.target_width)
        if self.model_cls == "wan2.1_distill" and self.denoising_step_list is None:
            raise ValueError("model_cls 'wan2.1_distill' needs a denoising_step_list, e.g. [1000, 750, 500, 250]")
        if self.is_distill:
            steps = self.denoising_step_list
            if not steps or any(a <= b for a, b in zip(steps, steps[1:])) or not 0 < steps[-1] <= steps[0] <= 1000:
                raise ValueError(f"denoising_step_list must be non-empty and strictly decreasing within (0, 1000], "
                                 f"got {steps}")
            if self.infer_steps != len(steps):
                # LightX2V: infer_steps of the distill scheduler = len(denoising_step_list).
                self.infer_steps = len(steps)
            if self.enable_cfg:
                warnings.warn("enable_cfg is true with a few-step distill scheduler: the student already carries "
                              "the guidance, so CFG on top will blur/oversaturate the output", stacklevel=3)
        if self.dit_quantized:
            _choice("dit_quant_scheme", self.dit_quant_scheme, QUANT_SCHEMES)

    def replace(self, **overrides: Any) -> InferConfig:
        """A copy with some fields changed (validated again)."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown inference option(s): {sorted(unknown)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_video_size(frames: int, height: int, width: int, spatial: int = 16, temporal: int = 4) -> None:
    """Frames must be `temporal*n + 1` and height/width multiples of `spatial` (VAE stride 8 x patch 2)."""
    if frames < 1 or (frames - 1) % temporal:
        raise ValueError(f"target_video_length must be {temporal}n+1 (e.g. 17, 81), got {frames}")
    for name, v in (("target_height", height), ("target_width", width)):
        if v <= 0 or v % spatial:
            raise ValueError(f"{name} must be a positive multiple of {spatial}, got {v}")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def config_from_dict(data: dict[str, Any], **overrides: Any) -> InferConfig:
    """Build an `InferConfig` from LightX2V-style keys; unknown keys warn, attention keys map to ours."""
    data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    names = {f.name for f in dataclasses.fields(InferConfig)}
    kwargs: dict[str, Any] = {}
    unknown = []
    for key, value in data.items():
        if key in names:
            kwargs[key] = value
        elif key in ATTENTION_KEYS:
            if value not in ATTENTION_TYPES:
                warnings.warn(f"{key}={value!r} is not an attention type we know ({list(ATTENTION_TYPES)}); "
                              "using SDPA", stacklevel=2)
        elif key not in IGNORED_KEYS and not key.startswith("_"):
            unknown.append(key)
    if unknown:
        warnings.warn(f"unknown inference config key(s) ignored: {sorted(unknown)}", stacklevel=2)
    return InferConfig(**kwargs)


def load_config(path: str | Path, **overrides: Any) -> InferConfig:
    """Read a JSON config file; `overrides` (e.g. from the CLI) win over the file, None means unset."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"inference config not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    return config_from_dict(data, **overrides)
