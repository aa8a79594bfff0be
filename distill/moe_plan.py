"""Memory plan of DMD with a two-expert (Wan2.2 A14B) teacher: distill/plan.py's one-DiT plan, per item scaled by
how many expert-sized copies of it the run holds (docs/moe_distillation.md).

    python -m distill.moe_plan --table [--gpu-mem 80]     # the T2V-A14B config: full (both critic layouts), LoRA

Per GPU, with g = generator networks (2: `dmd.generator=per_expert`, 1: shared) and c = critic networks (2 or 1):
- trainable parameters and AdamW states: g + c expert-sized networks (distill/plan.py counts 2: generator + critic);
- the frozen teacher: 2 experts (LoRA mode: the two teacher experts are the bases every adapter shares);
- gradients: one network's at a time; the generator's exit step runs ONE expert, so its gradients are one expert's,
  but a per-expert critic sees critic timesteps on both sides in one batch, so its step holds c experts' gradients;
  AdamW's foreach temporary likewise (the generator's step touches the expert that has gradients);
- the EMA: g experts; activations, gathered block weights and FLOPs: unchanged (each forward runs one expert).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from distill.config import TrainConfig, load_train_config
from distill.plan import ENGINES, GB, GPU_RESERVE_GB, Plan, count_params, dit_config, estimate, host_memory

REPO = Path(__file__).resolve().parents[1]
A14B_CONFIGS = {"Wan2.2-T2V-A14B": "configs/train/wan/t2v_a14b_dmd.yaml",
                "Wan2.2-I2V-A14B": "configs/train/wan/i2v_a14b_dmd.yaml"}
STEP_ONLY = ("gradients (fp32, one network at a time)", "optimizer step temporary (fp32)")
BACKWARD_ONLY = ("activations", "bf16 weight casts (autocast)")
PEAKS = ("peak in backward", "peak in optimizer step", "peak")


def two_experts(cfg: TrainConfig) -> bool:
    """A DMD config whose teacher is a two-expert model (model.path a two-expert folder, or a model.spec with
    experts, as Wan2.2's official folders carry no marker the planner could read without the files)."""
    from distill.moe import is_expert_folder
    from models.registry import get_spec

    return cfg.task == "dmd" and (is_expert_folder(cfg.model.path) or bool(get_spec(cfg.model.spec).experts))


def expert_counts(cfg: TrainConfig) -> dict[str, int]:
    """Expert-sized networks: generator, critic, teacher."""
    return {"generator": 2 if cfg.dmd.generator == "per_expert" else 1,
            "critic": 2 if cfg.dmd.critic == "per_expert" else 1, "teacher": 2}


@dataclass
class ExpertPlan(Plan):
    experts: dict[str, int] = field(default_factory=dict)

    def table(self) -> str:
        e = self.experts
        head = (f"two-expert teacher (Wan2.2 A14B): generator {e['generator']} expert(s), critic {e['critic']}, "
                f"frozen teacher {e['teacher']}; parameters below are per expert")
        return head + "\n" + super().table()


def estimate_experts(cfg: TrainConfig, engine: str = "ddp", gpus: int = 1, gpus_per_node: int = 8,
                     offload: bool = False) -> ExpertPlan:
    """distill/plan.py's estimate for a two-expert teacher (see the module docstring)."""
    one = estimate(cfg, engine, gpus, gpus_per_node, offload, experts=False)
    n = expert_counts(cfg)
    g, c = n["generator"], n["critic"]
    scale = {"trainable parameters (fp32)": (g + c) / 2, "frozen parameters (teacher / shared base)": 2.0,
             "gradients (fp32, one network at a time)": float(c), "AdamW states (2 x fp32)": (g + c) / 2,
             "EMA (fp32)": float(g), "optimizer step temporary (fp32)": float(c)}
    mem = {k: v * scale.get(k, 1.0) for k, v in one.memory.items() if k not in PEAKS}
    mem["peak in backward"] = sum(v for k, v in mem.items() if k not in STEP_ONLY)
    mem["peak in optimizer step"] = sum(v for k, v in mem.items() if k not in BACKWARD_ONLY + ("peak in backward",))
    mem["peak"] = max(mem["peak in backward"], mem["peak in optimizer step"])
    cpu = {k: v * scale.get(k, 1.0) for k, v in one.cpu_memory.items()}
    # weights read at start-up: DDP builds every network in fp32 per process (LoRA mode: the 2 teacher experts);
    # sharded engines read one expert at a time
    params, _, _, _ = count_params(dit_config(cfg))
    copies = 2 if cfg.lora.enabled else 2 + g + c
    read = params * copies / (1 if cfg.lora.enabled else 3) if engine == "ddp" else params
    host = host_memory(cfg, int(read), engine, gpus, sum(cpu.values()), gpus_per_node)
    disk = (12 * (g + c) + 4 * g) * one.trainable / GB  # every expert network's fp32 weights + AdamW; EMA x g
    return ExpertPlan(one.params, one.trainable, one.tokens, engine, gpus, mem, cpu, one.flops_per_iter, host,
                      checkpoint_gib=disk, experts=n)


def min_gpus_experts(cfg: TrainConfig, engine: str, gpu_mem: float, offload: bool = False,
                     candidates: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)) -> tuple[int | None, ExpertPlan]:
    plan = None
    for p in candidates:
        if engine == "hybrid" and p > 8 and p % 8:
            continue
        plan = estimate_experts(cfg, engine, p, offload=offload)
        if plan.peak <= gpu_mem - GPU_RESERVE_GB:
            return p, plan
    return None, plan


def a14b_table(gpu_mem: float = 80.0) -> str:
    """Markdown: minimum GPUs of `gpu_mem` GiB for two-expert DMD (full with each critic layout, LoRA). † = planned
    only: pairs run under ddp, fsdp and hybrid (distill/moe_sharded.py), not ZeRO, and LoRA mode not sharded."""
    rows = [f"| model | mode | {' | '.join(ENGINES)} | fsdp + CPU offload |", "|---|---|" + "---|" * (len(ENGINES) + 1)]
    modes = {"full, critic per_expert": [], "full, critic shared": ["dmd.critic=shared"],
             "LoRA, critic per_expert": ["lora.enabled=true"]}
    for name, path in A14B_CONFIGS.items():
        for mode, overrides in modes.items():
            cfg = load_train_config(REPO / path, overrides)
            cells = []
            for engine, offload in [(e, False) for e in ENGINES] + [("fsdp", True)]:
                p, plan = min_gpus_experts(cfg, engine, gpu_mem, offload)
                runs = engine == "ddp" or (engine in ("fsdp", "hybrid") and not cfg.lora.enabled)
                mark = "" if runs else " †"
                cells.append((f"{p} ({plan.peak:.0f} GiB)" if p else f"> 128 ({plan.peak:.0f} GiB at 128)") + mark)
            rows.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", action="store_true")
    p.add_argument("--gpu-mem", type=float, default=80.0)
    a = p.parse_args(argv)
    if a.table:
        print(f"Minimum number of {a.gpu_mem:.0f} GiB GPUs for two-expert DMD (per-GPU peak; {GPU_RESERVE_GB:.0f} GiB "
              f"reserved), batch 1 per GPU, 81 frames at 480x832, per-block checkpointing, bf16 teacher:\n")
        print(a14b_table(a.gpu_mem))


if __name__ == "__main__":
    main()
