"""Inference configuration: LightX2V-style JSON files mapped onto one typed schema.

The JSON keys are those of LightX2V (`infer_steps`, `denoising_step_list`, `sample_shift`, `enable_cfg`,
`sample_guide_scale`, `target_video_length`, ...), so users' existing configs load as they are. Unknown keys
are a warning that names them; invalid values are a `ValueError` that names the rule.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference.config_types import check_field_types, describe_type  # noqa: F401 (describe_type: re-exported)
from inference.moe import MOE_MODEL_CLASSES, check_moe_keys
from inference.schedule import DEFAULT_UPDATE, StudentSchedule

# Wan2.1's default negative prompt (garish colours, overexposed, static, blurry details, subtitles, ...).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

TASKS = ("t2v", "i2v")
# Wan2.2 A14B (docs/wan22.md): wan2.2_moe (two experts, teacher sampler) and wan2.2_moe_distill (a few-step student:
# two distilled experts, or base experts + one distill LoRA per expert); see inference/moe.py.
# wan2.2: the dense Wan2.2 TI2V-5B, task t2v or i2v (inference/ti2v_pipeline.py).
MODEL_CLASSES = ("wan2.1", "wan2.1_distill", *MOE_MODEL_CLASSES, "wan2.2")
DISTILL_MODEL_CLASSES = ("wan2.1_distill", "wan2.2_moe_distill")
# The other Wan names LightX2V's `--model_cls` accepts (its runner registry); each needs a model or a sampler this
# project does not have, so it is refused with what it is instead of being run as plain Wan2.1.
UNSUPPORTED_MODEL_CLASSES = {
    "wan2.1_mean_flow_distill": "a MeanFlow-distilled Wan2.1 (average-velocity sampler)",
    "wan2.1_vace": "Wan2.1-VACE (reference/mask-conditioned editing)",
    "wan2.1_sf": "Self-Forcing autoregressive (causal, chunk-by-chunk) Wan2.1",
    "wan2.1_sf_mtxg2": "Self-Forcing autoregressive Wan2.1 with Matrix-Game-2 action conditioning",
    "wan2.1_causvid": "CausVid autoregressive (causal) Wan2.1",
    "wan2.1_df": "diffusion-forcing Wan2.1",
    "wan2.1_skyreels_v2_df": "SkyReels-V2 diffusion-forcing Wan2.1",
    "wan2.1_audio": "audio-driven Wan2.1",
}
SOLVERS = ("unipc", "euler")
DISTILL_UPDATES = ("euler", "lcm")
DTYPES = ("auto", "fp32", "bf16", "fp16")
QUANT_SCHEMES = ("int8", "fp8")
# LightX2V names a quantization scheme by storage type and the kernel that runs it. The per-output-channel symmetric
# ones store exactly our layout (codes + fp32 `weight_scale` per row), so they map onto ours; the kernel is ours.
LIGHTX2V_QUANT_SCHEMES = {f"{kind}-{kernel}": kind for kind in QUANT_SCHEMES
                          for kernel in ("vllm", "sgl", "q8f", "torchao", "triton")}
OFFLOAD_GRANULARITIES = ("block", "phase", "model")  # inference/offload.py
LORA_MODES = ("merge", "runtime")  # merged into the weights at load, or applied unmerged (inference/lora.py)
# Attention kernels named by LightX2V configs; all run through our attention() (SDPA, or flash-attn if installed).
ATTENTION_TYPES = ("flash_attn2", "flash_attn3", "sage_attn2", "torch_sdpa", "sdpa", "radial_attn")
ATTENTION_KEYS = ("self_attn_1_type", "cross_attn_1_type", "cross_attn_2_type")
# Keys of LightX2V configs that have no effect here: accepted (a config written for LightX2V still loads) with a
# warning naming them, so nobody believes a cache or a tiling is active when it is not.
IGNORED_KEYS = ("mm_config", "feature_caching", "teacache_thresh", "use_ret_steps", "rotary_chunk", "clean_cuda_cache",
                "parallel_attn_type",
                # LightX2V's TI2V-5B configs: the latent channels and VAE strides, which the folder's files decide here
                "num_channels_latents", "vae_stride")


@dataclass
class LoraSpec:
    path: str
    strength: float = 1.0
    # Wan2.2 MoE: the expert the LoRA applies to, "high_noise_model" | "low_noise_model" (LightX2V's key); None
    # for a single-DiT model.
    name: str | None = None


# ---- multi-GPU inference: LightX2V's "parallel" block (run by inference/parallel.py) ----------------
SEQ_P_ATTN_TYPES = ("ulysses", "ring")  # all-to-all over heads | key/value blocks passed around a ring
CFG_P_SIZES = (1, 2)  # CFG has two branches (cond, uncond)


@dataclass
class ParallelConfig:
    """`"parallel": {"seq_p_size": 4, "seq_p_attn_type": "ulysses", "cfg_p_size": 2}` (LightX2V's keys).

    A launch of `cfg_p_size x seq_p_size` processes (torchrun): each group of `seq_p_size` ranks splits the video
    tokens of one CFG branch; `cfg_p_size` 2 puts the conditional and unconditional branches on different groups.
    """

    seq_p_size: int = 1
    seq_p_attn_type: str = "ulysses"
    cfg_p_size: int = 1

    @property
    def world_size(self) -> int:
        return self.seq_p_size * self.cfg_p_size

    def validate(self, cfg_active: bool) -> None:
        """The rules that need no launch or model; `cfg_active`: the config runs CFG (two branches)."""
        if self.seq_p_size < 1:
            raise ValueError(f"parallel.seq_p_size must be >= 1, got {self.seq_p_size}")
        _choice("parallel.seq_p_attn_type", self.seq_p_attn_type, SEQ_P_ATTN_TYPES)
        _choice("parallel.cfg_p_size", self.cfg_p_size, CFG_P_SIZES)
        if self.cfg_p_size == 2 and not cfg_active:
            raise ValueError("parallel.cfg_p_size 2 runs the conditional and unconditional CFG branches on "
                             "different ranks, but this config has no CFG (enable_cfg false or sample_guide_scale "
                             "1): use seq_p_size alone")
# ---- end of the parallel block -------------------------------------------------------------------


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
    distill_update: str = DEFAULT_UPDATE  # lcm (fresh noise per step, as in training) | euler (deterministic)
    sample_shift: float = 5.0
    enable_cfg: bool = True
    # Standard CFG: uncond + w (cond - uncond); w = 1 is no guidance. Wan2.2 MoE: one w for both experts or
    # LightX2V's pair [w_high_noise, w_low_noise] (the official config's tuple is the other way round: (low, high)).
    sample_guide_scale: float | list[float] = 5.0
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
    # ---- memory: offload and VAE tiling (inference/offload.py, docs/big_models.md) ----
    cpu_offload: bool = False  # DiT weights on the host, copied to the device per offload_granularity
    offload_granularity: str = "block"  # block | phase (attention / cross-attention / FFN parts) | model
    lazy_load: bool = False  # with cpu_offload: blocks read from the safetensors files when needed (bounded RAM)
    t5_cpu_offload: bool = False  # umT5 rests on the host, visits the device for text encoding only
    clip_cpu_offload: bool = False  # CLIP likewise, for the image-encoding stage
    vae_cpu_offload: bool = False  # the VAE likewise, for its encode / decode stages
    use_tiling_vae: bool = False  # spatial tiles (overlap, linear blending) in VAE decode and encode
    vae_tile_size: int = 48  # tile side in latent pixels (x8 in pixels); >= the VAE's receptive field
    vae_tile_overlap: int = 16  # latent pixels shared by neighbouring tiles, blended linearly
    # ---- end of memory keys ----
    # ---- Wan2.2 MoE (model_cls wan2.2_moe / wan2.2_moe_distill; LightX2V's keys, docs/wan22.md) ----
    boundary: float | None = None  # fraction of 1000: t >= boundary * 1000 runs high_noise_model; None: per task
    boundary_step_index: int | None = None  # distill: steps [0, index) high_noise_model; None: by `boundary`
    high_noise_original_ckpt: str | None = None  # distilled expert files (else distill_models/<expert>/)
    low_noise_original_ckpt: str | None = None
    use_image_encoder: bool | None = None  # LightX2V's Wan2.2 I2V configs say false: the experts take no CLIP
    # ---- end of MoE keys ----
    attention_type: str = "sdpa"
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    device: str = "auto"
    parallel: ParallelConfig | None = None  # multi-GPU (torchrun); None: one process

    def __post_init__(self) -> None:
        check_field_types(self)  # every key against its annotation, before any rule reads it
        if self.dit_quant_scheme in LIGHTX2V_QUANT_SCHEMES:  # e.g. "int8-vllm": same storage layout as "int8"
            self.dit_quant_scheme = LIGHTX2V_QUANT_SCHEMES[self.dit_quant_scheme]
        self.validate()

    @property
    def is_distill(self) -> bool:
        return self.denoising_step_list is not None

    @property
    def is_moe(self) -> bool:
        """A Wan2.2 A14B two-expert model (model_cls wan2.2_moe or wan2.2_moe_distill)."""
        return self.model_cls in MOE_MODEL_CLASSES

    def guide_scales(self) -> tuple[float, float]:
        """(w for high_noise_model, w for low_noise_model); a single number serves both."""
        w = self.sample_guide_scale
        return (float(w[0]), float(w[1])) if isinstance(w, list) else (float(w), float(w))

    @property
    def cfg_active(self) -> bool:
        """CFG runs at some step: enable_cfg and a guidance scale other than 1 (either expert's)."""
        return self.enable_cfg and any(w != 1.0 for w in self.guide_scales())

    def schedule(self) -> StudentSchedule | None:
        """The few-step student's schedule (None for a teacher config)."""
        if not self.is_distill:
            return None
        return StudentSchedule(tuple(self.denoising_step_list), self.sample_shift, self.distill_update)

    def validate(self) -> None:
        _choice("task", self.task, TASKS)
        if self.model_cls in UNSUPPORTED_MODEL_CLASSES:
            raise ValueError(f"model_cls {self.model_cls!r} ({UNSUPPORTED_MODEL_CLASSES[self.model_cls]}) is a "
                             f"LightX2V model class this project does not implement; supported: 'wan2.1' (the "
                             "base/teacher sampler) and 'wan2.1_distill' (a few-step student); Wan2.2 A14B: "
                             "'wan2.2_moe' and 'wan2.2_moe_distill'")
        _choice("model_cls", self.model_cls, MODEL_CLASSES)
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed}")
        _choice("sample_solver", self.sample_solver, SOLVERS)
        _choice("distill_update", self.distill_update, DISTILL_UPDATES)
        _choice("dtype", self.dtype, DTYPES)
        _choice("attention_type", self.attention_type, ATTENTION_TYPES)
        _choice("lora_mode", self.lora_mode, LORA_MODES)
        self._validate_memory_keys()
        if self.infer_steps < 1:
            raise ValueError(f"infer_steps must be >= 1, got {self.infer_steps}")
        if self.sample_shift <= 0:
            raise ValueError(f"sample_shift must be > 0, got {self.sample_shift}")
        check_moe_keys(self)  # sample_guide_scale (one number or the MoE pair) and the MoE block (inference/moe.py)
        interval = self.sample_guide_interval
        if interval is not None and (len(interval) != 2 or not 0 <= interval[0] < interval[1] <= 1000):
            raise ValueError(f"sample_guide_interval must be [t_min, t_max] with 0 <= t_min < t_max <= 1000 "
                             f"(timesteps, 1000 = pure noise), got {interval}")
        check_video_size(self.target_video_length, self.target_height, self.target_width)
        if self.is_distill:
            steps = self.schedule().denoising_step_list  # the schedule's rules (inference/schedule.py)
            if self.infer_steps != len(steps):
                # LightX2V: infer_steps of the distill scheduler = len(denoising_step_list).
                self.infer_steps = len(steps)
            if self.enable_cfg:
                warnings.warn("enable_cfg is true with a few-step distill scheduler: the student already carries "
                              "the guidance, so CFG on top will blur/oversaturate the output", stacklevel=3)
        if self.dit_quantized and self.dit_quant_scheme not in QUANT_SCHEMES:
            raise ValueError(f"dit_quant_scheme must be one of {list(QUANT_SCHEMES)}, got {self.dit_quant_scheme!r} "
                             f"(LightX2V's per-channel names map onto them: {sorted(LIGHTX2V_QUANT_SCHEMES)})")
        if self.parallel is not None:
            self.parallel.validate(cfg_active=self.cfg_active)
            if self.is_moe:
                raise ValueError("the parallel block (multi-GPU) does not support the Wan2.2 MoE model classes yet; "
                                 "remove it (one process runs both experts)")

    def _validate_memory_keys(self) -> None:
        """The offload / VAE tiling keys (see the block of fields above)."""
        _choice("offload_granularity", self.offload_granularity, OFFLOAD_GRANULARITIES)
        if self.lazy_load and not self.cpu_offload:
            raise ValueError("lazy_load reads DiT blocks from disk while offloading: it needs cpu_offload: true")
        if self.lazy_load and self.lora_mode == "merge" and self.lora_configs:
            raise ValueError("lazy_load reads the DiT weights from the files as they are, so LoRAs cannot be merged "
                             "into them: use lora_mode 'runtime' (or merge the LoRA into the checkpoint first)")
        if self.vae_tile_size < 1 or not 0 <= self.vae_tile_overlap < self.vae_tile_size:
            raise ValueError(f"vae_tile_size must be >= 1 and 0 <= vae_tile_overlap < vae_tile_size (latent pixels), "
                             f"got {self.vae_tile_size} and {self.vae_tile_overlap}")

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
    if not isinstance(data, dict):
        raise ValueError(f"an inference config must be a JSON object of keys ({{\"infer_steps\": 4, ...}}), "
                         f"got {type(data).__name__}")
    data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    names = {f.name for f in dataclasses.fields(InferConfig)}
    kwargs: dict[str, Any] = {}
    unknown, ignored = [], []
    for key, value in data.items():
        if key in names:
            kwargs[key] = value
        elif key in ATTENTION_KEYS:
            if value not in ATTENTION_TYPES:
                warnings.warn(f"{key}={value!r} is not an attention type we know ({list(ATTENTION_TYPES)}); "
                              "using SDPA", stacklevel=2)
        elif key in IGNORED_KEYS:
            ignored.append(key)
        elif not key.startswith("_"):
            unknown.append(key)
    if unknown:
        warnings.warn(f"unknown inference config key(s) ignored: {sorted(unknown)}", stacklevel=2)
    if ignored:
        warnings.warn(f"LightX2V config key(s) accepted but not honoured here (no effect): {sorted(ignored)}",
                      stacklevel=2)
    return InferConfig(**kwargs)


def load_config(path: str | Path, **overrides: Any) -> InferConfig:
    """Read a JSON config file; `overrides` (e.g. from the CLI) win over the file, None means unset."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"inference config not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (a JSON config is): {e}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    try:
        return config_from_dict(data, **overrides)
    except ValueError as e:  # name the file: the message names the key
        raise ValueError(f"{path}: {e}") from e


# ---- command lines: the model arguments shared by infer.py, the server and the web UI ------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    """--config / --config_json (LightX2V's name), --model_path and --model_cls: shared by infer.py, the server and
    the web UI."""
    p.add_argument("--config", "--config_json", dest="config", required=True,
                   help="LightX2V-style inference JSON (--config_json is LightX2V's name for it)")
    p.add_argument("--model_path", help="Wan-style model folder (default: the config's model_path)")
    p.add_argument("--model_cls", help="override the config's model_cls: wan2.1 (base/teacher) or wan2.1_distill "
                                       "(few-step student: loads distill_models/); wan2.2_moe / wan2.2_moe_distill "
                                       "(Wan2.2 A14B's two experts); wan2.2 (Wan2.2 TI2V-5B); other LightX2V "
                                       "names are refused")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
