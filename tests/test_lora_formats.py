"""LoRA files on the DiT (inference/lora.py): every key format (LightX2V, ComfyUI, PEFT, diffusers, kohya,
...) parses to the same entries, alpha scaling, and clear errors and warnings for keys, shapes and files."""

from __future__ import annotations

import copy

import pytest
import torch

from inference.lora import (
    LoraCoverageWarning,
    LoraError,
    merge_loras,
    parse_lora,
    runtime_loras,
)
from models.convert import to_diffusers_key
from models.loading import write_safetensors
from tests.lora_util import I2V, T2V, canonical, inputs, make_lora, run, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


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
