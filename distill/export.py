"""Export a training run to what inference consumes.

    python -m distill.export --run runs/tiny_t2v_dmd --out checkpoints/tiny-t2v-distill-4step \
        [--weights ema|raw] [--checkpoint runs/.../step_00000400] [--dtype bf16|fp32] \
        [--lora checkpoints/tiny-t2v-distill-lora-r64.safetensors --lora-rank 64]

- pretrain runs -> a Wan-style folder with `diffusion_pytorch_model.safetensors` (the teacher);
- dmd/ode runs -> `distill_models/distill_model.safetensors` (official Wan keys) + config.json + components;
- LoRA-mode dmd runs (`lora.enabled`): the adapters merged into the teacher; `--lora` writes the adapter itself
  (exact, its own rank and alpha);
- `--lora`: a rank-r LoRA of (student - teacher) in the LightX2V format (docs/step_distillation.md "LoRA exports"):
  2-D weights with >= `--lora-min-numel` entries as `diffusion_model.<name>.lora_up/lora_down.weight` from a
  truncated SVD (up = U_r sqrt(S_r), down = sqrt(S_r) V_r^T, no alpha), all other changed tensors as full differences
  `.diff` (weights), `.diff_b` (biases), `.diff_m` (modulation). The relative reconstruction error per tensor
  is printed and written next to the file as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from distill.adapters import lightx2v_lora, merged, with_lora
from distill.checkpoint import resume_candidate, verify_checkpoint
from distill.config import DistillConfig
from distill.moe import is_expert_folder
from distill.moe_export import export_run
from inference.schedule import StudentSchedule, write_schedule
from models.components import build_dit, copy_components, load_dit
from models.loading import DISTILL_DIR, DIT_CONFIG, load_into, read_json, write_dit_folder, write_safetensors

LORA_PREFIX = "diffusion_model."
NETWORK = {"pretrain": "model", "ode": "generator", "dmd": "generator"}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def svd_lora(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factorisation delta ~ up @ down (Eckart-Young): up = U_r sqrt(S_r), down = sqrt(S_r) V_r^T."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    return (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float()


def diff_suffix(name: str) -> tuple[str, str]:
    """(target module, suffix) for a full-difference entry: weight -> .diff, bias -> .diff_b, modulation ->
    .diff_m (a parameter without a module: `blocks.0.modulation` -> `blocks.0.diff_m`)."""
    if name.endswith(".weight"):
        return name[: -len(".weight")], "diff"
    if name.endswith(".bias"):
        return name[: -len(".bias")], "diff_b"
    if name.endswith("modulation"):
        return name[: -len(".modulation")] if "." in name else "", "diff_m"
    raise ValueError(f"cannot name a difference for tensor {name!r}")


def extract_lora(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], rank: int = 64,
                 min_numel: int = 1_000_000) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """LightX2V-format LoRA of tuned - base; returns (tensors, relative Frobenius error per LoRA'd tensor)."""
    missing = sorted(set(base) ^ set(tuned))
    if missing:
        raise ValueError(f"base and tuned networks differ in keys, e.g. {missing[:5]} ({len(missing)} in all)")
    out: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    for name in sorted(tuned):
        delta = tuned[name].float() - base[name].float()
        if not delta.any():
            continue
        if delta.ndim == 2 and delta.numel() >= min_numel and rank < min(delta.shape):
            up, down = svd_lora(delta, rank)
            module = name[: -len(".weight")]
            out[f"{LORA_PREFIX}{module}.lora_up.weight"] = up
            out[f"{LORA_PREFIX}{module}.lora_down.weight"] = down
            errors[name] = float((delta - up @ down).norm() / delta.norm())
        else:
            module, suffix = diff_suffix(name)
            key = f"{LORA_PREFIX}{module}.{suffix}" if module else f"{LORA_PREFIX}{suffix}"
            out[key] = delta
    return out, errors


def run_schedule(info: dict) -> StudentSchedule:
    """The student schedule a distillation run trained with (its resolved config's `distill` section)."""
    d = info.get("distill", {})
    return DistillConfig(**{k: d[k] for k in ("denoising_step_list", "sample_shift") if k in d}).schedule()


def run_info(run: Path) -> dict:
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run} is not a training run (no config.yaml)")
    return OmegaConf.to_container(OmegaConf.load(cfg_path))


def run_checkpoint(run: Path, checkpoint: Path | None) -> Path:
    """The checkpoint to export: the one given (verified against its manifest), else the newest intact one of
    the run (the same choice as a resume: a torn newer checkpoint is skipped, saying why)."""
    if checkpoint is not None:
        reason = verify_checkpoint(checkpoint)
        if reason is not None:
            raise ValueError(f"checkpoint {checkpoint} is not intact: {reason}")
        return checkpoint
    ckpt, skipped = resume_candidate(run / "checkpoints")
    for path, reason in skipped:
        print(f"export: skipping {path}: {reason}")
    if ckpt is None:
        raise FileNotFoundError(f"no intact checkpoint under {run / 'checkpoints'}")
    return ckpt


def load_run_network(run: Path, checkpoint: Path | None, weights: str) -> tuple[torch.nn.Module, dict]:
    """The trained DiT of a run (EMA or raw weights) and the run's config."""
    from safetensors.torch import load_file

    info = run_info(run)
    ckpt = run_checkpoint(run, checkpoint)
    name = "ema" if weights == "ema" else NETWORK[info["task"]]
    state = load_file(str(ckpt / f"{name}.safetensors"))
    if info.get("lora", {}).get("enabled"):  # LoRA-mode DMD: adapters only; merge them into the teacher
        return merged(lora_run_generator(info, state)), info
    if info["task"] == "pretrain":
        from models.registry import get_spec

        config = get_spec(info["model"]["spec"]).dit
    else:
        config = read_json(Path(info["model"]["path"]) / DIT_CONFIG)
    net = build_dit(config, "meta")
    if weights == "ema":  # the EMA tracks trainable parameters only: complete it with the raw buffers
        raw = load_file(str(ckpt / f"{NETWORK[info['task']]}.safetensors"))
        state = {**raw, **state}
    return load_into(net, state, f"{ckpt}/{name}.safetensors"), info


def lora_run_generator(info: dict, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The teacher with the run's adapters (LoRA-mode DMD), loaded with the checkpoint's adapter `state`."""
    lora = info["lora"]
    gen = with_lora(load_dit(info["model"]["path"]), lora["rank"], lora["alpha"], lora["target_modules"])
    want = {k for k, p in gen.named_parameters() if p.requires_grad}
    if want != set(state):
        raise KeyError(f"the checkpoint's adapters do not match lora.rank/target_modules of the run: missing "
                       f"{sorted(want - set(state))[:5]}, unexpected {sorted(set(state) - want)[:5]}")
    gen.load_state_dict(state, strict=False)
    return gen


def lora_adapter_file(run: Path, checkpoint: Path | None, weights: str, info: dict) -> dict[str, torch.Tensor]:
    """LightX2V tensors of a LoRA-mode run's generator adapter (EMA or raw)."""
    from safetensors.torch import load_file

    ckpt = run_checkpoint(run, checkpoint)
    state = load_file(str(ckpt / f"{'ema' if weights == 'ema' else 'generator'}.safetensors"))
    return lightx2v_lora(lora_run_generator(info, state))


def export(run: Path, out: Path, weights: str = "ema", checkpoint: Path | None = None, dtype: str = "bf16",
           lora: Path | None = None, lora_rank: int = 64, lora_min_numel: int = 1_000_000) -> Path:
    info = run_info(run)
    if info["task"] == "dmd" and is_expert_folder(info["model"]["path"]):  # a two-expert teacher: distill/moe.py
        return export_run(run, out, info, run_checkpoint(run, checkpoint), weights, DTYPES[dtype],
                          None if lora is None else Path(lora), lora_rank, lora_min_numel)
    net, info = load_run_network(run, checkpoint, weights)
    components = Path(info["model"]["components_path"] or info["model"]["path"])
    if info["task"] == "pretrain":
        write_dit_folder(out, net, DTYPES[dtype])
    else:
        write_dit_folder(out, net, DTYPES[dtype], weights_name=f"{DISTILL_DIR}/distill_model.safetensors")
        write_schedule(out, run_schedule(info))
    copy_components(components, out)
    print(f"wrote {out} ({info['task']}, {weights} weights, {dtype})")
    if lora is not None:
        if info["task"] == "pretrain":
            raise ValueError("--lora needs a distillation run (dmd/ode): the LoRA is student - teacher")
        if info.get("lora", {}).get("enabled"):  # the adapter itself: exact, no SVD
            tensors, errors = lora_adapter_file(run, checkpoint, weights, info), {}
            lora_rank = info["lora"]["rank"]
        else:
            base = load_dit(info["model"]["path"]).state_dict()
            student = {k: v.to(DTYPES[dtype]) for k, v in net.state_dict().items()}  # the exported weights
            tensors, errors = extract_lora(base, student, lora_rank, lora_min_numel)
        write_safetensors(tensors, lora, torch.bfloat16 if dtype == "bf16" else None,
                          metadata={"rank": str(lora_rank), "format": "lightx2v"})
        Path(lora).with_suffix(".errors.json").write_text(json.dumps(errors, indent=1))
        worst = max(errors.values(), default=0.0)
        print(f"wrote {lora}: {len(tensors)} tensors, rank {lora_rank}, {len(errors)} SVD factors "
              f"(relative error mean {sum(errors.values()) / max(len(errors), 1):.4f}, max {worst:.4f})")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="training run directory (holds config.yaml and checkpoints/)")
    p.add_argument("--out", required=True, help="Wan-style output folder")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema")
    p.add_argument("--checkpoint", help="a checkpoint folder (default: the run's latest)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--lora", help="also write a LightX2V-format LoRA of (student - teacher) to this file")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--lora-min-numel", type=int, default=1_000_000,
                   help="2-D weights smaller than this are stored as full differences (.diff)")
    a = p.parse_args(argv)
    export(Path(a.run), Path(a.out), a.weights, Path(a.checkpoint) if a.checkpoint else None, a.dtype,
           Path(a.lora) if a.lora else None, a.lora_rank, a.lora_min_numel)


if __name__ == "__main__":
    main()
