"""LoRA key formats: read a LoRA file and parse its keys into `LoraEntry`s named by the DiT's parameters.

    entries = parse_lora(load_lora("distill_lora.safetensors"), model_keys=model.state_dict())
    lora_geometry(entries)                     # {"dim": 1536, "layers": 30, ...}: the model the shapes fit

Key formats (docs/lightx2v_formats.md, "LoRA files"), all mapped onto the model's parameter names:
- pairs `<m>.lora_up.weight`/`.lora_down.weight`, `.lora_B.weight`/`.lora_A.weight` (B = up), `.lora_B`/`.lora_A`,
  `.lora_B.default.weight` (PEFT), `.lora.up.weight`, `_lora.up.weight`, `.lora_linear_layer.up.weight`;
  optional `<m>.alpha`: scale = alpha / rank (else 1);
- full differences `<m>.diff` -> `<m>.weight`, `<m>.diff_b` -> `<m>.bias`, `<m>.diff_m` -> `<m>.modulation`
  (`diff_m` alone is the head's modulation in diffusers naming);
- prefixes `model.diffusion_model.`, `diffusion_model.`, `base_model.model.`, `transformer.`, `model.`;
  diffusers module names (`blocks.0.attn1.to_q`, `condition_embedder...`, `proj_out`) via `models.convert`;
  kohya/musubi names (`lora_unet_blocks_0_self_attn_q`, resolved against the model's names).
Conv (patch embedding) LoRAs are `up [out, r(,1,1,1)]`, `down [r, in(,1,2,2)]`: the product is reshaped to the weight.

`lora_geometry` reads off the shapes which model a LoRA was made for (dim 1536 -> Wan2.1 1.3B, 5120 -> 14B, in_dim
36 -> I2V, ...) and `describe_geometry` names it; `inference.lora` uses them in its shape-mismatch errors.
Merging, runtime application and checks against a model are in `inference.lora`, which re-exports this module's
public names.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from models.convert import from_diffusers_key, to_diffusers_key

REPO_ROOT = Path(__file__).resolve().parents[1]

# ---- key formats ---------------------------------------------------------------------------------
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "model.")
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
# suffix -> role; matched longest first
SUFFIXES: dict[str, str] = {
    ".lora_up.weight": "up", ".lora_down.weight": "down",
    ".lora_B.default.weight": "up", ".lora_A.default.weight": "down",
    ".lora_B.weight": "up", ".lora_A.weight": "down",
    ".lora_linear_layer.up.weight": "up", ".lora_linear_layer.down.weight": "down",
    ".lora.up.weight": "up", ".lora.down.weight": "down",
    "_lora.up.weight": "up", "_lora.down.weight": "down",
    ".lora_B": "up", ".lora_A": "down",
    ".alpha": "alpha", ".lora_alpha": "alpha",
    ".diff": "diff", ".diff_b": "diff_b", ".diff_m": "diff_m",
}
_SUFFIX_ORDER = sorted(SUFFIXES, key=len, reverse=True)
# the parameter a full difference lands on, in official and in diffusers naming
_DIFF_PARAM = {"diff": ("weight", "weight"), "diff_b": ("bias", "bias"), "diff_m": ("modulation", "scale_shift_table")}
# segments that only occur in diffusers names / only in official names (to pick the reading of ambiguous keys)
_DIFFUSERS_SEGMENTS = {"attn1", "attn2", "condition_embedder", "proj_out", "scale_shift_table", "to_q", "to_k", "to_v",
                       "to_out", "add_k_proj", "add_v_proj", "norm_added_k", "net"}
_OFFICIAL_SEGMENTS = {"self_attn", "cross_attn", "time_embedding", "text_embedding", "time_projection", "img_emb",
                      "head", "modulation", "k_img", "v_img", "norm_k_img", "ffn"}


class LoraError(ValueError):
    """A LoRA file that cannot be read or does not fit the model."""


@dataclass(eq=False)
class LoraEntry:
    """One change to one model tensor: `target` += strength * scale * up @ down ("lora") or strength * diff ("diff").

    kind "unknown" marks a key in no known format (target = the key without its prefix); `keys` are the file's keys.
    """

    target: str
    kind: str  # "lora" | "diff" | "unknown"
    up: Tensor | None = None  # [out, r] (conv: [out, r, 1, 1, 1])
    down: Tensor | None = None  # [r, in] (conv: [r, in, kt, kh, kw])
    diff: Tensor | None = None
    scale: float = 1.0  # alpha / rank, or 1
    keys: tuple[str, ...] = field(default_factory=tuple)

    @property
    def rank(self) -> int:
        return 0 if self.down is None else int(self.down.shape[0])

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """Shape of the change: (out, prod(in dims)) for a LoRA, the tensor's shape for a difference."""
        if self.kind == "lora":
            return int(self.up.shape[0]), math.prod(self.down.shape[1:])
        return tuple(self.diff.shape) if self.diff is not None else ()

    def delta(self, shape: Sequence[int] | None = None, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> Tensor:
        """scale * up @ down (or diff), strength not applied, reshaped to `shape` (the target's shape)."""
        if self.kind == "lora":
            up = self.up.to(device=device, dtype=torch.float32).flatten(1)
            down = self.down.to(device=device, dtype=torch.float32).flatten(1)
            d = (up @ down) * self.scale
        elif self.kind == "diff":
            d = self.diff.to(device=device, dtype=torch.float32)
        else:
            raise LoraError(f"key(s) {list(self.keys)} are in no known LoRA format")
        return (d.reshape(tuple(shape)) if shape is not None else d).to(dtype)


# ---- reading -------------------------------------------------------------------------------------
def resolve_lora_path(path: str | Path, base_dir: str | Path = REPO_ROOT) -> Path:
    """A relative path that does not exist from the working directory resolves against `base_dir` (like model_path)."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = Path(base_dir) / path
    return path


def load_lora(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a LoRA file (.safetensors, or .pt/.pth/.bin/.ckpt read with weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise LoraError(f"{path} is not a LoRA state dict (expected a mapping of names to tensors)")
    return state


def _strip_prefix(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
                break
    return key


def _split_suffix(key: str) -> tuple[str, str] | None:
    """'blocks.0.self_attn.q.lora_up.weight' -> ('blocks.0.self_attn.q', 'up'); 'diff_m' -> ('', 'diff_m')."""
    for suffix in _SUFFIX_ORDER:
        if key.endswith(suffix):
            return key[: -len(suffix)], SUFFIXES[suffix]
        if key == suffix[1:] and suffix.startswith("."):  # a top-level 'diff_m' / 'alpha'
            return "", SUFFIXES[suffix]
    return None


def _param(module: str, name: str) -> str:
    return f"{module}.{name}" if module else name


def _kohya_table(model_keys: Iterable[str]) -> dict[str, str]:
    """underscored module name (official and diffusers spelling) -> official module name."""
    table = {}
    for key in model_keys:
        module = key.rsplit(".", 1)[0] if "." in key else ""
        if module:
            table[module.replace(".", "_")] = module
            table[to_diffusers_key(module).replace(".", "_")] = module
    return table


def _is_diffusers(module: str) -> bool | None:
    segments = set(module.split("."))
    if segments & _DIFFUSERS_SEGMENTS:
        return True
    if segments & _OFFICIAL_SEGMENTS:
        return False
    return None


def parse_lora(state: Mapping[str, Tensor], model_keys: Iterable[str] | None = None) -> list[LoraEntry]:
    """Canonical entries (target = the model's parameter name) for a LoRA state dict in any accepted format.

    `model_keys` (the model's parameter names) resolves kohya names and keys that read differently in official and
    diffusers naming; without it the file's own naming decides. Keys in no known format come back as kind "unknown"
    (`check_lora` reports them with the keys that match nothing). A LoRA pair without its other half, or with
    different ranks in up and down, is a `LoraError`.
    """
    keys = set(model_keys) if model_keys is not None else None
    kohya = _kohya_table(keys) if keys is not None else {}
    groups: dict[str, dict[str, tuple[str, Tensor]]] = defaultdict(dict)
    entries: list[LoraEntry] = []
    votes = {True: 0, False: 0}
    for key, tensor in state.items():
        name = _strip_prefix(key)
        split = _split_suffix(name)
        if split is None:
            entries.append(LoraEntry(name, "unknown", keys=(key,)))
            continue
        module, role = split
        for p in KOHYA_PREFIXES:
            if module.startswith(p):
                module = kohya.get(module[len(p):], module[len(p):].replace("_", "."))
        if role in groups[module]:
            raise LoraError(f"LoRA keys {groups[module][role][0]!r} and {key!r} both give the {role} of {module!r}")
        groups[module][role] = (key, tensor)
        flavour = _is_diffusers(module)
        if flavour is not None:
            votes[flavour] += 1
    file_is_diffusers = votes[True] > votes[False]

    def target(module: str, official: str, diffusers: str) -> str:
        """The model parameter for `module` + a parameter name, read as official or diffusers naming."""
        flavour = _is_diffusers(module)
        first_diffusers = file_is_diffusers if flavour is None else flavour
        readings = [from_diffusers_key(_param(module, diffusers)), _param(module, official)]
        if not first_diffusers:
            readings.reverse()
        if keys is not None:
            for r in readings:
                if r in keys:
                    return r
        return readings[0]

    broken = []
    for module, roles in groups.items():
        if "up" in roles or "down" in roles:
            if not ("up" in roles and "down" in roles):
                broken.append(f"{module}: {'up' if 'up' in roles else 'down'} without "
                              f"{'down' if 'up' in roles else 'up'} ({(roles.get('up') or roles['down'])[0]})")
                continue
            (k_up, up), (k_down, down) = roles["up"], roles["down"]
            if up.ndim < 2 or down.ndim < 2 or up.shape[1] != down.shape[0]:
                broken.append(f"{module}: up {tuple(up.shape)} and down {tuple(down.shape)} do not multiply")
                continue
            ks = (k_up, k_down)
            scale = 1.0
            if "alpha" in roles:
                k_alpha, alpha = roles["alpha"]
                scale = float(alpha) / down.shape[0]
                ks += (k_alpha,)
            entries.append(LoraEntry(target(module, "weight", "weight"), "lora", up=up, down=down, scale=scale,
                                     keys=ks))
        elif "alpha" in roles:  # an alpha without a pair changes nothing: report it as matching nothing
            entries.append(LoraEntry(_param(module, "alpha"), "unknown", keys=(roles["alpha"][0],)))
        for role in ("diff", "diff_b", "diff_m"):
            if role in roles:
                k, t = roles[role]
                entries.append(LoraEntry(target(module, *_DIFF_PARAM[role]), "diff", diff=t, keys=(k,)))
    if broken:
        raise LoraError(f"incomplete LoRA pairs ({len(broken)}): " + "; ".join(broken[:10]))
    return entries


# ---- the model a LoRA was made for ---------------------------------------------------------------
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def lora_geometry(entries: Sequence[LoraEntry]) -> dict:
    """What the shapes of a LoRA say about the model it was made for: dim, in_dim, ffn_dim, layers (a lower bound:
    highest block index + 1), image (True: I2V, False: T2V, None: cannot tell), out_dim."""
    geo: dict = dict(dim=None, in_dim=None, ffn_dim=None, layers=None, image=None, out_dim=None)
    for e in entries:
        if e.kind == "unknown":
            continue
        t, shape = e.target, e.delta_shape
        m = _BLOCK.match(t)
        if m:
            geo["layers"] = max(geo["layers"] or 0, int(m.group(1)) + 1)
            rest = t[m.end():]
            if re.fullmatch(r"(self_attn|cross_attn)\.[qkvo]\.(weight|bias)", rest):
                geo["dim"] = shape[0]
            elif rest == "modulation":
                geo["dim"] = shape[-1]
            elif rest == "ffn.0.weight":
                geo["dim"], geo["ffn_dim"] = shape[1], shape[0]
        if any(s in t for s in ("k_img", "v_img", "img_emb")):
            geo["image"] = True
        if t == "patch_embedding.weight":
            geo["dim"] = shape[0]
            geo["in_dim"] = (e.down.shape[1] if e.down.ndim == 5 else shape[1] // 4) if e.kind == "lora" \
                else e.diff.shape[1]
        if t == "head.head.weight":
            geo["out_dim"] = shape[0] // 4
    if geo["in_dim"] is not None and geo["image"] is None:
        z = geo["out_dim"] or 16
        geo["image"] = True if geo["in_dim"] == 2 * z + 4 else False if geo["in_dim"] == z else None
    return geo


def describe_geometry(geo: dict, exact_layers: bool = False) -> str:
    """`lora_geometry`'s dict in words, with the registry's models that fit ("wan2.1-t2v-1.3b: a T2V model (...)");
    exact_layers: the block count is the model's own, not a lower bound."""
    from models.registry import MODEL_SPECS

    kind = {True: "I2V", False: "T2V", None: "T2V or I2V"}[geo["image"]]
    parts = [f"{k} {geo[k]}" for k in ("dim", "in_dim", "ffn_dim") if geo.get(k) is not None]
    if geo.get("layers"):
        parts.append(f"{geo['layers']} blocks" if exact_layers else f">= {geo['layers']} blocks")
    names = []
    for name, spec in MODEL_SPECS.items():
        d = spec.dit
        if all(geo.get(k) in (None, d[k]) for k in ("dim", "in_dim", "ffn_dim")) and \
                geo.get("image") in (None, d["model_type"] != "t2v") and \
                (geo.get("layers") is None or (d["num_layers"] == geo["layers"] if exact_layers
                                               else d["num_layers"] >= geo["layers"])):
            names.append(name)
    text = f"{'an' if kind.startswith('I') else 'a'} {kind} model ({', '.join(parts)})"
    return f"{' or '.join(names)}: {text}" if names and (geo.get("dim") is not None) else text
