"""Typed training configuration: the one source of defaults.

YAML files hold only what differs from these defaults; `key=value` CLI arguments override both. Unknown keys
and wrongly typed values are errors that name the key (omegaconf structured configs), and `validate()` checks
the rules between fields with messages that say which key to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from inference.schedule import DEFAULT_SHIFT, DEFAULT_STEPS, DEFAULT_UPDATE, StudentSchedule

LORA_TARGETS = (r"blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o|k_img|v_img)", r"blocks\.\d+\.ffn\.(0|2)")

TASKS = ("pretrain", "ode", "dmd")
MIXED_PRECISION = ("no", "bf16", "fp16")
ENGINES = ("ddp", "fsdp", "hybrid", "zero2", "zero3")
SHARDED_ENGINES = ENGINES[1:]
WANDB_MODES = ("disabled", "offline", "online")
SAMPLE_FORMATS = ("mp4", "gif", "npy")  # inference.video.FORMATS (not imported: the config stays light)


@dataclass
class ModelConfig:
    spec: str = "tiny-t2v"  # registry size used when the DiT starts from scratch
    path: str | None = None  # Wan-style folder with DiT weights (the teacher / the model to fine-tune)
    components_path: str | None = None  # folder providing VAE/codec, text and image encoders (default: path)
    generator_init: str | None = None  # dmd: initial generator weights (an ODE-init folder); default: the teacher
    gradient_checkpointing: bool = False
    # two-expert (Wan2.2 A14B) folders, distill/moe.py: the expert boundary as a fraction of 1000 (high-noise expert
    # for t >= boundary * 1000); None: the folder's experts.json, else model.spec's registry boundary
    boundary: float | None = None


@dataclass
class DataConfig:
    source: str = "shapes"  # shapes: the procedural world (renders videos on the fly) | prompts
    prompt_path: str | None = None  # prompts source (distill/prompts.py) when source = prompts
    prompt_column: str = "prompt"
    image_column: str = "image"  # I2V with source = prompts: column of image paths
    # Wan2.2 TI2V-5B only (docs/wan22_ti2v.md): the share of samples that start from their pair's image (the rest
    # are text-only), drawn per sample from the data seed; None: 0.5 with a pairs source, 0 with a prompt list
    image_fraction: float | None = None
    num_frames: int = 9
    height: int = 48
    width: int = 48
    cfg_dropout: float = 0.1  # probability of replacing the prompt by "" (classifier-free guidance training)
    seed: int = 0
    object_size: list[float] = field(default_factory=lambda: [0.2, 0.32])  # shapes: side range (of min(H, W))
    # -- prompt-embedding store (distill/encode_prompts.py, docs/data.md) --
    text_store: str | None = None  # folder of the store (encoded on first use if missing); None: in-memory cache
    text_store_dtype: str = "bf16"  # bf16 | fp16 | fp32: the encoder's compute dtype and the stored dtype
    text_store_chunk: int = 1024  # prompts per shard file (the unit of resume and of the split across ranks)
    text_store_micro_batch: int = 32  # prompts per umT5 forward


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 100
    decay_steps: int = 0  # linear decay to 0 over the last decay_steps of max_steps (warmup-stable-decay)
    # update guard (distill/trainer.py): an optimizer step that changes some weight by more than this, or leaves a
    # non-finite weight or gradient norm, is undone and counted; 0: no guard (saves a copy of the parameters and
    # optimizer state during each step)
    max_update: float = 1.0


# Shift keys have one naming style, by what the shift acts on: `*sample_shift` warps a sampler's sigma grid (the
# student's `distill.sample_shift`, the ODE teacher's `ode.teacher_sample_shift`, inference's `sample_shift`);
# `timestep_shift` warps the timesteps drawn for a training loss (`pretrain.timestep_shift`, `dmd.timestep_shift`).
# Both use the same map s = shift*u / (1 + (shift-1) u) (inference/flow.py).


@dataclass
class PretrainConfig:
    timestep_shift: float = 3.0  # u ~ U(0,1), s = shift*u / (1 + (shift-1) u): more steps at high noise
    # [t_lo, t_hi] (0-1000): draw training timesteps only inside (the shifted density restricted to the range), to
    # fine-tune one expert of a two-expert teacher (distill/moe.py); None: every timestep
    t_range: list[float] | None = None
    ema_decay: float = 0.999
    ema_start: int = 0


@dataclass
class DistillConfig:
    """Student geometry, shared by the ode and dmd tasks and by inference (same warped timesteps)."""

    denoising_step_list: list[int] = field(default_factory=lambda: list(DEFAULT_STEPS))
    sample_shift: float = DEFAULT_SHIFT  # sigma_j = shift(d_j / 1000)
    negative_prompt: str | None = None  # uncond of the teacher's CFG; None = Wan's default negative prompt

    def schedule(self) -> StudentSchedule:
        """The student's schedule (inference/schedule.py): trained with fresh-noise rollouts (lcm)."""
        return StudentSchedule(tuple(self.denoising_step_list), self.sample_shift, update=DEFAULT_UPDATE,
                               trained_with="lcm")


@dataclass
class DMDConfig:
    """Distribution Matching Distillation (docs/step_distillation.md). Guidance uses the standard CFG convention
    (w = 1: none):
    Self-Forcing's g = 3 is w = 4 here; Self-Forcing-Plus T2V g = 5 -> w = 6, I2V g = 6 -> w = 7."""

    guide_scale: float = 6.0
    # [t_min, t_max] (0-1000): the teacher's CFG only at critic timesteps inside, w = 1 outside (guidance in a
    # limited interval, as the sampler's sample_guide_interval); None: every timestep
    guide_interval: list[float] | None = None
    timestep_shift: float = 5.0  # DMD / critic timestep: s = shift(u), t = 1000 s clamped to [t_min, t_max]
    t_min: float = 20.0
    t_max: float = 980.0
    dfake_gen_update_ratio: int = 5  # generator updated every N iterations, critic every iteration
    lr_critic: float = 4e-7  # the generator uses optim.lr
    grad_clip_critic: float = 10.0
    ema_decay: float = 0.99
    ema_start: int = 200
    real_score_dtype: str = "fp32"  # fp32 | bf16 (frozen teacher; no optimizer state)
    # two-expert teacher (model.path with high_noise_model/ + low_noise_model/, distill/moe.py): per_expert = one
    # network per expert (each a copy of its teacher expert), shared = one network, initialised from the expert
    # `dmd.shared_init`. The generator's experts own the student steps on their side of the boundary.
    generator: str = "per_expert"
    critic: str = "per_expert"
    shared_init: str = "low_noise_model"
    # two-expert teacher: the teacher's CFG scale at critic timesteps below the boundary (the low-noise expert's;
    # Wan2.2 T2V-A14B samples with 4.0 high-noise, 3.0 low-noise); None: dmd.guide_scale for both
    guide_scale_low: float | None = None
    # two-expert teacher: critic timesteps drawn per_sample, or per_call (the side of the boundary drawn once per
    # micro-batch, the same on every rank, each sample inside it: same marginal, distill/losses.py `side_draw`);
    # auto: per_call under fsdp / hybrid, whose sharded experts all-gather only if every rank runs the same one
    critic_side: str = "auto"


@dataclass
class ODEConfig:
    """ODE-regression initialisation: teacher trajectories stored at the student's warped timesteps."""

    trajectories: str = "runs/ode_trajectories"  # folder of safetensors shards (generated if missing)
    num_trajectories: int = 256
    teacher_steps: int = 50
    guide_scale: float = 5.0
    teacher_sample_shift: float = 3.0  # the teacher's sampler grid for the trajectories
    shard_size: int = 32


@dataclass
class LoRATrainConfig:
    """LoRA-mode DMD (distill/adapters.py): generator and critic are adapters on one frozen, shared teacher."""

    enabled: bool = False
    rank: int = 64
    alpha: float = 64.0  # update scale alpha / rank
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # regexes, full module names


@dataclass
class DistributedConfig:
    """How the networks are spread over the processes (distill/engines.py)."""

    # auto: the accelerate launch config's engine (configs/accelerate/*.yaml), ddp without one | ddp | fsdp
    # (FSDP2 full shard) | hybrid (FSDP2 hybrid shard) | zero2 | zero3 (DeepSpeed); sharded engines: task dmd
    engine: str = "auto"
    shard_size: int = 0  # hybrid: processes per shard group (0: processes per node)
    # fsdp/hybrid: keep parameters, gradients and optimizer states in CPU memory (FSDP2 CPUOffloadPolicy; the
    # optimizer steps on the CPU, each block's weights are copied to the GPU for its forward/backward)
    cpu_offload: bool = False


@dataclass
class CheckpointConfig:
    every: int = 500
    keep: int = 2
    resume: str = "auto"  # auto: continue from the latest checkpoint in run_dir; never: start fresh; or a path


@dataclass
class LoggingConfig:
    every: int = 10
    wandb_mode: str = "disabled"  # disabled | offline | online (online only when WANDB_API_KEY is set)
    wandb_project: str = "stepdistill"
    wandb_entity: str | None = None
    run_name: str | None = None
    sample_every: int = 0  # write sample videos every N steps (0: only at the end)
    sample_prompts: list[str] = field(default_factory=list)
    sample_seed: int = 0
    sample_steps: int = 20
    sample_guide_scale: float = 5.0
    # mp4 (H.264 through imageio-ffmpeg), gif or npy (raw uint8 frames): npy/gif need no ffmpeg binary
    sample_format: str = "mp4"
    # I2V samples: one conditioning image file per sample prompt; empty: the data source's images (the shapes
    # world's first frame when data.source=shapes)
    sample_images: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    task: str = "pretrain"
    run_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 8  # per process
    grad_accum: int = 1
    mixed_precision: str = "no"
    num_threads: int = 0  # CPU threads for torch (0: torch's default)
    output_model: str | None = None  # Wan-style folder written at the end (default: <run_dir>/model)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    ode: ODEConfig = field(default_factory=ODEConfig)
    lora: LoRATrainConfig = field(default_factory=LoRATrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        _choice("task", self.task, TASKS)
        # -- training robustness: seeds, update guard, sample images --
        for key in ("seed", "data.seed", "logging.sample_seed"):
            if not 0 <= _get(self, key) < 2**32:
                raise ValueError(f"{key} must be in [0, 2**32 - 1] (numpy's seed range), got {_get(self, key)}")
        if self.optim.max_update < 0:
            raise ValueError(f"optim.max_update must be >= 0 (0: no update guard), got {self.optim.max_update}")
        images, prompts = self.logging.sample_images, self.logging.sample_prompts
        if images and len(images) != len(prompts):
            raise ValueError(f"logging.sample_images needs one image per logging.sample_prompts entry: got "
                             f"{len(images)} images for {len(prompts)} prompts")
        _choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _choice("logging.wandb_mode", self.logging.wandb_mode, WANDB_MODES)
        _choice("logging.sample_format", self.logging.sample_format, SAMPLE_FORMATS)
        _choice("data.source", self.data.source, ("shapes", "prompts"))
        if self.data.source == "prompts" and (self.task == "pretrain" or not self.data.prompt_path):
            raise ValueError("data.source=prompts needs data.prompt_path and a distillation task (ode/dmd)")
        for key in ("max_steps", "batch_size", "grad_accum", "checkpoint.every", "checkpoint.keep"):
            value = _get(self, key)
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        if not 0 <= self.optim.decay_steps <= self.max_steps:
            raise ValueError(f"optim.decay_steps must be in [0, max_steps={self.max_steps}], got "
                             f"{self.optim.decay_steps}")
        if self.data.image_fraction is not None and not 0 <= self.data.image_fraction <= 1:
            raise ValueError(f"data.image_fraction must be in [0, 1], got {self.data.image_fraction}")
        if not 0 <= self.data.cfg_dropout < 1:
            raise ValueError(f"data.cfg_dropout must be in [0, 1), got {self.data.cfg_dropout}")
        if (self.data.num_frames - 1) % 4:
            raise ValueError(f"data.num_frames must be 4n+1, got {self.data.num_frames}")
        if self.data.height % 16 or self.data.width % 16:
            raise ValueError(f"data.height/width must be multiples of 16, got {self.data.height}x{self.data.width}")
        if len(self.data.object_size) != 2:
            raise ValueError(f"data.object_size must be [min, max] (object side, fraction of min(height, width)), "
                             f"got {list(self.data.object_size)}")
        # -- prompt-embedding store --
        _choice("data.text_store_dtype", self.data.text_store_dtype, ("bf16", "fp16", "fp32"))
        if self.data.text_store_chunk < 1 or self.data.text_store_micro_batch < 1:
            raise ValueError(f"data.text_store_chunk and data.text_store_micro_batch must be >= 1, got "
                             f"{self.data.text_store_chunk} / {self.data.text_store_micro_batch}")
        if self.data.text_store and self.task == "pretrain":
            raise ValueError("data.text_store is for the distillation tasks (ode/dmd); pretrain uses the shapes "
                             "world's in-memory cache: unset data.text_store")
        if self.pretrain.timestep_shift <= 0:
            raise ValueError("pretrain.timestep_shift must be > 0")
        tr = self.pretrain.t_range
        if tr is not None and (len(tr) != 2 or not 0 <= tr[0] < tr[1] <= 1000):
            raise ValueError(f"pretrain.t_range must be [t_lo, t_hi] with 0 <= t_lo < t_hi <= 1000, got {list(tr)}")
        if self.model.boundary is not None and not 0 < self.model.boundary < 1:
            raise ValueError(f"model.boundary is a fraction of 1000 in (0, 1) (Wan2.2 T2V-A14B 0.875, I2V-A14B "
                             f"0.900), got {self.model.boundary}")
        _choice("dmd.generator", self.dmd.generator, ("per_expert", "shared"))
        _choice("dmd.critic", self.dmd.critic, ("per_expert", "shared"))
        _choice("dmd.shared_init", self.dmd.shared_init, ("high_noise_model", "low_noise_model"))
        _choice("dmd.critic_side", self.dmd.critic_side, ("auto", "per_sample", "per_call"))
        if self.task in ("ode", "dmd") and self.model.path is None:
            raise ValueError(f"task {self.task} needs model.path: the teacher's Wan-style folder")
        try:
            self.distill.schedule()
        except ValueError as e:
            raise ValueError(f"distill.denoising_step_list / distill.sample_shift: {e}") from e
        if self.task == "ode" and self.grad_accum != 1:
            raise ValueError("task ode takes one batch per step: set grad_accum=1 (raise batch_size instead)")
        gi = self.dmd.guide_interval
        if gi is not None and (len(gi) != 2 or not 0 <= gi[0] < gi[1] <= 1000):
            raise ValueError(f"dmd.guide_interval must be [t_min, t_max] with 0 <= t_min < t_max <= 1000, got {gi}")
        if self.dmd.dfake_gen_update_ratio < 1:
            raise ValueError("dmd.dfake_gen_update_ratio must be >= 1")
        if not 0 <= self.dmd.t_min < self.dmd.t_max <= 1000:
            raise ValueError(f"dmd.t_min/t_max must satisfy 0 <= t_min < t_max <= 1000, got "
                             f"{self.dmd.t_min}/{self.dmd.t_max}")
        _choice("dmd.real_score_dtype", self.dmd.real_score_dtype, ("fp32", "bf16"))
        if self.lora.enabled:
            if self.task != "dmd":
                raise ValueError(f"lora.enabled is for task dmd (generator and critic adapters), not {self.task}")
            if self.model.generator_init is not None:
                raise ValueError("lora.enabled: the generator starts as the teacher plus a zero adapter; unset "
                                 "model.generator_init (or merge the ODE init into model.path first)")
            if self.lora.rank < 1 or not self.lora.target_modules:
                raise ValueError(f"lora.rank must be >= 1 and lora.target_modules non-empty, got "
                                 f"{self.lora.rank} / {self.lora.target_modules}")
        _choice("distributed.engine", self.distributed.engine, ("auto", *ENGINES))
        if self.distributed.cpu_offload and self.distributed.engine not in ("auto", "fsdp", "hybrid"):
            raise ValueError(f"distributed.cpu_offload needs distributed.engine fsdp or hybrid (FSDP2), got "
                             f"{self.distributed.engine}")
        if self.distributed.engine in SHARDED_ENGINES and (self.task != "dmd" or self.lora.enabled):
            raise ValueError(f"distributed.engine={self.distributed.engine} shards the three full DMD networks: it "
                             f"needs task=dmd without lora.enabled (got task={self.task}, lora.enabled="
                             f"{self.lora.enabled}); use distributed.engine=ddp")
        if self.distributed.shard_size < 0:
            raise ValueError(f"distributed.shard_size must be >= 0, got {self.distributed.shard_size}")
        if self.model.path is None and self.model.components_path is None:
            raise ValueError("set model.path (a Wan-style folder) or model.components_path (VAE/text encoders "
                             "for a DiT trained from scratch)")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML file <- `key=value` overrides; returns a validated `TrainConfig` object."""
    schema = OmegaConf.structured(TrainConfig)
    try:
        merged = schema
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"training config not found: {path}")
            merged = OmegaConf.merge(merged, _read_yaml(path))
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        # e.g. "Key 'lrr' not in 'OptimConfig'" or "Value 'abc' could not be converted to Integer": name the key
        key, msg = getattr(e, "full_key", None), str(e).split("\n")[0]
        raise ValueError(f"invalid training config{f' at {key}' if key else ''}: {msg}") from e
    cfg: TrainConfig = OmegaConf.to_object(merged)
    cfg.validate()
    return cfg


def _read_yaml(path: Path) -> Any:
    """A training YAML file as an omegaconf mapping; garbled YAML or a top level that is not a mapping is a
    ValueError naming the file."""
    try:
        shape = yaml.safe_load(path.read_text())  # the top level as written (omegaconf turns a bare word into a key)
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise ValueError(f"training config {path} is not valid YAML: {' '.join(str(e).split())}") from e
    if not (shape is None or isinstance(shape, dict)) or not isinstance(loaded, DictConfig):
        raise ValueError(f"training config {path} must be a mapping of keys (task: ..., optim: ...), got a "
                         f"{type(shape).__name__}")
    return loaded


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
