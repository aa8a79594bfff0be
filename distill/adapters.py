"""LoRA-mode training: generator and critic as low-rank adapters on ONE frozen copy of the teacher's weights.

    real = load_dit(teacher).requires_grad_(False)
    gen = with_lora(real, rank=64, alpha=64, targets=DEFAULT_TARGETS)     # shares every base tensor with `real`
    critic = with_lora(real, rank=64, alpha=64, targets=DEFAULT_TARGETS)
    lightx2v_lora(gen)       # {"diffusion_model.blocks.0.self_attn.q.lora_up.weight": [out, r], ...} + alpha
    merged(gen)              # a plain WanModel with W + (alpha / r) up @ down, for export and sampling

`with_lora` deep-copies the module tree but not the parameters or buffers (`copy.deepcopy` with a memo that maps
each tensor to itself), then replaces the targeted `nn.Linear`s by `LoRALinear(base, r, alpha)`. The three DMD
networks therefore hold one base (for Wan2.1-14B: 28 GB in bf16 instead of 3 x 56 GB in fp32), and optimizer
state, gradients, EMA and checkpoints cover the adapters only.

LoRALinear (Hu et al. 2021): y = x W^T + b + (alpha / r) (x A^T) B^T, A = `lora_down.weight` [r, in] (Kaiming
uniform), B = `lora_up.weight` [out, r] (zeros), so a fresh adapter leaves the network unchanged. The names match
the LightX2V LoRA file keys, so the export is a rename (no SVD).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from distill.config import LORA_TARGETS

# Every linear of the attention and FFN of every block (as Wan LoRAs such as LightX2V's distill LoRA do).
DEFAULT_TARGETS = LORA_TARGETS
LORA_PREFIX = "diffusion_model."


class LoRALinear(nn.Module):
    """A frozen (possibly shared) `nn.Linear` plus a trainable low-rank update; see the module docstring."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base, self.rank, self.alpha = base, rank, float(alpha)
        self.scale = self.alpha / rank
        self.lora_down = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    @property
    def weight(self) -> Tensor:  # code that reads `.weight` (dtype/device probes) sees the base weight
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] -> [..., out]. The adapter runs in its own (fp32) dtype unless autocast says otherwise."""
        return self.base(x) + self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype))).to(x.dtype) * self.scale

    def delta(self) -> Tensor:
        """(alpha / r) B A: the [out, in] change of the weight."""
        return self.scale * (self.lora_up.weight.float() @ self.lora_down.weight.float())


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers ARE the original ones (no memory)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def target_names(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of the `nn.Linear` modules whose full name matches one of the `targets` regexes (fullmatch)."""
    pats = [re.compile(t) for t in targets]
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(p.fullmatch(n) for p in pats)]


def with_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS) -> nn.Module:
    """A `shared_copy` of `model` with `LoRALinear` adapters on the targeted linears; only adapters train.

    Raises ValueError naming the patterns when nothing matches (a typo must not silently train nothing)."""
    names = target_names(model, targets)
    if not names:
        raise ValueError(f"lora.target_modules {list(targets)} match no nn.Linear of the model; linears are "
                         f"named like {[n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:6]}")
    out = shared_copy(model).requires_grad_(False)
    for name in names:
        parent, _, child = name.rpartition(".")
        holder = out.get_submodule(parent) if parent else out
        setattr(holder, child, LoRALinear(getattr(holder, child), rank, alpha))
    return out


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The trainable tensors only (`<module>.lora_down.weight`, `<module>.lora_up.weight`)."""
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def lightx2v_lora(model: nn.Module, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The adapters as a LightX2V LoRA file: `diffusion_model.<module>.lora_up/lora_down.weight` and `.alpha`.

    `state` (e.g. an EMA shadow with the model's parameter names) replaces the live adapter weights."""
    out: dict[str, Tensor] = {}
    for name, m in lora_modules(model).items():
        for part in ("lora_up", "lora_down"):
            key = f"{name}.{part}.weight"
            w = state[key] if state is not None else getattr(m, part).weight
            out[f"{LORA_PREFIX}{key}"] = w.detach().float().cpu().contiguous()
        out[f"{LORA_PREFIX}{name}.alpha"] = torch.tensor(m.alpha)
    return out


@torch.no_grad()
def merged(model: nn.Module, state: dict[str, Tensor] | None = None) -> nn.Module:
    """A plain copy of `model` (own tensors) with every adapter folded in: W <- W + (alpha / r) B A.

    `state` optionally gives the adapter weights (e.g. EMA) instead of the live ones."""
    out = copy.deepcopy(model)
    for name, m in lora_modules(out).items():
        if state is not None:
            m.lora_up.weight.copy_(state[f"{name}.lora_up.weight"])
            m.lora_down.weight.copy_(state[f"{name}.lora_down.weight"])
        base = m.base
        base.weight.copy_((base.weight.float() + m.delta()).to(base.weight.dtype))
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, base)
    return out
