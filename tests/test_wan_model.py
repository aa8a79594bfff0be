"""WanModel: parity with diffusers' WanTransformer3DModel, real-size key inventories on `meta`, batching,
context padding, gradient checkpointing and config round-trips. Tiny sizes; runs in seconds on a CPU."""

from __future__ import annotations

import math

import pytest
import torch

from models.convert import (
    diffusers_config,
    from_diffusers_key,
    from_diffusers_state_dict,
    to_diffusers_key,
    to_diffusers_state_dict,
)
from models.wan_layers import rope_split
from models.wan_model import WanModel

# text_len stays 512 in the parity tests: diffusers hard-codes 512 text tokens when it splits I2V context.
TINY = dict(text_len=512, dim=64, ffn_dim=96, freq_dim=256, out_dim=16, num_heads=2, num_layers=2,
            text_dim=32, clip_dim=48)
TINY_T2V = dict(model_type="t2v", in_dim=16, **TINY)
TINY_I2V = dict(model_type="i2v", in_dim=36, **TINY)
TINY_FLF = dict(model_type="flf2v", in_dim=36, **TINY)
GRID = (3, 4, 6)  # latent F, H, W -> token grid 3 x 2 x 3 (non-square)
PROMPT_LENS = (7, 12)  # two different prompts

REAL = {
    "t2v-1.3b": (dict(model_type="t2v", in_dim=16, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
                 1_418_996_800, 825),
    "t2v-14b": (dict(model_type="t2v", in_dim=16, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
                14_288_491_584, 1095),
    "i2v-14b": (dict(model_type="i2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
                16_394_878_784, 1303),
}
REAL_COMMON = dict(text_len=512, freq_dim=256, out_dim=16, eps=1e-6)


# ---- helpers -------------------------------------------------------------------------------------
@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (the training init zeroes the head, which would make parity trivial)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if p.ndim == 1 and "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.2 * r)
        elif name.endswith("bias") or p.ndim == 1:
            p.copy_(0.1 * r)
        else:  # weights, modulation tables, emb_pos
            p.copy_(r / math.sqrt(p[0].numel()))
    return model


def make(cfg: dict, seed: int = 0) -> WanModel:
    torch.manual_seed(seed)
    return randomize(WanModel(**cfg), seed).eval()


def inputs(cfg: dict, batch: int = 2, seed: int = 1) -> dict:
    """x, t, context (zero rows beyond each prompt), clip_fea, y for a tiny model."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["out_dim"], *GRID, generator=g)
    context = torch.zeros(batch, cfg["text_len"], cfg["text_dim"])
    for i in range(batch):
        n = PROMPT_LENS[i % len(PROMPT_LENS)]
        context[i, :n] = torch.randn(n, cfg["text_dim"], generator=g)
    out = dict(x=x, t=torch.tensor([999.0, 321.5, 40.0, 0.0][:batch]), context=context)
    if cfg["model_type"] != "t2v":
        tokens = 2 * 257 if cfg["model_type"] == "flf2v" else 257
        out["clip_fea"] = torch.randn(batch, tokens, cfg["clip_dim"], generator=g)
        out["y"] = torch.randn(batch, cfg["in_dim"] - cfg["out_dim"], *GRID, generator=g)
    return out


def diffusers_model(cfg: dict):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.WanTransformer3DModel(**diffusers_config(cfg))


# ---- 1. parity with diffusers --------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [TINY_T2V, TINY_I2V, TINY_FLF], ids=["t2v", "i2v", "flf2v"])
def test_parity_with_diffusers(cfg):
    head_dim = cfg["dim"] // cfg["num_heads"]
    ref = diffusers_model(cfg).eval()
    assert rope_split(head_dim) == (ref.rope.t_dim, ref.rope.h_dim, ref.rope.w_dim)
    ours = make(cfg)
    ref.load_state_dict(to_diffusers_state_dict(ours.state_dict()), strict=True)
    inp = inputs(cfg)
    with torch.no_grad():
        v = ours(**inp)
        hidden = inp["x"] if "y" not in inp else torch.cat([inp["x"], inp["y"]], dim=1)
        clip = inp.get("clip_fea")
        if clip is not None and cfg["model_type"] == "flf2v":
            clip = clip.reshape(-1, 257, cfg["clip_dim"])  # diffusers takes [2B, 257, C] for first/last frame
        v_ref = ref(hidden, inp["t"], inp["context"], encoder_hidden_states_image=clip, return_dict=False)[0]
    assert v.dtype == torch.float32 and v.shape == inp["x"].shape
    assert v.abs().mean() > 0.1  # a real signal, not zeros
    assert (v - v_ref).abs().max().item() <= 1e-4


# ---- 2. real sizes on meta -----------------------------------------------------------------------
@pytest.mark.parametrize("name", list(REAL))
def test_real_sizes_on_meta(name):
    arch, n_params, n_tensors = REAL[name]
    cfg = dict(arch, **REAL_COMMON)
    with torch.device("meta"):
        model = WanModel(**cfg)
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert len(state) == n_tensors
    assert all(t.is_meta for t in state.values())

    # Independent inventory: diffusers' model at the same size, renamed back to the original names.
    with torch.device("meta"):
        ref = diffusers_model(cfg)
    ref_shapes = {from_diffusers_key(k): tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == ref_shapes

    D, Fd, c = cfg["dim"], cfg["ffn_dim"], cfg["in_dim"]
    expected = {
        "patch_embedding.weight": (D, c, 1, 2, 2), "text_embedding.0.weight": (D, 4096),
        "time_embedding.0.weight": (D, 256), "time_projection.1.weight": (6 * D, D),
        "blocks.0.modulation": (1, 6, D), "blocks.0.self_attn.norm_q.weight": (D,),
        "blocks.0.norm3.weight": (D,), "blocks.0.ffn.0.weight": (Fd, D), "blocks.0.ffn.2.weight": (D, Fd),
        "head.modulation": (1, 2, D), "head.head.weight": (64, D),
    }
    if arch["model_type"] == "i2v":
        expected.update({"blocks.0.cross_attn.k_img.weight": (D, D),
                         "blocks.0.cross_attn.norm_k_img.weight": (D,),
                         "img_emb.proj.0.weight": (1280,), "img_emb.proj.1.weight": (1280, 1280),
                         "img_emb.proj.3.weight": (D, 1280), "img_emb.proj.4.weight": (D,)})
    else:
        assert not any(k.startswith("img_emb") or "k_img" in k for k in state)
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert not any("freqs" in k or "rope" in k for k in state)  # RoPE tables are not stored


def test_meta_init_and_materialise():
    cfg = dict(TINY_T2V)
    with torch.device("meta"):
        model = WanModel(**cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.equal(model.head.head.weight, torch.zeros_like(model.head.head.weight))
    assert torch.equal(model.blocks[0].self_attn.norm_q.weight, torch.ones(cfg["dim"]))
    assert model.blocks[0].self_attn.q.bias.abs().max() == 0
    std = model.blocks[0].modulation.std().item()
    assert 0.5 * cfg["dim"] ** -0.5 < std < 1.5 * cfg["dim"] ** -0.5
    assert abs(model.text_embedding[0].weight.std().item() - 0.02) < 0.005


# ---- 3. batched == per sample --------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [TINY_T2V, TINY_I2V], ids=["t2v", "i2v"])
def test_batched_equals_per_sample(cfg):
    model = make(cfg)
    inp = inputs(cfg)
    with torch.no_grad():
        batched = model(**inp)
        for i in range(2):
            single = model(**{k: v[i : i + 1] for k, v in inp.items()})
            torch.testing.assert_close(batched[i : i + 1], single, atol=1e-5, rtol=0)


# ---- 4. context padding --------------------------------------------------------------------------
def test_context_padding_and_too_long():
    cfg = dict(TINY_T2V, text_len=16)
    model = make(cfg)
    inp = inputs(dict(cfg, text_len=512))
    inp["context"] = inp["context"][:, :16]
    n0, n1 = PROMPT_LENS
    with torch.no_grad():
        padded = model(**inp)
        shorter = model(**dict(inp, context=inp["context"][:, :n1]))
        as_list = model(**dict(inp, context=[inp["context"][0, :n0], inp["context"][1, :n1]]))
    assert torch.equal(padded, shorter) and torch.equal(padded, as_list)
    with pytest.raises(ValueError, match="text_len"):
        model(**dict(inp, context=torch.zeros(2, 17, cfg["text_dim"])))


def test_input_errors():
    model = make(TINY_I2V)
    inp = inputs(TINY_I2V)
    with pytest.raises(ValueError, match="clip_fea"):
        model(**dict(inp, clip_fea=None))
    with pytest.raises(ValueError, match="needs y"):
        model(**dict(inp, y=None))
    with pytest.raises(ValueError, match="divisible"):
        model(**dict(inp, x=inp["x"][..., :5], y=inp["y"][..., :5]))


# ---- 5. gradient checkpointing -------------------------------------------------------------------
def test_gradient_checkpointing_same_grads():
    model = make(TINY_I2V).train()
    inp = inputs(TINY_I2V)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(**inp).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing = True
    ckpt = grads()
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    assert plain["blocks.0.self_attn.q.weight"].abs().sum() > 0


# ---- 6. config -----------------------------------------------------------------------------------
def test_config_round_trip_and_unknown_key():
    model = WanModel(**TINY_I2V)
    clone = WanModel.from_config(model.config)
    assert clone.config == model.config
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in clone.state_dict().items()} == shapes
    official = dict(_class_name="WanModel", _diffusers_version="0.30.0", **REAL["t2v-1.3b"][0], **REAL_COMMON)
    with torch.device("meta"):
        assert WanModel.from_config(official).num_params() == REAL["t2v-1.3b"][1]
    with pytest.raises(ValueError, match="window_sizes"):
        WanModel.from_config(dict(model.config, window_sizes=[-1, -1]))
    with pytest.raises(ValueError, match="num_layers"):
        WanModel.from_config({k: v for k, v in model.config.items() if k != "num_layers"})


# ---- helpers shared with other code --------------------------------------------------------------
def test_key_renames():
    assert to_diffusers_key("blocks.3.cross_attn.k_img.weight") == "blocks.3.attn2.add_k_proj.weight"
    assert to_diffusers_key("blocks.3.self_attn.o") == "blocks.3.attn1.to_out.0"  # module names (LoRA)
    assert to_diffusers_key("diffusion_model.blocks.0.norm3.bias") == "diffusion_model.blocks.0.norm2.bias"
    assert to_diffusers_key("blocks.0.norm2") == "blocks.0.norm3"
    assert to_diffusers_key("head.modulation") == "scale_shift_table"
    assert from_diffusers_key("transformer.blocks.9.scale_shift_table") == "transformer.blocks.9.modulation"
    assert from_diffusers_key("condition_embedder.image_embedder.norm2.weight") == "img_emb.proj.4.weight"
    assert from_diffusers_key("blocks.1.ffn.net.0.proj.lora_A.weight") == "blocks.1.ffn.0.lora_A.weight"
    state = WanModel(**TINY_FLF).state_dict()
    assert from_diffusers_state_dict(to_diffusers_state_dict(state)).keys() == state.keys()


# ---- RoPE cache, inference mode, low precision -------------------------------------------------------
def test_rope_cached_and_low_precision(monkeypatch):
    import models.wan_model as wm

    calls = []
    build = wm.rope_tables
    monkeypatch.setattr(wm, "rope_tables", lambda *a: calls.append(a) or build(*a))
    model, inp = make(TINY_I2V), inputs(TINY_I2V)
    with torch.inference_mode():
        ref = model(**inp)
        model(**inp)
    assert len(calls) == 1  # once per grid, not per block or per call
    model(**inp).mean().backward()  # tables first built under inference_mode still work with autograd
    with torch.no_grad():
        v_bf16 = make(TINY_I2V).to(torch.bfloat16)(**inp)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v_amp = model(**inp)
    assert v_bf16.dtype == v_amp.dtype == torch.float32
    assert (v_bf16 - ref).abs().max() < 0.1 and (v_amp - ref).abs().max() < 0.1
