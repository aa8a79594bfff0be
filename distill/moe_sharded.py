"""Two-expert (Wan2.2 A14B) DMD under FSDP2 (`distributed.engine=fsdp|hybrid`; docs/moe_distillation.md).

The one-DiT sharded build (distill/dmd.py `_build_sharded`) for expert pairs: rank 0 reads the weights, the other
ranks build meta skeletons, and the engine shards every block of both experts, each expert and the pair
(distill/engine_fsdp.py). Each all-gather is a collective, so every rank must run the same expert at the same
moment. The generator's expert is already the same everywhere (the exit step and the student timesteps depend on
(seed, step) only). The critic timesteps that route the teacher's and the critic's experts are drawn per sample
and per rank, so a sharded run draws the *side* of the boundary once per call from a generator seeded by
(seed, step, phase) (`distill/losses.py` `side_draw`) and each sample's timestep inside it: every rank reaches
the same expert, and each sample's timestep keeps the distribution of the plain draw.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from distill.losses import ExpertSide, side_draw
from models.components import build_dit
from models.loading import DIT_CONFIG, load_into, read_json
from models.moe import EXPERTS
from models.moe_loading import LoadedExperts, expert_config, expert_dirs, moe_layout

SHARDED_PAIR_ENGINES = ("fsdp", "hybrid")


def pair_skeleton(folder: Path, boundary: float) -> LoadedExperts:
    """The two experts of a two-expert folder built on the meta device (sizes from their configs)."""
    from distill.moe import pair_of

    diffusers = moe_layout(folder) == "diffusers"
    return pair_of(*(build_dit(expert_config(d, diffusers), "meta") for d in expert_dirs(folder)), boundary)


def pair_weights(folder: Path, boundary: float, is_loader: bool,
                 distill: bool = False) -> tuple[LoadedExperts, dict[str, Tensor] | None]:
    """(meta skeleton, the full fp32 state dict on the loading rank, None elsewhere) of a two-expert folder."""
    from distill.moe import load_pair

    skeleton = pair_skeleton(folder, boundary)
    if not is_loader:
        return skeleton, None
    return skeleton, load_pair(folder, boundary, distill=distill, dtype=torch.float32).state_dict()


def one_expert(skeleton: LoadedExperts, state: dict[str, Tensor] | None, name: str
               ) -> tuple[nn.Module, dict[str, Tensor] | None]:
    """Expert `name` of a pair's (skeleton, state) as one DiT (the shared generator / critic layout)."""
    from distill.moe_export import split_state

    return getattr(skeleton, name), None if state is None else split_state(state, name)


def build_sharded_dmd(trainer, boundary: float) -> None:
    """DMDTrainer.build for a two-expert teacher under FSDP2: real score, generator and critic (pairs or one DiT,
    `dmd.generator` / `dmd.critic`), EMA of this rank's generator shards."""
    from distill.ema import EMA
    from distill.moe import real_guidance, set_checkpointing, student_split
    from models.components import encoder_task, load_dit, load_encoders

    cfg, engine = trainer.cfg, trainer.engine
    teacher = Path(cfg.model.path)
    real_dtype = torch.bfloat16 if cfg.dmd.real_score_dtype == "bf16" else torch.float32
    skeleton, state = pair_weights(teacher, boundary, engine.is_loader)
    text_len, model_type = skeleton.text_len, skeleton.model_type
    trainer.real_score = engine.frozen(skeleton, state, real_dtype)
    del state
    init = cfg.model.generator_init
    for name, layout in (("generator", cfg.dmd.generator), ("critic", cfg.dmd.critic)):
        if name == "generator" and init:
            if layout == "per_expert":
                net, state = pair_weights(Path(init), boundary, engine.is_loader, distill=True)
            else:
                net = build_dit(read_json(Path(init) / DIT_CONFIG), "meta")
                state = load_dit(init, distill=True, dtype=torch.float32).state_dict() if engine.is_loader else None
        else:
            net, state = pair_weights(teacher, boundary, engine.is_loader)
            if layout == "shared":
                net, state = one_expert(net, state, cfg.dmd.shared_init)
        set_checkpointing(net, cfg.model.gradient_checkpointing)
        clip = cfg.optim.grad_clip if name == "generator" else cfg.dmd.grad_clip_critic
        trainer.networks[name], trainer.optimizers[name] = engine.trainable(name, net.train(), state,
                                                                            trainer._optimizer(name), clip)
        del state
    trainer.gen, trainer.critic = trainer.networks["generator"], trainer.networks["critic"]
    trainer.opt_g, trainer.opt_c = trainer.optimizers["generator"], trainer.optimizers["critic"]
    trainer.task = "i2v" if model_type in ("i2v", "flf2v") else "t2v"
    trainer.components_path = Path(cfg.model.components_path or teacher)
    trainer.vae, trainer.text_encoder, trainer.image_encoder = load_encoders(
        trainer.components_path, encoder_task(trainer.task, skeleton), text_len)  # I2V-A14B: no CLIP
    trainer.ema = EMA(trainer.unwrap(trainer.gen), cfg.dmd.ema_decay, cfg.dmd.ema_start, local=engine.ema_local)
    trainer.trainable_only = False
    trainer.boundary = boundary
    trainer.logger.event(0, f"two-expert teacher {teacher} (boundary {boundary * 1000:g}) under {engine.name}: "
                            f"generator {cfg.dmd.generator}, critic {cfg.dmd.critic}; student steps (high, low) = "
                            f"{student_split(cfg.distill.schedule(), boundary)}; critic timesteps on one side per "
                            f"call")
    trainer.real_guidance = real_guidance(cfg, boundary)
    trainer._finish_build(text_len)


def per_call(cfg, sharded: bool) -> bool:
    """Whether a two-expert run draws its critic timesteps' side per call (`dmd.critic_side`; auto: when sharded)."""
    return cfg.dmd.critic_side == "per_call" or (cfg.dmd.critic_side == "auto" and sharded)


def call_side(trainer, step: int, phase: int, micro: int) -> ExpertSide | None:
    """The side of the boundary for the critic timesteps of (step, phase, micro-batch), the same on every rank,
    when the run draws per call (`per_call`; two-expert teachers only); None (per-sample draws) otherwise."""
    if not (hasattr(trainer, "boundary") and per_call(trainer.cfg, bool(trainer.engine))):
        return None
    from distill.dmd import seeded

    d = trainer.cfg.dmd
    shared = seeded(trainer.cfg.seed, step, phase, micro, 11)
    return side_draw(d.timestep_shift, trainer.boundary, d.t_min, d.t_max, shared)


def gathered_pair(trainer, ema: bool, sampling: bool) -> LoadedExperts | None:
    """The sharded generator pair gathered (a collective: every rank calls it) into plain DiTs on rank 0 (EMA
    weights if `ema`), fp32 on the host or, `sampling`, on the training device in the training dtype; None on the
    other ranks."""
    from distill.moe import pair_of

    engine, gen = trainer.engine, trainer.unwrap(trainer.gen)
    state = engine.full_state_dict(trainer.gen)
    if ema:
        state.update(engine.full_ema(trainer.ema, trainer.gen))
    if not trainer.is_main:
        return None
    device, dtype = (trainer.device, trainer.train_dtype) if sampling else ("cpu", torch.float32)
    state = {k: (v := state.pop(k)).to(device, dtype if v.is_floating_point() else None) for k in list(state)}
    skeleton = pair_of(*(build_dit(getattr(gen, name).config, "meta") for name in EXPERTS), gen.boundary)
    return load_into(skeleton, state, "gathered generator pair").eval().requires_grad_(False)
