"""LoRA files on the DiT (inference/lora.py): every key format, merged == runtime (T2V and I2V, all kinds of
tensors), composition with strengths, runtime switching without reload, quantized bases, clear errors, and the
trainer's exported LoRA reproducing the tuned model."""

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
from models.convert import to_diffusers_key
from models.loading import write_safetensors
from models.wan_model import WanModel

pytestmark = pytest.mark.usefixtures("one_thread")

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


# ---- key formats ---------------------------------------------------------------------------------------------
PAIR_FORMATS = {  # name -> (prefix, up suffix, down suffix)
    "lightx2v": ("diffusion_model.", ".lora_up.weight", ".lora_down.weight"),
    "comfy_AB": ("model.diffusion_model.", ".lora_B.weight", ".lora_A.weight"),
    "bare_AB": ("model.", ".lora_B", ".lora_A"),
    "dot_lora": ("", ".lora.up.weight", ".lora.down.weight"),
    "underscore_lora": ("", "_lora.up.weight", "_lora.down.weight"),
    "linear_layer": ("transformer.", ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    "peft": ("base_model.model.", ".lora_B.default.weight", ".lora_A.default.weight"),
}
ROLE = {".lora_up.weight": "up", ".lora_down.weight": "down", ".diff": "diff", ".diff_b": "diff_b",
        ".diff_m": "diff_m"}


def split_canonical(lora: dict) -> list[tuple[str, str, torch.Tensor]]:
    """(official module, role, tensor) of a make_lora() dict."""
    out = []
    for key, t in lora.items():
        rest = key[len("diffusion_model"):].lstrip(".")
        for suffix, role in ROLE.items():
            if rest.endswith(suffix) or rest == suffix[1:]:
                out.append((rest[: -len(suffix)] if rest != suffix[1:] else "", role, t))
                break
    return out


def rekey(lora: dict, fmt: str) -> dict:
    out = {}
    for module, role, t in split_canonical(lora):
        if fmt in PAIR_FORMATS:
            prefix, up, down = PAIR_FORMATS[fmt]
            suffix = {"up": up, "down": down, "diff": ".diff", "diff_b": ".diff_b", "diff_m": ".diff_m"}[role]
            out[prefix + module + suffix] = t
        elif fmt == "diffusers":  # transformer.blocks.0.attn1.to_q.lora_B.weight, proj_out, scale_shift_table ...
            param = {"diff_m": "modulation", "diff_b": "bias"}.get(role, "weight")
            dmodule = to_diffusers_key(f"{module}.{param}" if module else param).rpartition(".")[0]
            suffix = {"up": ".lora_B.weight", "down": ".lora_A.weight"}.get(role, "." + role)
            out[("transformer." + dmodule if dmodule else "transformer") + suffix] = t
        elif fmt == "kohya":  # lora_unet_blocks_0_self_attn_q.lora_down.weight + .alpha
            kmodule = "lora_unet_" + module.replace(".", "_")
            suffix = {"up": ".lora_up.weight", "down": ".lora_down.weight"}.get(role, "." + role)
            out[kmodule + suffix] = t
            if role == "down":
                out[kmodule + ".alpha"] = torch.tensor(float(t.shape[0]))  # alpha = rank: scale 1
    return out


def canonical(entries) -> dict[str, list[tuple[str, torch.Tensor]]]:
    out: dict = {}
    for e in entries:
        out.setdefault(e.target, []).append((e.kind, e.delta()))
    return out


@pytest.mark.parametrize("cfg", [T2V, I2V], ids=["t2v", "i2v"])
def test_every_key_format_parses_to_the_same_entries(cfg):
    model = tiny(cfg)
    keys = model.state_dict().keys()
    lora = make_lora(model)
    reference = canonical(parse_lora(lora, keys))
    assert set(reference) == set(keys)  # every tensor: embeddings, patch embedding, head, img_emb, modulation
    assert all(kind != "unknown" for v in reference.values() for kind, _ in v)
    for fmt in [*PAIR_FORMATS, "diffusers", "kohya"]:
        rekeyed = rekey(lora, fmt)
        got = canonical(parse_lora(rekeyed, keys))
        assert set(got) == set(reference), (fmt, sorted(set(got) ^ set(reference))[:5])
        for target, items in reference.items():
            assert len(got[target]) == len(items)
            for (k1, d1), (k2, d2) in zip(items, got[target]):
                assert k1 == k2 and torch.equal(d1, d2), (fmt, target)


def test_diffusers_names_without_model_keys_and_norm_swap():
    lora = {"transformer.blocks.1.attn2.add_k_proj.lora_A.weight": torch.ones(2, 32),
            "transformer.blocks.1.attn2.add_k_proj.lora_B.weight": torch.ones(32, 2),
            "transformer.blocks.1.norm2.diff": torch.ones(32),  # diffusers norm2 = official norm3
            "transformer.diff_m": torch.ones(1, 2, 32)}  # head modulation in diffusers naming
    targets = {e.target for e in parse_lora(lora)}
    assert {"blocks.1.cross_attn.k_img.weight", "blocks.1.norm3.weight", "head.modulation"} <= targets


def test_alpha_scale_and_formula_per_tensor():
    model = tiny()
    base = copy.deepcopy(model.state_dict())
    lora = make_lora(model, rank=4)
    for key in [k for k in lora if k.endswith(".lora_down.weight")]:
        lora[key.replace(".lora_down.weight", ".alpha")] = torch.tensor(2.0)  # scale = 2 / 4
    entries = parse_lora(lora, base.keys())
    assert {e.scale for e in entries if e.kind == "lora"} == {0.5}
    strength = 0.7
    merge_loras(model, [(lora, strength)])
    after = model.state_dict()
    for e in entries:
        w = base[e.target]
        if e.kind == "lora":
            expected = w + strength * 0.5 * (e.up.flatten(1) @ e.down.flatten(1)).reshape(w.shape)
        else:
            expected = w + strength * e.diff.reshape(w.shape)
        torch.testing.assert_close(after[e.target], expected, rtol=0, atol=1e-6)


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


# ---- errors and warnings --------------------------------------------------------------------------------------
def test_keys_that_match_nothing_are_an_error_listing_them():
    model = tiny()
    lora = make_lora(model, only="blocks.0.self_attn.q.")
    lora["diffusion_model.blocks.7.self_attn.q.lora_up.weight"] = torch.zeros(32, 2)
    lora["diffusion_model.blocks.7.self_attn.q.lora_down.weight"] = torch.zeros(2, 32)
    lora["text_encoder.some.weird.key"] = torch.zeros(3)
    with pytest.raises(LoraError) as err:
        merge_loras(model, [(lora, 1.0)])
    msg = str(err.value)
    assert "3 key(s) match nothing" in msg
    for key in ("diffusion_model.blocks.7.self_attn.q.lora_up.weight",
                "diffusion_model.blocks.7.self_attn.q.lora_down.weight", "text_encoder.some.weird.key"):
        assert key in msg
    assert ">= 8 blocks" in msg
    # the model was not touched (checked before merging)
    torch.testing.assert_close(model.state_dict(), tiny().state_dict(), rtol=0, atol=0)
    with pytest.raises(LoraError, match="incomplete LoRA pairs"):
        parse_lora({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(32, 2)})


def test_partial_match_is_a_warning_with_counts():
    model = tiny()
    total = len(model.state_dict())
    lora = make_lora(model, only="self_attn.q.")  # weight + bias of q in 2 blocks
    with pytest.warns(LoraCoverageWarning, match=rf"changes 4 of the model's {total} tensors \(2 low-rank, 2 full "
                                                 rf"differences\); the other {total - 4} keep"):
        merge_loras(model, [(lora, 1.0)])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", LoraCoverageWarning)
        merge_loras(model, [(make_lora(model), 1.0)])  # full coverage: no warning


@pytest.mark.parametrize("lora_for, needle", [
    ("tiny-i2v", "an I2V model (dim 32, in_dim 36, ffn_dim 64, >= 2 blocks)"),
    ("14b-i2v", "wan2.1-i2v-14b-480p or wan2.1-i2v-14b-720p"),
    ("1.3b", "wan2.1-t2v-1.3b"),
])
def test_shape_mismatch_names_the_model_the_lora_seems_for(lora_for, needle):
    model = tiny(T2V)
    if lora_for == "tiny-i2v":
        lora = make_lora(tiny(I2V))
    elif lora_for == "14b-i2v":
        lora = {"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(5120, 1),
                "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(1, 5120),
                "diffusion_model.blocks.39.diff_m": torch.zeros(1, 6, 5120),
                "diffusion_model.patch_embedding.diff": torch.zeros(5120, 36, 1, 2, 2)}
    else:
        lora = {"diffusion_model.blocks.1.ffn.0.lora_up.weight": torch.zeros(8960, 1),
                "diffusion_model.blocks.1.ffn.0.lora_down.weight": torch.zeros(1, 1536)}
    with pytest.raises(LoraError) as err:
        runtime_loras(model).add(lora, 1.0)
    msg = str(err.value)
    assert "have other shapes" in msg and "seems to be for" in msg and needle in msg, msg
    assert "this model (a T2V model (dim 32, in_dim 16, ffn_dim 64, 2 blocks))" in msg
    assert runtime_loras(model).names == [] and not any("parametrizations" in k for k in model.state_dict())


def test_non_strict_skips_what_does_not_fit_but_never_everything():
    model = tiny()
    lora = make_lora(model)
    lora["diffusion_model.blocks.9.diff_m"] = torch.zeros(1, 6, 32)
    with pytest.warns(LoraCoverageWarning, match=r"1 key\(s\) match nothing.*Skipping 1 of"):
        merge_loras(copy.deepcopy(model), [(lora, 1.0)], strict=False)
    with pytest.raises(LoraError, match="match nothing"):
        merge_loras(model, [({"diffusion_model.blocks.9.diff_m": torch.zeros(1, 6, 32)}, 1.0)], strict=False)


def test_files_safetensors_and_pt(tmp_path):
    model = tiny()
    x = inputs(model)
    lora = make_lora(model)
    torch.save(lora, tmp_path / "l.pt")
    write_safetensors(lora, tmp_path / "l.safetensors")
    out_pt = run(merge_loras(copy.deepcopy(model), [(tmp_path / "l.pt", 1.0)]), x)
    out_st = run(merge_loras(copy.deepcopy(model), [(str(tmp_path / "l.safetensors"), 1.0)]), x)
    torch.testing.assert_close(out_pt, out_st, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="LoRA file not found"):
        merge_loras(model, [(tmp_path / "nope.safetensors", 1.0)])


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
