"""LoRA on the DiT (inference/lora.py): merged == runtime (T2V and I2V, all kinds of tensors), composition with
strengths, runtime switching without reload, quantized bases, the trainer's exported LoRA reproducing the tuned
model, and the inference config / loader / CLI wiring. Key formats and errors: tests/test_lora_formats.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import infer
import inference.loader
from distill.export import extract_lora
from inference.lora import (
    LoraCoverageWarning,
    LoraError,
    merge_loras,
    parse_lora,
    runtime_loras,
)
from models.loading import write_safetensors
from models.wan_model import WanModel
from tests.lora_util import I2V, T2V, canonical, inputs, make_lora, run, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- merged == runtime -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [T2V, I2V], ids=["t2v", "i2v"])
def test_merged_equals_runtime_and_runtime_removal_restores_the_base(cfg):
    model = tiny(cfg)
    x = inputs(model)
    lora = make_lora(model)  # patch_embedding, text/time embeddings, head, img_emb, modulation, norms, biases
    merged = merge_loras(copy.deepcopy(model), [(lora, 0.8)])
    base_out = run(model, x)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: p for k, p in model.named_parameters()}

    rt = runtime_loras(model)
    rt.add(lora, 0.8, name="a")
    out_rt, out_merged = run(model, x), run(merged, x)
    assert (out_merged - base_out).abs().max() > 1e-2  # the LoRA does something
    torch.testing.assert_close(out_rt, out_merged, rtol=0, atol=1e-5)

    rt.remove("a")
    assert rt.names == []
    torch.testing.assert_close(run(model, x), base_out, rtol=0, atol=0)
    state = model.state_dict()
    assert list(state) == list(base_state)
    assert all(torch.equal(state[k], base_state[k]) for k in state)
    assert all(p is params[k] for k, p in model.named_parameters())  # the very same Parameter objects


def test_two_loras_compose_in_order_with_strengths():
    model = tiny()
    x = inputs(model)
    a, b = make_lora(model, seed=1), make_lora(model, rank=3, seed=2)
    both = merge_loras(copy.deepcopy(model), [(a, 0.5), (b, -1.2)])
    seq = merge_loras(merge_loras(copy.deepcopy(model), [(a, 0.5)]), [(b, -1.2)])
    torch.testing.assert_close(run(both, x), run(seq, x), rtol=0, atol=1e-6)
    # per tensor: W + 0.5 dA - 1.2 dB
    ea, eb = (canonical(parse_lora(lo, model.state_dict().keys())) for lo in (a, b))
    base, after = model.state_dict(), both.state_dict()
    for k, w in base.items():
        expected = w + 0.5 * ea[k][0][1].reshape(w.shape) - 1.2 * eb[k][0][1].reshape(w.shape)
        torch.testing.assert_close(after[k], expected, rtol=0, atol=1e-6)
    # runtime: each LoRA's own product (never a sum of the A's and B's)
    rt = runtime_loras(model)
    rt.add(a, 0.5, name="a")
    rt.add(b, -1.2, name="b")
    torch.testing.assert_close(run(model, x), run(both, x), rtol=0, atol=1e-5)
    rt.clear()


def test_runtime_reweight_and_switch_without_reload():
    model = tiny()
    x = inputs(model)
    a, b = make_lora(model, seed=3), make_lora(model, seed=4, only="blocks.1.")
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    rt = runtime_loras(model)
    assert runtime_loras(model) is rt
    rt.add(a, 1.0, name="a")
    for s in (1.0, 0.3, -0.5, 0.0):
        rt.set_strength("a", s)
        expected = run(merge_loras(model_base(model), [(a, s)]), x)
        torch.testing.assert_close(run(model, x), expected, rtol=0, atol=1e-5)
    with pytest.warns(LoraCoverageWarning):
        rt.add(b, 0.7, name="b")  # b touches only block 1
    rt.remove("a")  # switch a -> b
    with pytest.warns(LoraCoverageWarning):
        expected = run(merge_loras(model_base(model), [(b, 0.7)]), x)
    torch.testing.assert_close(run(model, x), expected, rtol=0, atol=1e-5)
    with pytest.raises(KeyError, match="no runtime LoRA named 'a'"):
        rt.set_strength("a", 1.0)
    with pytest.raises(LoraError, match="already attached"):
        rt.add(b, 1.0, name="b")
    rt.clear()
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == ptrs  # nothing was reloaded or copied


def model_base(model: nn.Module) -> nn.Module:
    """A plain copy of `model`'s base weights (without its runtime LoRAs)."""
    from inference.lora import model_tensors

    clean = WanModel.from_config(model.config).eval().requires_grad_(False)
    clean.load_state_dict({k: v.detach().clone() for k, v in model_tensors(model).items()})
    return clean


class FakeInt8Linear(nn.Module):
    """A W8 linear (per-output-channel scale, LightX2V's layout: weight int8 [out, in] + weight_scale [out, 1])."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        scale = lin.weight.detach().abs().amax(1, keepdim=True) / 127
        self.register_buffer("weight", torch.round(lin.weight.detach() / scale).to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantized().to(x.dtype), self.bias)


def test_runtime_lora_on_quantized_weights():
    model = tiny()
    x = inputs(model)
    reference = copy.deepcopy(model)  # float model holding the dequantized weights
    for i, block in enumerate(model.blocks):
        for attn in ("self_attn", "cross_attn"):
            for n in "qkvo":
                q = FakeInt8Linear(getattr(getattr(block, attn), n))
                setattr(getattr(block, attn), n, q)
                getattr(getattr(reference.blocks[i], attn), n).weight.data.copy_(q.dequantized())
    lora = make_lora(reference)
    with pytest.raises(LoraError, match="quantized"):
        merge_loras(model, [(lora, 1.0)])
    rt = runtime_loras(model)
    rt.add(lora, 0.9, name="a")
    torch.testing.assert_close(run(model, x), run(merge_loras(reference, [(lora, 0.9)]), x), rtol=0, atol=1e-5)
    assert model.blocks[0].self_attn.q.weight.dtype == torch.int8


# ---- the trainer's exported LoRA -----------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [T2V, I2V], ids=["t2v", "i2v"])
def test_exported_lora_reproduces_the_tuned_model(tmp_path, cfg):
    base = tiny(cfg)
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(7)
    true_rank = 3
    with torch.no_grad():  # low-rank changes to the matrices, arbitrary ones to everything else
        for p in tuned.parameters():
            if p.ndim == 2 and min(p.shape) > true_rank:
                p.add_(torch.randn(p.shape[0], true_rank, generator=g) @ torch.randn(true_rank, p.shape[1],
                                                                                    generator=g) * 0.05)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    tensors, errors = extract_lora(base.state_dict(), tuned.state_dict(), rank=4, min_numel=256)
    assert max(errors.values()) < 1e-5
    kinds = {k.rsplit(".", 2)[-2] if k.endswith(".weight") else k.rsplit(".", 1)[-1] for k in tensors}
    assert {"lora_up", "lora_down", "diff", "diff_b", "diff_m"} <= kinds
    path = write_safetensors(tensors, tmp_path / "distill_lora.safetensors", metadata={"format": "lightx2v"})

    x = inputs(base)
    want = run(tuned, x)
    assert (want - run(base, x)).abs().max() > 1e-2
    merged = merge_loras(copy.deepcopy(base), [(path, 1.0)])
    torch.testing.assert_close(run(merged, x), want, rtol=0, atol=1e-4)
    runtime_loras(base).add(path)
    torch.testing.assert_close(run(base, x), want, rtol=0, atol=1e-4)
    assert runtime_loras(base).names == ["distill_lora"]


# ---- wiring: inference config, loader, CLI ---------------------------------------------------------------------
def test_loader_applies_lora_configs(tmp_path, tiny_t2v_dir, make_config):
    from inference.loader import load_pipeline
    from models.components import load_dit

    dit = load_dit(tiny_t2v_dir)
    a, b = make_lora(dit, seed=5), make_lora(dit, seed=6)
    pa = write_safetensors(a, tmp_path / "a.safetensors")
    pb = write_safetensors(b, tmp_path / "b.safetensors")
    specs = [{"path": str(pa), "strength": 0.5}, {"path": str(pb), "strength": 0.25}]
    pipe = load_pipeline(make_config(lora_configs=specs), tiny_t2v_dir)
    expected = merge_loras(copy.deepcopy(dit), [(a, 0.5), (b, 0.25)]).state_dict()
    got = pipe.dit.state_dict()
    assert all(torch.allclose(got[k], expected[k], rtol=0, atol=1e-6) for k in expected)

    pipe = load_pipeline(make_config(lora_configs=specs, lora_mode="runtime"), tiny_t2v_dir)
    rt = runtime_loras(pipe.dit)
    assert rt.strengths == {"a": 0.5, "b": 0.25}
    x = dict(x=torch.randn(1, dit.out_dim, 1, 4, 4), t=torch.tensor([500.0]), context=torch.randn(1, 4, dit.text_dim))
    merged = merge_loras(copy.deepcopy(dit), [(a, 0.5), (b, 0.25)])
    torch.testing.assert_close(run(pipe.dit, x), run(merged, x), rtol=0, atol=1e-5)
    rt.clear()
    torch.testing.assert_close(run(pipe.dit, x), run(dit, x), rtol=0, atol=0)

    with pytest.raises(ValueError, match="lora_mode must be one of"):
        make_config(lora_mode="fused")


def test_cli_lora_path_adds_one_entry(tmp_path, tiny_t2v_dir, write_config, monkeypatch, capsys):
    cfg_path = write_config(tmp_path / "t2v.json", model_path=str(tiny_t2v_dir))
    seen = {}

    def fake_load(cfg, model_path=None):
        seen["cfg"] = cfg
        raise ValueError("stop here")

    monkeypatch.setattr(inference.loader, "load_pipeline", fake_load)
    lora = write_safetensors({"diffusion_model.head.diff_m": torch.zeros(1, 2, 64)}, tmp_path / "l.safetensors")
    argv = ["--config", str(cfg_path), "--prompt", "p", "--save_result_path", str(tmp_path / "o.npy")]
    assert infer.main([*argv, "--lora_path", str(lora), "--lora_strength", "0.3", "--lora_mode", "runtime"]) == 2
    assert [(s.path, s.strength) for s in seen["cfg"].lora_configs] == [(str(lora), 0.3)]
    assert seen["cfg"].lora_mode == "runtime"
    seen.clear()
    assert infer.main([*argv, "--lora_path", str(tmp_path / "missing.safetensors")]) == 2
    assert "LoRA file not found" in capsys.readouterr().err and not seen  # rejected before loading anything


def test_delta_shape_of_conv_lora():
    model = tiny()
    lora = make_lora(model, only="patch_embedding.weight")
    (entry,) = parse_lora(lora, model.state_dict().keys())
    assert entry.delta_shape == (32, 16 * math.prod(model.patch_size))
