"""Two-expert (Wan2.2 A14B) teachers and students in training: docs/moe_distillation.md.

A two-expert folder (the official Wan2.2 A14B layout, read by models/moe_loading.py as inference reads it) holds
the shared components (VAE / codec, umT5, tokenizer) at its root and one DiT folder per expert, `high_noise_model/`
(timesteps t >= boundary * 1000) and `low_noise_model/` (below), each with config.json and its base weights
(`diffusion_pytorch_model*.safetensors`). A student keeps each expert's config.json there and its weights at
LightX2V's path `distill_models/<expert>/distill_model.safetensors`. The official folders do not store the boundary
(Wan2.2 keeps it in its code: T2V 0.875, I2V 0.900); ours write it to `experts.json` at the root, with the student
steps each expert owns.

- Teacher: `pretrain.t_range` fine-tunes one expert on its timesteps (`range_flow_matching_loss`); `assemble`
  (`python -m distill.moe assemble`) writes the two-expert folder.
- DMD (`build_dmd`, called by distill/dmd.py when model.path is a two-expert folder): the real score is the
  teacher's `ExpertPair`; the generator is an ExpertPair of two students (`dmd.generator: per_expert`, each a copy
  of its teacher expert) or one DiT (`shared`); the critic likewise (`dmd.critic`). A generator pair needs no
  change to the DMD loop: the backward simulation calls it with one timestep per step, so each step runs the
  expert whose side of the boundary that timestep is on, and only the exit step's expert receives gradients (the
  other's gradients stay None, so AdamW leaves its weights and moments alone).
- Export (distill/moe_export.py): the two-expert folder layout + schedule.json + experts.json; LoRAs named
  as the Wan2.2-Lightning releases, `high_noise_model.safetensors` / `low_noise_model.safetensors` in a folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from inference.flow import add_noise, shift_sigma, timestep_of, unshift_sigma, v_from_x0_eps
from inference.guidance import Cond, Guidance
from inference.schedule import StudentSchedule
from models.components import copy_components, load_dit
from models.loading import DISTILL_DIR, DIT_CONFIG, DIT_WEIGHTS
from models.moe import EXPERTS, ExpertPair
from models.moe_loading import (
    LoadedExperts,
    diffusers_boundary,
    expert_config,
    expert_dirs,
    find_expert_weights,
    load_expert,
    moe_layout,
)

if TYPE_CHECKING:
    from distill.config import TrainConfig

HIGH, LOW = EXPERTS  # "high_noise_model", "low_noise_model"
EXPERTS_FILE = "experts.json"
LORA_DIR = "loras"  # <student>/loras/{high,low}_noise_model.safetensors (the Wan2.2-Lightning file names)


def pair_of(high: nn.Module, low: nn.Module, boundary: float) -> LoadedExperts:
    """An ExpertPair of two DiTs of one architecture (their config.json fields must agree) that answers the DiT
    attributes the trainers and the pipeline read (`config`, `text_len`, `model_type`) from its experts."""
    a, b = getattr(high, "config", None), getattr(low, "config", None)
    if a is not None and b is not None and a != b:
        diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        raise ValueError(f"the two experts differ in architecture ({', '.join(diff)}): both must have one config")
    return LoadedExperts(high, low, boundary)


# ---- folders ----------------------------------------------------------------------------------------------------
def is_expert_folder(folder: str | Path | None) -> bool:
    """Whether `folder` is a two-expert folder: official layout (high_noise_model/, low_noise_model/) or diffusers
    (transformer/ + transformer_2/ or a boundary_ratio), models/moe_loading.py."""
    return folder is not None and Path(folder).is_dir() and moe_layout(folder) is not None


def folder_boundary(folder: str | Path, override: float | None = None) -> float:
    """The expert boundary of a two-expert folder, chosen as inference chooses it (inference/moe.py load_moe):
    `override` (model.boundary), else the folder's experts.json (written by `assemble` and the exports), else a
    diffusers folder's boundary_ratio, else the task's official boundary (T2V 0.875, I2V 0.900)."""
    from inference.moe import DEFAULT_BOUNDARY

    if override is not None:
        return float(override)
    folder = Path(folder)
    if (folder / EXPERTS_FILE).is_file():
        return float(json.loads((folder / EXPERTS_FILE).read_text())["boundary"])
    ratio = diffusers_boundary(folder)
    if ratio is not None:
        return float(ratio)
    high = expert_config(expert_dirs(folder)[0], moe_layout(folder) == "diffusers")
    return DEFAULT_BOUNDARY["i2v" if high["model_type"] in ("i2v", "flf2v") else "t2v"]


def student_split(schedule: StudentSchedule, boundary: float) -> tuple[list[int], list[int]]:
    """(step indices of the high-noise expert, of the low-noise expert): step j belongs to the high-noise expert
    when its SHIFTED timestep 1000 shift(d_j / 1000) >= boundary * 1000. [1000, 750, 500, 250] at shift 5 has
    timesteps [1000, 937.5, 833.3, 625]: at 0.875 (and 0.900) steps 0, 1 are high-noise, 2, 3 low-noise (2 + 2)."""
    t = schedule.timesteps().double()
    high = [j for j in range(len(t)) if float(t[j]) >= boundary * 1000.0]
    return high, [j for j in range(len(t)) if j not in high]


def experts_info(boundary: float, schedule: StudentSchedule | None = None) -> dict[str, Any]:
    """The experts.json contents: the boundary and, for a student, the steps each expert owns."""
    info: dict[str, Any] = {"boundary": boundary}
    if schedule is not None:
        high, low = student_split(schedule, boundary)
        ts = schedule.timesteps().tolist()
        info["boundary_step_index"] = len(high)  # LightX2V's key: steps before it run the high-noise expert
        for name, idx in ((HIGH, high), (LOW, low)):
            info[name] = {"steps": idx, "denoising_steps": [schedule.denoising_step_list[j] for j in idx],
                          "timesteps": [round(ts[j], 4) for j in idx]}
    return info


def write_experts(folder: str | Path, boundary: float, schedule: StudentSchedule | None = None) -> Path:
    path = Path(folder) / EXPERTS_FILE
    path.write_text(json.dumps(experts_info(boundary, schedule), indent=2) + "\n")
    return path


def _copy_dit(src: Path, out: Path, name: str) -> None:
    """config.json and the DiT weights of a one-DiT folder `src` into expert `name` of `out`: base weights (shards
    + index) to out/<name>/, a student's distill_models/distill_model.* to out/distill_models/<name>/."""
    (out / name).mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / DIT_CONFIG, out / name / DIT_CONFIG)
    weights = sorted(src.glob(DIT_WEIGHTS.replace(".safetensors", "*.safetensors*")))
    distilled = sorted((src / DISTILL_DIR).glob("distill_model.*"))
    if not weights and not distilled:
        raise FileNotFoundError(f"{src} has no DiT weights ({DIT_WEIGHTS} or {DISTILL_DIR}/distill_model.*)")
    for f in weights:
        shutil.copy2(f, out / name / f.name)
    for f in distilled:
        (out / DISTILL_DIR / name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, out / DISTILL_DIR / name / f.name)


def assemble(high: str | Path, low: str | Path, out: str | Path, boundary: float,
             components: str | Path | None = None) -> Path:
    """Write a two-expert folder from two one-DiT folders: `components` (default: the high folder's) at the root,
    each DiT in its expert subfolder, experts.json with the boundary."""
    if not 0 < boundary < 1:
        raise ValueError(f"boundary is a fraction of 1000 in (0, 1), got {boundary}")
    high, low, out = Path(high), Path(low), Path(out)
    for name, folder in (("--high", high), ("--low", low)):
        if not (folder / DIT_CONFIG).is_file():
            raise FileNotFoundError(f"{name} {folder}: not a DiT folder (no {DIT_CONFIG})")
    a, b = (json.loads((f / DIT_CONFIG).read_text()) for f in (high, low))
    if a != b:
        raise ValueError(f"{high} and {low} hold DiTs of different configs: the experts must share one architecture")
    copy_components(components or high, out)
    for name, folder in ((HIGH, high), (LOW, low)):
        _copy_dit(folder, out, name)
    write_experts(out, boundary)
    return out


def load_pair(folder: str | Path, boundary: float, distill: bool = False,
              dtype: torch.dtype | None = None) -> LoadedExperts:
    """The two DiTs of a two-expert folder (official or diffusers layout; `distill`: a student's
    distill_models/<expert>/ weights when present) as an ExpertPair, read as inference reads them."""
    folder = Path(folder)
    diffusers = moe_layout(folder) == "diffusers"
    experts = []
    for name, d in zip(EXPERTS, expert_dirs(folder), strict=True):
        source, kind = find_expert_weights(folder, name, d, distill, None)
        experts.append(load_expert(expert_config(d, diffusers), source, kind, dtype, diffusers and kind == "base"))
    return pair_of(*experts, boundary)


# ---- teacher fine-tuning: timesteps restricted to one expert's range ----------------------------------------------
def range_sigmas(batch: int, shift: float, t_range: list[float] | tuple[float, float],
                 generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """s = shift(u), u ~ U(unshift(t_lo / 1000), unshift(t_hi / 1000)): the shifted density of
    `distill.losses.sample_sigmas` restricted to [t_lo, t_hi] (the shift is increasing, so the range maps to an
    interval of u). [B]; t_range [0, 1000] draws exactly what sample_sigmas draws."""
    lo, hi = (float(unshift_sigma(torch.tensor(t / 1000.0, dtype=torch.float64), shift)) for t in t_range)
    u = torch.rand(batch, generator=generator)
    return shift_sigma(lo + (hi - lo) * u.double(), shift).float().to(device)


def range_flow_matching_loss(net: nn.Module, x0: Tensor, cond: Cond, shift: float, t_range: list[float],
                             generator: torch.Generator | None = None) -> Tensor:
    """`distill.losses.flow_matching_loss` with timesteps drawn inside t_range only (the same draws in the same
    order: sigmas, then noise). x0 [B, C, F, H, W]; returns a scalar."""
    s = range_sigmas(x0.shape[0], shift, t_range, generator, x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0)
    v = cond(net, add_noise(x0, eps, s), timestep_of(s))
    return (v.float() - v_from_x0_eps(x0, eps).float()).pow(2).mean()


# ---- DMD with a two-expert teacher -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertGuidance(Guidance):
    """The teacher's CFG with one scale per expert: `scale` where t >= boundary_t (the high-noise expert),
    `low_scale` below; `interval` as in `Guidance` (w = 1 outside it). Wan2.2 T2V-A14B samples with 4.0 / 3.0."""

    low_scale: float = 1.0
    boundary_t: float = 1000.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.low_scale, bool) or not isinstance(self.low_scale, int | float) \
                or not math.isfinite(self.low_scale):
            raise ValueError(f"dmd.guide_scale_low must be a finite number, got {self.low_scale!r}")

    @property
    def enabled(self) -> bool:
        return self.scale != 1.0 or self.low_scale != 1.0

    def scales(self, t: Tensor) -> Tensor:
        """Per-sample w [B] for timesteps t [B] (on t's device)."""
        w = torch.where(t >= self.boundary_t, torch.full_like(t, self.scale, dtype=torch.float32),
                        torch.full_like(t, self.low_scale, dtype=torch.float32))
        if self.interval is None:
            return w
        inside = (t >= self.interval[0]) & (t <= self.interval[1])
        return torch.where(inside, w, torch.ones_like(w))


def real_guidance(cfg: TrainConfig, boundary: float) -> float | ExpertGuidance:
    """dmd.guide_scale, or with dmd.guide_scale_low one scale per expert of the teacher."""
    if cfg.dmd.guide_scale_low is None:
        return cfg.dmd.guide_scale
    iv = cfg.dmd.guide_interval
    return ExpertGuidance(cfg.dmd.guide_scale, None if iv is None else tuple(iv), cfg.dmd.guide_scale_low,
                          boundary * 1000.0)


def check_one_dit(cfg: TrainConfig) -> None:
    """A one-DiT teacher: the two-expert keys that would otherwise be ignored are errors."""
    if cfg.dmd.guide_scale_low is not None:
        raise ValueError(f"dmd.guide_scale_low is the low-noise expert's scale of a two-expert teacher, but model.path="
                         f"{cfg.model.path} holds one DiT: unset it (dmd.guide_scale applies)")
    if cfg.dmd.critic_side != "auto":
        raise ValueError(f"dmd.critic_side={cfg.dmd.critic_side} chooses how a two-expert teacher's critic timesteps "
                         f"are drawn, but model.path={cfg.model.path} holds one DiT: unset it")


def check_expert_files(folder: Path, key: str, distill: bool = False) -> None:
    """Open the header of every expert weights file of a two-expert folder: a truncated or garbled file is an
    error naming it (and the config key), before any model is built."""
    from safetensors import safe_open

    for name, d in zip(EXPERTS, expert_dirs(folder), strict=True):
        source, kind = find_expert_weights(folder, name, d, distill, None)
        files = sorted(Path(source).glob("*.safetensors")) if kind == "base" else [Path(source)]
        for f in (f for f in files if f.suffix == ".safetensors"):
            try:
                with safe_open(str(f), "pt"):
                    pass
            except Exception as e:  # safetensors' own error types (incomplete metadata, header too large, ...)
                raise ValueError(f"{f} ({key}, {name}) is not a complete safetensors file: {e}") from e


def check_dmd(cfg: TrainConfig) -> float:
    """The checks a two-expert DMD run needs before any model is read; returns the boundary."""
    teacher = Path(cfg.model.path)
    check_expert_files(teacher, "model.path")
    boundary = folder_boundary(teacher, cfg.model.boundary)
    if cfg.distributed.engine in ("fsdp", "hybrid") and cfg.dmd.critic_side == "per_sample":
        raise ValueError(f"dmd.critic_side=per_sample with distributed.engine={cfg.distributed.engine}: sharded "
                         f"experts need every rank to run the same expert; use per_call or auto")
    if cfg.distributed.engine in ("zero2", "zero3"):
        raise ValueError(f"a two-expert teacher ({teacher}) trains under ddp, fsdp or hybrid, got "
                         f"distributed.engine={cfg.distributed.engine}: the DeepSpeed engines wrap one DiT per network "
                         f"(use configs/accelerate/fsdp.yaml; docs/moe_distillation.md)")
    high_cfg = expert_config(expert_dirs(teacher)[0], moe_layout(teacher) == "diffusers")
    if high_cfg["model_type"] not in ("t2v", "i2v"):
        raise ValueError(f"{teacher} holds {high_cfg['model_type']} experts: two-expert DMD takes T2V-A14B or "
                         f"I2V-A14B experts")
    init = cfg.model.generator_init
    if init is not None:
        two = is_expert_folder(init)
        if two:
            check_expert_files(Path(init), "model.generator_init", distill=True)
        if cfg.dmd.generator == "per_expert" and not two:
            raise ValueError(f"model.generator_init={init} holds one DiT but dmd.generator=per_expert needs a "
                             f"two-expert folder (high_noise_model/ + low_noise_model/); set dmd.generator=shared "
                             f"to distil into one student")
        if cfg.dmd.generator == "shared" and two:
            raise ValueError(f"model.generator_init={init} is a two-expert folder but dmd.generator=shared trains "
                             f"one DiT: set dmd.generator=per_expert")
    high, low = student_split(cfg.distill.schedule(), boundary)
    if cfg.dmd.generator == "per_expert" and not (high and low):
        side = "high" if high else "low"
        raise ValueError(f"every student timestep {cfg.distill.schedule().timesteps().tolist()} is on the {side}-noise "
                         f"side of the boundary {boundary * 1000:g}: the other student expert would never train; "
                         f"set dmd.generator=shared")
    return boundary


def build_dmd(trainer) -> None:
    """DMDTrainer.build for a two-expert teacher (model.path): real score, generator, critic, EMA, optimizers."""
    from distill.adapters import with_lora
    from distill.ema import EMA
    from models.components import encoder_task, load_encoders

    cfg = trainer.cfg
    boundary = check_dmd(cfg)
    if trainer.engine:  # FSDP2: rank 0 reads, the experts are sharded block by block (distill/moe_sharded.py)
        from distill.moe_sharded import build_sharded_dmd

        return build_sharded_dmd(trainer, boundary)
    teacher = Path(cfg.model.path)
    real = load_pair(teacher, boundary, dtype=torch.float32)
    trainer.task = "i2v" if real.model_type in ("i2v", "flf2v") else "t2v"
    trainer.components_path = Path(cfg.model.components_path or teacher)
    trainer.vae, trainer.text_encoder, trainer.image_encoder = load_encoders(
        trainer.components_path, encoder_task(trainer.task, real), real.text_len)  # I2V-A14B: no CLIP
    dtype = torch.bfloat16 if cfg.dmd.real_score_dtype == "bf16" else torch.float32
    trainer.real_score = real.to(trainer.device, dtype).eval().requires_grad_(False)
    init = cfg.model.generator_init
    if cfg.lora.enabled:  # adapters on the ONE frozen copy of each teacher expert
        def make(_: str, layout: str) -> nn.Module:
            ad = lambda m: with_lora(m, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules)  # noqa: E731
            if layout == "shared":
                return ad(getattr(real, cfg.dmd.shared_init))
            return pair_of(ad(real.high_noise_model), ad(real.low_noise_model), boundary)
    else:
        def make(name: str, layout: str) -> nn.Module:
            if name == "generator" and init:
                net = load_pair(init, boundary, distill=True, dtype=torch.float32) if layout == "per_expert" \
                    else load_dit(init, distill=True, dtype=torch.float32)
            elif layout == "shared":
                net = copy.deepcopy(getattr(real, cfg.dmd.shared_init)).float()
            else:
                net = copy.deepcopy(real).float()
            return net.to(trainer.device).requires_grad_(True)
    gen, critic = make("generator", cfg.dmd.generator), make("critic", cfg.dmd.critic)
    for net in (gen, critic):
        net.train()
        set_checkpointing(net, cfg.model.gradient_checkpointing)
    trainer.ema = EMA(gen, cfg.dmd.ema_decay, cfg.dmd.ema_start)
    opt_g = trainer._optimizer("generator")(gen.parameters())
    opt_c = trainer._optimizer("critic")(critic.parameters())
    if trainer.accelerator.num_processes > 1:
        # DDP: a generator step runs one expert (the same on every rank: the exit step depends on (seed, step) only),
        # a critic batch may reach one expert on some ranks only. find_unused_parameters lets DDP finish the
        # reduction without them; a parameter unused on every rank keeps grad None, so AdamW leaves it alone.
        from accelerate.utils import DistributedDataParallelKwargs

        trainer.accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
    trainer.gen, trainer.critic, trainer.opt_g, trainer.opt_c = trainer.accelerator.prepare(gen, critic, opt_g, opt_c)
    trainer.trainable_only = cfg.lora.enabled
    trainer.boundary = boundary
    trainer.logger.event(0, f"two-expert teacher {teacher} (boundary {boundary * 1000:g}): generator "
                            f"{cfg.dmd.generator}, critic {cfg.dmd.critic}; student steps (high, low) = "
                            f"{student_split(cfg.distill.schedule(), boundary)}")
    trainer.real_guidance = real_guidance(cfg, boundary)
    trainer._finish_build(real.text_len)


# ---- ODE initialisation with a two-expert teacher ----------------------------------------------------------------
def load_teacher(cfg: TrainConfig, accelerator) -> nn.Module:
    """The teacher of model.path in fp32: one DiT, or for a two-expert folder the pair (the ODE task's trajectories
    then run each step's expert, and its generator, a copy, regresses every student step with the expert of that
    step's timestep; with several processes DDP then needs find_unused_parameters, as in `build_dmd`)."""
    if not is_expert_folder(cfg.model.path):
        return load_dit(cfg.model.path, dtype=torch.float32)
    teacher = Path(cfg.model.path)
    boundary = folder_boundary(teacher, cfg.model.boundary)
    check_expert_files(teacher, "model.path")
    if accelerator.num_processes > 1:
        from accelerate.utils import DistributedDataParallelKwargs

        accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
    return load_pair(teacher, boundary, dtype=torch.float32)


def set_checkpointing(net: nn.Module, on: bool) -> None:
    """Per-block activation checkpointing of a DiT or of both experts of a pair."""
    for m in (net.high_noise_model, net.low_noise_model) if isinstance(net, ExpertPair) else (net,):
        m.gradient_checkpointing = on


def pair_student(trainer, ema: bool, sampling: bool) -> LoadedExperts | None:
    """The generator pair as plain DiTs (EMA weights if `ema`; LoRA mode: adapters merged), fp32 on the host or,
    `sampling`, on the training device in the training dtype. Sharded engines: rank 0 only (None elsewhere)."""
    from distill.adapters import merged

    if trainer.engine:  # sharded: gathered on rank 0, None elsewhere (a collective)
        from distill.moe_sharded import gathered_pair

        return gathered_pair(trainer, ema, sampling)
    gen = trainer.unwrap(trainer.gen)
    state = trainer.ema.state_dict() if ema else None
    if trainer.cfg.lora.enabled:
        out = merged(gen, state)
    else:
        out = copy.deepcopy(gen)
        if state is not None:
            trainer.ema.copy_to(out)
    device, dtype = (trainer.device, trainer.train_dtype) if sampling else ("cpu", torch.float32)
    return out.to(device, dtype).eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Two-expert folders: assemble one from two one-DiT folders.")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("assemble", help="components at the root + high_noise_model/ + low_noise_model/ + experts.json")
    a.add_argument("--high", required=True, help="one-DiT folder of the high-noise expert")
    a.add_argument("--low", required=True, help="one-DiT folder of the low-noise expert")
    a.add_argument("--out", required=True)
    a.add_argument("--boundary", type=float, required=True, help="fraction of 1000 (Wan2.2 T2V 0.875, I2V 0.900)")
    a.add_argument("--components", help="folder whose components go to the root (default: --high)")
    args = p.parse_args(argv)
    out = assemble(args.high, args.low, args.out, args.boundary, args.components)
    print(f"wrote {out} (boundary {args.boundary})")


if __name__ == "__main__":
    main()
