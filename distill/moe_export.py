"""Export of two-expert (Wan2.2 A14B) students: docs/moe_distillation.md "Export".

`write_student` writes the official two-expert layout with the student weights at LightX2V's path
(`distill_models/<expert>/distill_model.safetensors`), `schedule.json` and `experts.json`; `export_pair` is
DMDTrainer.export for a generator pair (LoRA mode: `loras/{high,low}_noise_model.safetensors`, the Wan2.2-Lightning
file names); `export_run` is `python -m distill.export` for a run with a two-expert teacher.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from distill.moe import EXPERTS, HIGH, LORA_DIR, LOW, folder_boundary, load_pair, pair_of, pair_student, write_experts
from inference.schedule import StudentSchedule, write_schedule
from models.components import copy_components
from models.loading import DISTILL_DIR, DIT_CONFIG


def write_student(out: str | Path, student: nn.Module, components: str | Path, schedule: StudentSchedule,
                  boundary: float, dtype: torch.dtype | None = None) -> Path:
    """A two-expert student folder: components at the root, `<expert>/config.json`, the weights at LightX2V's
    `distill_models/<expert>/distill_model.safetensors`, schedule.json and experts.json (steps per expert)."""
    from models.loading import write_safetensors

    out = Path(out)
    for name in EXPERTS:
        expert = getattr(student, name)
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / DIT_CONFIG).write_text(json.dumps(expert.config, indent=2) + "\n")
        write_safetensors(expert.state_dict(), out / DISTILL_DIR / name / "distill_model.safetensors", dtype)
    copy_components(components, out)
    write_schedule(out, schedule)
    write_experts(out, boundary, schedule)
    return out


def export_pair(trainer) -> Path:
    """DMDTrainer.export for a generator pair; LoRA mode adds each expert's adapter as a LightX2V LoRA,
    `loras/high_noise_model.safetensors` and `loras/low_noise_model.safetensors`."""
    from distill.adapters import lightx2v_lora
    from models.loading import write_safetensors

    cfg = trainer.cfg
    out = Path(cfg.output_model or trainer.run_dir / "model")
    use_ema = trainer.step > cfg.dmd.ema_start
    student = pair_student(trainer, use_ema, False)
    if student is None:  # a sharded engine's rank > 0: its shards went into the gather
        return out
    write_student(out, student, trainer.components_path, cfg.distill.schedule(), trainer.boundary)
    if cfg.lora.enabled:
        gen, state = trainer.unwrap(trainer.gen), trainer.ema.state_dict() if use_ema else None
        for name in EXPERTS:
            sub = None if state is None else split_state(state, name)
            write_safetensors(lightx2v_lora(getattr(gen, name), sub), out / LORA_DIR / f"{name}.safetensors",
                              metadata={"rank": str(cfg.lora.rank), "format": "lightx2v"})
        trainer.logger.event(trainer.step, f"exported the generator experts' adapters to {out / LORA_DIR}")
    trainer.logger.event(trainer.step, f"exported the two-expert student to {out}")
    return out


def split_state(state: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """The tensors of expert `name` in an ExpertPair state dict, without the `<name>.` prefix."""
    return {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}


def export_run(run: Path, out: Path, info: dict, ckpt: Path, weights: str, dtype: torch.dtype,
               lora: Path | None, lora_rank: int, lora_min_numel: int) -> Path:
    """`python -m distill.export` for a two-expert-teacher DMD run: a generator pair -> the two-expert student
    folder (and with --lora a FOLDER of high_noise_model.safetensors + low_noise_model.safetensors, SVD of each
    student expert minus its teacher expert, or LoRA mode's adapters); a shared generator -> a one-DiT student
    (and --lora a file: the LoRA against the teacher expert it started from, dmd.shared_init)."""
    from safetensors.torch import load_file

    from distill.adapters import lightx2v_lora, merged, with_lora
    from distill.config import DistillConfig
    from distill.export import extract_lora
    from models.components import build_dit
    from models.loading import load_into, write_dit_folder, write_safetensors

    teacher, dmd = Path(info["model"]["path"]), info.get("dmd", {})
    boundary = folder_boundary(teacher, info["model"].get("boundary"))
    d = info.get("distill", {})
    schedule = DistillConfig(**{k: d[k] for k in ("denoising_step_list", "sample_shift") if k in d}).schedule()
    raw = load_file(str(ckpt / "generator.safetensors"))
    state = {**raw, **load_file(str(ckpt / "ema.safetensors"))} if weights == "ema" else raw
    names = list(EXPERTS) if dmd.get("generator", "per_expert") == "per_expert" else [dmd.get("shared_init", LOW)]
    lcfg = info.get("lora", {})
    nets, bases = {}, {}
    real = load_pair(teacher, boundary)
    for name in names:
        sub = split_state(state, name) if len(names) == 2 else state
        base = getattr(real, name)
        bases[name] = base.state_dict()
        if lcfg.get("enabled"):
            net = with_lora(base, lcfg["rank"], lcfg["alpha"], lcfg["target_modules"])
            net.load_state_dict(sub, strict=False)
            nets[name] = net
        else:
            nets[name] = load_into(build_dit(base.config, "meta"), sub, f"{ckpt} {name}")
    components = Path(info["model"].get("components_path") or teacher)
    plain = {k: merged(v) if lcfg.get("enabled") else v for k, v in nets.items()}
    if len(names) == 2:
        write_student(out, pair_of(plain[HIGH], plain[LOW], boundary), components, schedule, boundary, dtype)
    else:
        write_dit_folder(out, plain[names[0]], dtype, weights_name=f"{DISTILL_DIR}/distill_model.safetensors")
        copy_components(components, out)
        write_schedule(out, schedule)
    print(f"wrote {out} (two-expert teacher, generator {'pair' if len(names) == 2 else names[0]}, {weights} weights)")
    if lora is None:
        return out
    for name in names:
        if lcfg.get("enabled"):
            tensors, rank = lightx2v_lora(nets[name]), lcfg["rank"]
        else:
            student = {k: v.to(dtype) if dtype is not None else v for k, v in plain[name].state_dict().items()}
            tensors, _ = extract_lora(bases[name], student, lora_rank, lora_min_numel)
            rank = lora_rank
        path = Path(lora) / f"{name}.safetensors" if len(names) == 2 else Path(lora)
        write_safetensors(tensors, path, torch.bfloat16 if dtype == torch.bfloat16 else None,
                          metadata={"rank": str(rank), "format": "lightx2v"})
        print(f"wrote {path}: {len(tensors)} tensors, rank {rank}")
    return out
