"""Name conversion between the official Wan2.1 models and diffusers: the DiT <-> `WanTransformer3DModel`, the
VAE <-> `AutoencoderKLWan`.

DiT: the rename table of docs/wan_architecture.md ("Diffusers names"), written as ordered regex rules that only match
whole
dotted segments, so they work on parameter names (`blocks.0.self_attn.q.weight`), module names
(`blocks.0.self_attn.q`, used for LoRA targets) and names with a prefix (`diffusion_model.blocks.0...`,
`transformer.blocks.0...`). The norm2 <-> norm3 swap inside a block is done in one pass.

    to_diffusers_key("blocks.3.cross_attn.k_img.weight") == "blocks.3.attn2.add_k_proj.weight"
    from_diffusers_key("scale_shift_table") == "head.modulation"

VAE: `to_diffusers_vae_state_dict` / `from_diffusers_vae_state_dict` rename a whole state dict (the decoder's flat
`upsamples.<n>` list becomes per-level `up_blocks`, read off the keys, so any width/depth converts); diffusers'
`AutoencoderKLWan` is the parity reference in tests/test_vae.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

_B = r"(?<![^.])"  # segment start: beginning of the name or right after a dot
_E = r"(?=\.|$)"  # segment end

_EMB = "condition_embedder"
_IMG = f"{_EMB}.image_embedder"

# (original, diffusers) for the non-block modules; each side is a literal dotted path.
_TOP: list[tuple[str, str]] = [
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("time_embedding.0", f"{_EMB}.time_embedder.linear_1"),
    ("time_embedding.2", f"{_EMB}.time_embedder.linear_2"),
    ("text_embedding.0", f"{_EMB}.text_embedder.linear_1"),
    ("text_embedding.2", f"{_EMB}.text_embedder.linear_2"),
    ("time_projection.1", f"{_EMB}.time_proj"),
    ("img_emb.proj.0", f"{_IMG}.norm1"),
    ("img_emb.proj.1", f"{_IMG}.ff.net.0.proj"),
    ("img_emb.proj.3", f"{_IMG}.ff.net.2"),
    ("img_emb.proj.4", f"{_IMG}.norm2"),
    ("img_emb.emb_pos", f"{_IMG}.pos_embed"),  # FLF2V only
]
# (original, diffusers) inside `blocks.<i>.`.
_BLOCK: list[tuple[str, str]] = [
    ("modulation", "scale_shift_table"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    ("norm3", "norm2"),  # the affine cross-attention norm
    ("norm2", "norm3"),  # the FFN norm (no parameters)
]
_ATTN: list[tuple[str, str]] = [
    ("self_attn", "attn1"),
    ("cross_attn", "attn2"),
]
_ATTN_INNER: list[tuple[str, str]] = [
    ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"),
    ("norm_q", "norm_q"), ("norm_k", "norm_k"),
    ("k_img", "add_k_proj"), ("v_img", "add_v_proj"), ("norm_k_img", "norm_added_k"),
]


def _one_pass(name: str, pairs: list[tuple[str, str]], prefix: str = "") -> str:
    """Replace each whole-segment occurrence of a left side (after `prefix`) by its right side, one pass."""
    table = dict(pairs)
    alternatives = "|".join(re.escape(a) for a in sorted(table, key=len, reverse=True))
    pattern = re.compile(f"{_B}({prefix})({alternatives}){_E}")
    return pattern.sub(lambda m: m.group(1) + table[m.group(2)], name)


def _convert(name: str, reverse: bool) -> str:
    def flip(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(b, a) for a, b in pairs] if reverse else pairs

    block = r"blocks\.\d+\."
    attn = r"attn[12]\." if reverse else r"(?:self|cross)_attn\."
    # blocks first: a block's scale_shift_table is not the head's
    name = _one_pass(name, flip(_BLOCK), prefix=block)
    name = _one_pass(name, flip(_TOP))
    name = _one_pass(name, flip(_ATTN_INNER), prefix=block + attn)  # q -> to_q while the parent is known
    return _one_pass(name, flip(_ATTN), prefix=block)


def to_diffusers_key(name: str) -> str:
    """Official Wan2.1 DiT name (parameter or module, any prefix) -> diffusers WanTransformer3DModel name."""
    return _convert(name, reverse=False)


def from_diffusers_key(name: str) -> str:
    """diffusers `WanTransformer3DModel` name -> official Wan2.1 DiT name (inverse of `to_diffusers_key`)."""
    return _convert(name, reverse=True)


def to_diffusers_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an official-key state dict to diffusers keys (tensors are shared, not copied)."""
    return {to_diffusers_key(k): v for k, v in state.items()}


def from_diffusers_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a diffusers-key state dict to official keys (tensors are shared, not copied)."""
    return {from_diffusers_key(k): v for k, v in state.items()}


def diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """`WanModel.config` (official field names) -> keyword arguments of diffusers' `WanTransformer3DModel`."""
    dim, heads = config["dim"], config["num_heads"]
    out: dict[str, Any] = dict(
        patch_size=tuple(config.get("patch_size", (1, 2, 2))), num_attention_heads=heads,
        attention_head_dim=dim // heads, in_channels=config["in_dim"], out_channels=config["out_dim"],
        text_dim=config.get("text_dim", 4096), freq_dim=config["freq_dim"], ffn_dim=config["ffn_dim"],
        num_layers=config["num_layers"], cross_attn_norm=config.get("cross_attn_norm", True),
        qk_norm="rms_norm_across_heads" if config.get("qk_norm", True) else None, eps=config.get("eps", 1e-6))
    if config["model_type"] in ("i2v", "flf2v") and config.get("clip_dim", 1280) is not None:  # Wan2.2 I2V: None
        out.update(image_dim=config.get("clip_dim", 1280), added_kv_proj_dim=dim)
    if config["model_type"] == "flf2v":
        out.update(pos_embed_seq_len=2 * 257)
    return out


# ------------------------------------------------------------------------------------------------------------
# VAE key names: official (`models.vae.WanVAE`) <-> diffusers `AutoencoderKLWan`.
# The decoder is the only irregular part: the official flat `decoder.upsamples.<n>` list becomes
# `decoder.up_blocks.<level>.resnets.<j>` / `.upsamplers.0`; the level layout is read off the keys themselves,
# so the rename works for any width/depth.

_VAE_TOP = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
_VAE_MIDDLE = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
_VAE_HEAD = {"0": "norm_out", "2": "conv_out"}
_VAE_RESIDUAL = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
                 "shortcut": "conv_shortcut"}


def _vae_rename_inside_block(rest: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def _vae_decoder_levels(keys: Iterable[str]) -> dict[int, str]:
    """Official `decoder.upsamples.<n>` -> diffusers `up_blocks.<level>.resnets.<j>` / `.upsamplers.0`."""
    kinds: dict[int, str] = {}
    for key in keys:
        m = re.match(r"decoder\.upsamples\.(\d+)\.([a-z_]+)", key)
        if m:
            part = m.group(2)
            kind = "resample" if part in ("resample", "time_conv") else "attention" if part in (
                "norm", "to_qkv", "proj") else "residual"
            kinds[int(m.group(1))] = kind
    out, level, j = {}, 0, 0
    for n in sorted(kinds):
        if kinds[n] == "attention":
            raise ValueError("diffusers' AutoencoderKLWan has no attention in the decoder's up blocks "
                             "(attn_scales must be empty for this conversion)")
        if kinds[n] == "residual":
            out[n], j = f"up_blocks.{level}.resnets.{j}", j + 1
        else:
            out[n], level, j = f"up_blocks.{level}.upsamplers.0", level + 1, 0
    return out


def _vae_to_diffusers_key(key: str, levels: Mapping[int, str]) -> str:
    parts = key.split(".")
    if parts[0] in _VAE_TOP:
        return ".".join([_VAE_TOP[parts[0]], *parts[1:]])
    side, group = parts[0], parts[1]
    if group == "conv1":
        return ".".join([side, "conv_in", *parts[2:]])
    if group == "head":
        return ".".join([side, _VAE_HEAD[parts[2]], *parts[3:]])
    if group == "middle":
        block, rest = f"mid_block.{_VAE_MIDDLE[parts[2]]}", ".".join(parts[3:])
    elif group == "downsamples":
        block, rest = f"down_blocks.{parts[2]}", ".".join(parts[3:])
    elif group == "upsamples":
        block, rest = levels[int(parts[2])], ".".join(parts[3:])
    else:
        raise KeyError(f"not a Wan2.1 VAE key: {key}")
    return f"{side}.{block}.{_vae_rename_inside_block(rest, _VAE_RESIDUAL)}"


def to_diffusers_vae_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official Wan2.1 VAE state dict (`Wan2.1_VAE.pth`, `WanVAE().state_dict()`) -> diffusers
    `AutoencoderKLWan` names."""
    levels = _vae_decoder_levels(state_dict)
    return {_vae_to_diffusers_key(k, levels): v for k, v in state_dict.items()}


def from_diffusers_vae_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers `AutoencoderKLWan` state dict -> official Wan2.1 VAE keys (inverse of `to_diffusers_...`)."""
    # Rebuild the flat decoder index: level L holds its resnets, then its upsampler.
    resnets: dict[int, set[int]] = {}
    upsampler: set[int] = set()
    for key in state_dict:
        m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.", key)
        if m:
            level = int(m.group(1))
            resnets.setdefault(level, set())
            if m.group(3) is not None:
                resnets[level].add(int(m.group(3)))
            else:
                upsampler.add(level)
    flat: dict[str, int] = {}
    n = 0
    for level in sorted(resnets):
        for j in sorted(resnets[level]):
            flat[f"up_blocks.{level}.resnets.{j}"], n = n, n + 1
        if level in upsampler:
            flat[f"up_blocks.{level}.upsamplers.0"], n = n, n + 1
    inverse = {v: k for k, v in _VAE_RESIDUAL.items()}
    top = {v: k for k, v in _VAE_TOP.items()}
    middle = {v: k for k, v in _VAE_MIDDLE.items()}
    head = {v: k for k, v in _VAE_HEAD.items()}
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] in top:
            new = ".".join([top[parts[0]], *parts[1:]])
        elif parts[1] == "conv_in":
            new = ".".join([parts[0], "conv1", *parts[2:]])
        elif parts[1] in head:
            new = ".".join([parts[0], "head", head[parts[1]], *parts[2:]])
        else:
            if parts[1] == "mid_block":
                block, rest = f"middle.{middle['.'.join(parts[2:4])]}", parts[4:]
            elif parts[1] == "down_blocks":
                block, rest = f"downsamples.{parts[2]}", parts[3:]
            elif parts[1] == "up_blocks":
                # up_blocks.<level>.resnets.<j>.* or up_blocks.<level>.upsamplers.0.*
                block, rest = f"upsamples.{flat['.'.join(parts[1:5])]}", parts[5:]
            else:
                raise KeyError(f"not a diffusers AutoencoderKLWan key: {key}")
            new = f"{parts[0]}.{block}.{_vae_rename_inside_block('.'.join(rest), inverse)}"
        out[new] = value
    return out


# ------------------------------------------------------------------------------------------------------------
# Text and image encoders: official Wan files <-> transformers' `UMT5EncoderModel` / `CLIPVisionModel`, the
# layouts of a diffusers Wan folder's text_encoder/ and image_encoder/.

_UMT5_TO_HF: list[tuple[str, str]] = [
    (r"token_embedding\.weight", "shared.weight"),
    (r"blocks\.(\d+)\.attn\.([qkvo])\.weight", r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
    (r"blocks\.(\d+)\.pos_embedding\.embedding\.weight",
     r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight"),
    (r"blocks\.(\d+)\.norm1\.weight", r"encoder.block.\1.layer.0.layer_norm.weight"),
    (r"blocks\.(\d+)\.ffn\.gate\.0\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_0.weight"),
    (r"blocks\.(\d+)\.ffn\.fc1\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_1.weight"),
    (r"blocks\.(\d+)\.ffn\.fc2\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wo.weight"),
    (r"blocks\.(\d+)\.norm2\.weight", r"encoder.block.\1.layer.1.layer_norm.weight"),
    (r"norm\.weight", "encoder.final_layer_norm.weight"),
]


def _regex_rename(key: str, rules: list[tuple[str, str]], what: str) -> str:
    for pattern, repl in rules:
        if re.fullmatch(pattern, key):
            return re.sub(f"^{pattern}$", repl, key)
    raise KeyError(f"not a {what} key: {key}")


def _invert(rules: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Swap the sides of a rename table whose groups appear once each, in order, on both sides: the
    replacement side becomes a regex (`\\1` -> the original side's group) and vice versa."""
    out = []
    for pattern, repl in rules:
        groups = re.findall(r"\([^)]*\)", pattern)
        new_pattern, new_repl = re.escape(repl), pattern
        for n, group in enumerate(groups, start=1):
            new_pattern = new_pattern.replace(re.escape(f"\\{n}"), group, 1)
            new_repl = new_repl.replace(group, f"\\{n}", 1)
        out.append((new_pattern, new_repl.replace("\\.", ".")))
    return out


_UMT5_FROM_HF = _invert(_UMT5_TO_HF)


def umt5_to_transformers_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official umT5 encoder keys (`models_t5_umt5-xxl-enc-bf16.pth`) -> transformers `UMT5EncoderModel` keys.

    The embedding is written once as `shared.weight`; transformers ties `encoder.embed_tokens.weight` to it.
    """
    return {_regex_rename(k, _UMT5_TO_HF, "Wan umT5 encoder"): v for k, v in state.items()}


def umt5_from_transformers_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers `UMT5EncoderModel` keys -> official umT5 keys (the tied `encoder.embed_tokens.weight` is
    used when `shared.weight` is absent)."""
    state = dict(state)
    tied = state.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in state and tied is not None:
        state["shared.weight"] = tied
    return {_regex_rename(k, _UMT5_FROM_HF, "transformers UMT5EncoderModel"): v for k, v in state.items()}


def umt5_config_from_transformers(config: Mapping[str, Any]) -> dict[str, Any]:
    """transformers `UMT5Config` fields -> `models.t5.UMT5Encoder` arguments; only Wan's umT5 variant
    (gated GELU-tanh FFN) is accepted."""
    act = config.get("feed_forward_proj", "gated-gelu")
    if act != "gated-gelu":
        raise ValueError(f"text_encoder config: feed_forward_proj {act!r} is not Wan's umT5 ('gated-gelu')")
    return dict(vocab_size=config["vocab_size"], dim=config["d_model"], dim_attn=config["d_kv"] * config["num_heads"],
                dim_ffn=config["d_ff"], num_heads=config["num_heads"], num_layers=config["num_layers"],
                num_buckets=config.get("relative_attention_num_buckets", 32),
                max_distance=config.get("relative_attention_max_distance", 128),
                eps=config.get("layer_norm_epsilon", 1e-6))


_CLIP_TO_HF: list[tuple[str, str]] = [
    (r"patch_embedding\.weight", "embeddings.patch_embedding.weight"),
    (r"pre_norm\.(weight|bias)", r"pre_layrnorm.\1"),
    (r"post_norm\.(weight|bias)", r"post_layernorm.\1"),
    (r"transformer\.(\d+)\.norm1\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (r"transformer\.(\d+)\.norm2\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
    (r"transformer\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.out_proj.\2"),
    (r"transformer\.(\d+)\.mlp\.0\.(weight|bias)", r"encoder.layers.\1.mlp.fc1.\2"),
    (r"transformer\.(\d+)\.mlp\.2\.(weight|bias)", r"encoder.layers.\1.mlp.fc2.\2"),
]
_HF_VISION = "vision_model."


def clip_to_transformers_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official CLIP `visual.*` keys -> transformers `CLIPVisionModel` keys (`vision_model.*`; the fused qkv is
    split into q/k/v_proj). The `visual.head` projection has no place in `CLIPVisionModel` and is dropped
    (Wan never uses it: its features are the penultimate block's tokens)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not key.startswith("visual."):
            raise KeyError(f"not a CLIP visual key: {key}")
        name = key.removeprefix("visual.")
        if name == "head":
            continue
        if name == "cls_embedding":
            out[_HF_VISION + "embeddings.class_embedding"] = value.reshape(-1)
        elif name == "pos_embedding":
            out[_HF_VISION + "embeddings.position_embedding.weight"] = value.reshape(value.shape[-2:])
        elif m := re.fullmatch(r"transformer\.(\d+)\.attn\.to_qkv\.(weight|bias)", name):
            for part, chunk in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[f"{_HF_VISION}encoder.layers.{m[1]}.self_attn.{part}_proj.{m[2]}"] = chunk
        else:
            out[_HF_VISION + _regex_rename(name, _CLIP_TO_HF, "CLIP visual")] = value
    return out


def clip_from_transformers_state_dict(state: Mapping[str, Tensor], out_dim: int) -> dict[str, Tensor]:
    """transformers `CLIPVisionModel` / `CLIPVisionModelWithProjection` keys -> official `visual.*` keys.

    Without `visual_projection.weight` (diffusers' Wan I2V stores `CLIPVisionModel`), `visual.head` is filled
    with zeros of shape [dim, out_dim]: the network needs the parameter for a strict load, Wan never reads it.
    """
    rules = _invert(_CLIP_TO_HF)
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    dim = None
    for key, value in state.items():
        name = key.removeprefix(_HF_VISION)
        if name.endswith("position_ids"):  # a non-persistent buffer in recent transformers, persistent in old
            continue
        if name == "embeddings.class_embedding":
            dim = value.numel()
            out["visual.cls_embedding"] = value.reshape(1, 1, -1)
        elif name == "embeddings.position_embedding.weight":
            out["visual.pos_embedding"] = value.unsqueeze(0)
        elif name == "visual_projection.weight":  # Linear(dim, out_dim) weight [out_dim, dim] -> head [dim, out_dim]
            out["visual.head"] = value.t()
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", name):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
        else:
            out["visual." + _regex_rename(name, rules, "transformers CLIPVisionModel")] = value
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"CLIP layer {layer}: {kind} of q/k/v_proj incomplete, got {sorted(parts)}")
        out[f"visual.transformer.{layer}.attn.to_qkv.{kind}"] = torch.cat([parts[p] for p in "qkv"])
    if "visual.head" not in out and dim is not None:
        out["visual.head"] = torch.zeros(dim, out_dim, dtype=out["visual.cls_embedding"].dtype)
    return out


def clip_config_from_transformers(config: Mapping[str, Any]) -> dict[str, Any]:
    """transformers `CLIPVisionConfig` fields -> `models.clip.CLIPImageEncoder` arguments (exact GELU only, as in
    open-clip ViT-H/14)."""
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"image_encoder config: hidden_act {act!r} is not Wan's CLIP ('gelu')")
    dim = config["hidden_size"]
    return dict(image_size=config["image_size"], patch_size=config["patch_size"], dim=dim,
                mlp_ratio=config["intermediate_size"] / dim, out_dim=config.get("projection_dim", 512),
                num_heads=config["num_attention_heads"], num_layers=config["num_hidden_layers"],
                eps=config.get("layer_norm_eps", 1e-5))
