"""Shared helpers of the LoRA tests: tiny random WanModels (T2V and I2V), their inputs, and LoRA dicts that
touch every tensor (tests/test_lora.py, tests/test_lora_formats.py)."""

from __future__ import annotations

import torch
from torch import nn

from models.wan_model import WanModel

T2V = dict(model_type="t2v", text_len=8, in_dim=16, dim=32, ffn_dim=64, freq_dim=32, out_dim=16, num_heads=2,
           num_layers=2, text_dim=16)
I2V = dict(T2V, model_type="i2v", in_dim=36, clip_dim=16)


def tiny(cfg: dict = T2V, seed: int = 0) -> WanModel:
    torch.manual_seed(seed)
    model = WanModel.from_config(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():  # random everywhere (Wan's init zeroes the head)
            p.add_(torch.randn_like(p) * 0.1)
    return model


def inputs(model: WanModel, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = dict(x=torch.randn(2, 16, 1, 4, 4, generator=g), t=torch.tensor([900.0, 250.0]),
               context=torch.randn(2, 5, 16, generator=g))
    if model.model_type == "i2v":
        out.update(clip_fea=torch.randn(2, 257, 16, generator=g), y=torch.randn(2, 20, 1, 4, 4, generator=g))
    return out


def run(model: WanModel, x: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**x)


def module_of(param: str) -> tuple[str, str]:
    """'blocks.0.self_attn.q.weight' -> ('blocks.0.self_attn.q', 'weight')."""
    module, _, attr = param.rpartition(".")
    return module, attr


def make_lora(model: nn.Module, rank: int = 2, seed: int = 0, only: str | None = None) -> dict[str, torch.Tensor]:
    """A LightX2V-format LoRA touching every tensor of `model` (or those whose name contains `only`): 2-D+ weights
    as up/down (the patch embedding in conv form), modulations as .diff_m, 1-D weights .diff, biases .diff_b."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.state_dict().items():
        if only is not None and only not in name:
            continue
        module, attr = module_of(name)
        pre = f"diffusion_model.{module}" if module else "diffusion_model"
        if attr == "modulation":
            out[f"{pre}.diff_m"] = torch.randn(p.shape, generator=g) * 0.05
        elif p.ndim >= 2:
            out[f"{pre}.lora_up.weight"] = torch.randn(p.shape[0], rank, *([1] * (p.ndim - 2)), generator=g) * 0.2
            out[f"{pre}.lora_down.weight"] = torch.randn(rank, *p.shape[1:], generator=g) * 0.2
        else:
            out[f"{pre}.{'diff_b' if attr == 'bias' else 'diff'}"] = torch.randn(p.shape, generator=g) * 0.05
    return out


def canonical(entries) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """target -> [(kind, delta)] of parsed LoRA entries."""
    out: dict = {}
    for e in entries:
        out.setdefault(e.target, []).append((e.kind, e.delta()))
    return out
