"""Memory and compute estimate of a training config, printed by `train.py --dry-run`.

Per process, single-GPU view (no sharding): parameters of every network in the task, gradients and AdamW states
of the trainable ones, the EMA copy, and activations of one DiT forward+backward (with and without per-block
checkpointing); FLOPs per iteration from the DiT's linear layers and attention. Sizes come from the registry spec
(`model.spec`) or from `<model.path>/config.json` when it exists, so real sizes are planned without weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from distill.config import TrainConfig
from models.registry import get_spec
from models.wan_model import WanModel

GB = 1024**3


@dataclass
class Plan:
    params: int  # parameters of one DiT
    tokens: int  # tokens per sample
    memory: dict[str, float]  # GiB per item
    flops_per_iter: float

    def table(self) -> str:
        rows = [f"DiT parameters: {self.params / 1e9:.3f} B; tokens per sample: {self.tokens}"]
        rows += [f"  {k:<40s}{v:10.2f} GiB" for k, v in self.memory.items()]
        rows.append(f"  FLOPs per iteration and process (x grad_accum): {self.flops_per_iter / 1e12:.2f} TFLOP")
        return "\n".join(rows)


def dit_config(cfg: TrainConfig) -> dict:
    if cfg.model.path and (Path(cfg.model.path) / "config.json").is_file():
        return json.loads((Path(cfg.model.path) / "config.json").read_text())
    return get_spec(cfg.model.spec).dit


def count_params(config: dict) -> tuple[int, int]:
    """(all parameters, parameters of Linear layers) of a DiT built on the meta device."""
    with torch.device("meta"):
        model = WanModel.from_config(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return sum(p.numel() for p in model.parameters()), linear


def estimate(cfg: TrainConfig) -> Plan:
    config = dit_config(cfg)
    n, n_linear = count_params(config)
    f = 1 + (cfg.data.num_frames - 1) // 4
    tokens = f * (cfg.data.height // 16) * (cfg.data.width // 16)
    d, layers, ctx = config["dim"], config["num_layers"], config["text_len"]
    b = cfg.batch_size
    mixed = cfg.mixed_precision != "no"
    act_bytes = 2 if mixed else 4
    trainable = {"pretrain": 1, "ode": 1, "dmd": 2}[cfg.task]  # networks with gradients and AdamW states
    frozen = {"pretrain": 0, "ode": 0, "dmd": 1}[cfg.task]
    ema = cfg.task in ("pretrain", "dmd")
    # A block keeps ~ (12 D + 2 ffn) values per token for backward (inputs of its linears, norms, gates);
    # with checkpointing only the block inputs (D per token) plus one block's worth are kept.
    per_block = b * tokens * (12 * d + 2 * config["ffn_dim"]) * act_bytes
    full = per_block * layers
    ckpt = b * tokens * d * 4 * layers + per_block
    memory = {
        "parameters": (trainable * 4 + frozen * (2 if cfg.dmd.real_score_dtype == "bf16" else 4)) * n / GB,
        "gradients (fp32)": trainable * 4 * n / GB,
        "AdamW states (2 x fp32)": trainable * 8 * n / GB,
        "EMA (fp32)": (4 * n if ema else 0) / GB,
        "activations, no checkpointing": full / GB,
        "activations, per-block checkpointing": ckpt / GB,
    }
    act = ckpt if cfg.model.gradient_checkpointing else full
    memory["peak (estimate)"] = sum(v for k, v in memory.items() if not k.startswith("activations")) + act / GB
    # FLOPs: 2 per MAC; forward linear 2 N_lin T, attention 4 T^2 D (self) + 4 T L_ctx D (cross) per layer.
    fwd = b * (2 * n_linear * tokens + layers * (4 * tokens**2 * d + 4 * tokens * ctx * d))
    steps = len(cfg.distill.denoising_step_list)
    per_task = {
        "pretrain": 3 * fwd,  # forward + backward (2x)
        "ode": 3 * fwd,
        # generator iteration (every ratio): rollout (~steps/2 no-grad) + graded step (3x) + real with CFG (2x)
        # + fake (1x); critic every iteration: rollout + forward/backward (3x)
        "dmd": (steps / 2 + 3 + 2 + 1) * fwd / cfg.dmd.dfake_gen_update_ratio + (steps / 2 + 3) * fwd,
    }
    return Plan(n, tokens, memory, per_task[cfg.task] * cfg.grad_accum)
