"""Name conversion between the official Wan2.1 DiT and diffusers' `WanTransformer3DModel`.

The rename table of wan21.md ("diffusers rename table"), written as ordered regex rules that only match whole
dotted segments, so they work on parameter names (`blocks.0.self_attn.q.weight`), module names
(`blocks.0.self_attn.q`, used for LoRA targets) and names with a prefix (`diffusion_model.blocks.0...`,
`transformer.blocks.0...`). The norm2 <-> norm3 swap inside a block is done in one pass.

    to_diffusers_key("blocks.3.cross_attn.k_img.weight") == "blocks.3.attn2.add_k_proj.weight"
    from_diffusers_key("scale_shift_table") == "head.modulation"
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

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
    if config["model_type"] in ("i2v", "flf2v"):
        out.update(image_dim=config.get("clip_dim", 1280), added_kv_proj_dim=dim)
    if config["model_type"] == "flf2v":
        out.update(pos_embed_seq_len=2 * 257)
    return out
