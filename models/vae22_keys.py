"""Wan2.2 VAE files: the `Wan22VAE` config read off an official `Wan2.2_VAE.pth` state dict, and the key names
official <-> diffusers `AutoencoderKLWan(is_residual=True, ...)` (docs/wan22_vae.md, "Key layout").

    config = wan22_vae_config_from_state(read_state_dict("Wan2.2_VAE.pth"))   # dim 160, dec_dim 256, z_dim 48, ...
    diffusers_state = wan22_vae_to_diffusers(official_state)
    official_state = wan22_vae_from_diffusers(diffusers_state)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from models.loading import KeyMismatchError, _count, _shape

# ------------------------------------------------------------------------------------------------------------
# Config from the official file's tensor shapes (no config is stored in it).

def wan22_vae_config_from_state(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """`Wan22VAE` arguments from an official `Wan2.2_VAE.pth` state dict: encoder/decoder base widths, latent
    channels, patch size (from the 3*p*p input channels), per-level widths, residual blocks per level and the
    levels that downsample in time, read off the tensors."""
    what = "Wan2.2 VAE"
    dim, pixels = _shape(state, "encoder.conv1.weight", what)[:2]
    patch = math.isqrt(pixels // 3)
    if 3 * patch * patch != pixels:
        raise KeyMismatchError(f"{what}: encoder.conv1 takes {pixels} channels, not 3 x a square patch")
    z_dim = _shape(state, "conv2.weight", what)[0]
    levels = _count(state, r"encoder\.downsamples\.(\d+)\.")
    if not levels or "encoder.downsamples.0.downsamples.0.residual.2.weight" not in state:
        raise KeyMismatchError(f"{what}: no `encoder.downsamples.<i>.downsamples.<j>` blocks; is this a Wan2.1 "
                               "VAE file (Wan2.1_VAE.pth, type wan_vae)?")
    widths, res_blocks, temporal = [], set(), []
    for i in range(levels):
        prefix = f"encoder.downsamples.{i}.downsamples."
        widths.append(_shape(state, f"{prefix}0.residual.2.weight", what)[0])
        n = _count(state, re.escape(prefix) + r"(\d+)\.residual\.")
        res_blocks.add(n)
        if i < levels - 1:
            temporal.append(f"{prefix}{n}.time_conv.weight" in state)
    if len(res_blocks) != 1 or any(w % dim for w in widths):
        raise KeyMismatchError(f"{what}: irregular encoder (residual blocks per level {sorted(res_blocks)}, "
                               f"widths {widths} for base width {dim})")
    dim_mult = [w // dim for w in widths]
    dec_width = _shape(state, "decoder.head.2.weight", what)[1]
    if dec_width % dim_mult[0]:
        raise KeyMismatchError(f"{what}: decoder output width {dec_width} is not a multiple of {dim_mult[0]}")
    return dict(dim=dim, dec_dim=dec_width // dim_mult[0], z_dim=z_dim, dim_mult=dim_mult,
                num_res_blocks=res_blocks.pop(), temporal_downsample=temporal, patch_size=patch)


# ------------------------------------------------------------------------------------------------------------
# Key names: official <-> diffusers `AutoencoderKLWan(is_residual=True, ...)` (the map of diffusers'
# scripts/convert_wan_to_diffusers.py, `convert_vae_22`). Both sides nest blocks per level, so every key maps on
# its own; the shortcuts have no parameters.

_TOP = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
_SIDE = {"conv1": "conv_in", "head.0": "norm_out", "head.2": "conv_out",
         "middle.0": "mid_block.resnets.0", "middle.1": "mid_block.attentions.0", "middle.2": "mid_block.resnets.1"}
_RESIDUAL = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
             "shortcut": "conv_shortcut"}
_LEVEL = {"encoder": ("downsamples", "down_blocks", "downsampler"),
          "decoder": ("upsamples", "up_blocks", "upsampler")}


def _swap_prefix(name: str, table: Mapping[str, str]) -> str | None:
    """`name` with the first matching whole-segment prefix of `table` replaced, or None."""
    for old, new in table.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return None


def _resnet_leaf(leaf: str, table: Mapping[str, str]) -> str:
    return _swap_prefix(leaf, table) or leaf


def wan22_vae_to_diffusers_key(key: str) -> str:
    """Official `Wan2.2_VAE.pth` key -> diffusers `AutoencoderKLWan` (Wan2.2 layout) key, e.g.
    `decoder.upsamples.0.upsamples.3.time_conv.weight` -> `decoder.up_blocks.0.upsampler.time_conv.weight`."""
    top = _swap_prefix(key, _TOP)
    if top is not None:
        return top
    side, _, rest = key.partition(".")
    if side in _LEVEL:
        inner = _swap_prefix(rest, _SIDE)
        if inner is not None:
            m = re.fullmatch(r"(mid_block\.resnets\.\d+)\.(.+)", inner)
            return f"{side}.{m[1]}.{_resnet_leaf(m[2], _RESIDUAL)}" if m else f"{side}.{inner}"
        ours, theirs, sampler = _LEVEL[side]
        m = re.fullmatch(rf"{ours}\.(\d+)\.{ours}\.(\d+)\.(.+)", rest)
        if m:
            level, j, leaf = m.groups()
            if leaf.split(".")[0] in ("resample", "time_conv"):
                return f"{side}.{theirs}.{level}.{sampler}.{leaf}"
            return f"{side}.{theirs}.{level}.resnets.{j}.{_resnet_leaf(leaf, _RESIDUAL)}"
    raise KeyError(f"not a Wan2.2 VAE key: {key}")


def wan22_vae_to_diffusers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official Wan2.2 VAE state dict -> diffusers `AutoencoderKLWan(is_residual=True, ...)` names."""
    return {wan22_vae_to_diffusers_key(k): v for k, v in state.items()}


def wan22_vae_from_diffusers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers `AutoencoderKLWan` (Wan2.2 layout) state dict -> official keys (inverse of
    `wan22_vae_to_diffusers`). A level's resampler sits after its residual blocks in the official list, so its
    index is the level's resnet count, read off the keys."""
    resnets: dict[tuple[str, str], set[str]] = {}
    for key in state:
        m = re.match(r"(encoder|decoder)\.(?:down|up)_blocks\.(\d+)\.resnets\.(\d+)\.", key)
        if m:
            resnets.setdefault((m[1], m[2]), set()).add(m[3])
    top = {v: k for k, v in _TOP.items()}
    side_names = {v: k for k, v in _SIDE.items()}
    residual = {v: k for k, v in _RESIDUAL.items()}
    out = {}
    for key, value in state.items():
        new = _swap_prefix(key, top)
        side, _, rest = key.partition(".")
        if new is None and side in _LEVEL:
            ours, theirs, sampler = _LEVEL[side]
            m = re.fullmatch(r"(mid_block\.resnets\.\d+)\.(.+)", rest)
            if m:
                rest = f"{m[1]}.{_resnet_leaf(m[2], residual)}"
            inner = _swap_prefix(rest, side_names)
            if inner is not None:
                new = f"{side}.{inner}"
            elif m := re.fullmatch(rf"{theirs}\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
                new = f"{side}.{ours}.{m[1]}.{ours}.{m[2]}.{_resnet_leaf(m[3], residual)}"
            elif m := re.fullmatch(rf"{theirs}\.(\d+)\.{sampler}\.(.+)", rest):
                new = f"{side}.{ours}.{m[1]}.{ours}.{len(resnets.get((side, m[1]), ()))}.{m[2]}"
        if new is None:
            raise KeyError(f"not a diffusers AutoencoderKLWan (Wan2.2) key: {key}")
        out[new] = value
    return out
