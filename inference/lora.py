"""LoRA files on the Wan DiT: merge into the weights, or apply at runtime, after checking them against the model.

    entries = parse_lora(load_lora("distill_lora.safetensors"), model_keys=model.state_dict())
    merge_loras(model, [(entries, 1.0), ("style.safetensors", 0.6)])      # W += s * scale * up @ down, in order

    loras = runtime_loras(model)                                           # unmerged: the base stays as it is
    loras.add("distill_lora.safetensors", 1.0, name="distill")
    loras.add("style.safetensors", 0.6, name="style")
    loras.set_strength("style", 0.3); loras.remove("style")                # between requests, no reload

Reading a file and parsing its key formats (every common one: diffusers, kohya, PEFT, ...) is in
`inference.lora_keys`; its public names (`LoraEntry`, `LoraError`, `parse_lora`, `load_lora`, `resolve_lora_path`,
`lora_geometry`) are re-exported here.

Checks (`check_lora`): a key that matches nothing in the model is an error that lists the keys; a shape mismatch is
an error that says which model the LoRA seems to be made for (dim 1536 -> Wan2.1 1.3B, 5120 -> 14B, in_dim 36 ->
I2V, ...); a LoRA that changes only part of the model is a `LoraCoverageWarning` with the counts.

Runtime application (`RuntimeLoras`), avoiding LightX2V's defects: every key is applied (non-block layers and
`.diff_m` included) and each LoRA contributes its own product, y = base(x) + sum_i s_i scale_i (x down_i^T) up_i^T
(the A's and B's of different LoRAs are never summed). Linears called through their forward (attention, FFN, text
and image embeddings) get a forward hook, so the base module may be a quantized linear; parameters read directly by
the model (modulation, norms, patch embedding, head, time embedding/projection: see `DIRECT_ACCESS`) get a
`torch.nn.utils.parametrize` parametrization W + sum_i s_i delta_i, whose `original` is the untouched base tensor.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from inference.lora_keys import (  # re-exported: the public import path of the parsing side stays inference.lora
    REPO_ROOT,
    LoraEntry,
    LoraError,
    describe_geometry,
    load_lora,
    lora_geometry,
    parse_lora,
    resolve_lora_path,
)

# WanModel reads these modules' parameters directly (Head's F.linear, the fp32 time MLPs), not through forward():
# a forward hook would never run, so the runtime path parametrizes their weights instead.
DIRECT_ACCESS = re.compile(r"^(head\.head|time_embedding\.\d+|time_projection\.\d+)$")


class LoraCoverageWarning(UserWarning):
    """A LoRA that changes only part of the model's tensors (normal for attention-only LoRAs)."""


# ---- reading -------------------------------------------------------------------------------------
def _as_entries(source: str | Path | Mapping[str, Tensor] | Sequence[LoraEntry],
                model_keys: Iterable[str]) -> tuple[list[LoraEntry], str]:
    if isinstance(source, (str, Path)):
        return parse_lora(load_lora(source), model_keys), Path(source).name
    if isinstance(source, Mapping):
        return parse_lora(source, model_keys), "LoRA"
    return list(source), "LoRA"


# ---- the model side ------------------------------------------------------------------------------
def model_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Parameter and buffer names -> base tensors; a parametrized tensor appears under its plain name with its
    `original` (the base, without runtime LoRAs)."""
    out: dict[str, Tensor] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if ".parametrizations." in name or name.startswith("parametrizations."):
            head, _, rest = name.partition("parametrizations.")
            pname, _, leaf = rest.partition(".")
            if leaf == "original":
                out[head + pname] = t
            continue
        out[name] = t
    return out


def describe_model(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, dict) or "dim" not in cfg:
        return type(model).__name__
    return describe_geometry(dict(dim=cfg["dim"], in_dim=cfg["in_dim"], ffn_dim=cfg.get("ffn_dim"),
                                  layers=cfg["num_layers"], image=cfg["model_type"] != "t2v"), exact_layers=True)


def _fits(entry: LoraEntry, tensor: Tensor) -> bool:
    if entry.kind == "lora":
        return tensor.ndim >= 2 and entry.delta_shape == (tensor.shape[0], math.prod(tensor.shape[1:]))
    squeeze = tuple(s for s in entry.diff.shape if s != 1)
    return entry.diff.numel() == tensor.numel() and squeeze == tuple(s for s in tensor.shape if s != 1)


def _shown_shape(e: LoraEntry) -> list[int]:
    """The shape of an entry's change as the weight would have it (conv LoRAs: [out, in, kt, kh, kw])."""
    if e.kind == "lora" and e.down.ndim > 2:
        return [int(e.up.shape[0]), *e.down.shape[1:]]
    return list(e.delta_shape)


def _listing(items: Sequence[str], n: int = 20) -> str:
    more = f", ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def check_lora(model: nn.Module, entries: Sequence[LoraEntry], name: str = "LoRA",
               strict: bool = True) -> list[LoraEntry]:
    """The entries that apply to `model`; raises `LoraError` for keys that match nothing (listed) and for shape
    mismatches (naming the model the LoRA seems to be for); warns (`LoraCoverageWarning`) with counts when the LoRA
    changes only part of the model. strict=False skips what does not fit with a warning (an error if nothing fits).
    """
    tensors = model_tensors(model)
    unmatched = [e for e in entries if e.kind == "unknown" or e.target not in tensors]
    mismatched = [e for e in entries if e.kind != "unknown" and e.target in tensors and not _fits(e, tensors[e.target])]
    bad = {id(e) for e in unmatched + mismatched}
    good = [e for e in entries if id(e) not in bad]
    if unmatched or mismatched:
        parts = []
        if unmatched:
            keys = [k for e in unmatched for k in e.keys]
            parts.append(f"{len(keys)} key(s) match nothing in the model: {_listing(keys)}")
        if mismatched:
            shapes = [f"{e.target}: LoRA {_shown_shape(e)} vs model {list(tensors[e.target].shape)}"
                      for e in mismatched]
            parts.append(f"{len(mismatched)} tensor(s) have other shapes: {_listing(shapes, 5)}")
        geo = lora_geometry(entries)
        msg = (f"{name} does not fit this model ({describe_model(model)}): " + "; ".join(parts)
               + f". The LoRA seems to be for {describe_geometry(geo)}.")
        if strict or not good:
            raise LoraError(msg)
        warnings.warn(f"{msg} Skipping {len(unmatched) + len(mismatched)} of {len(entries)} entries.",
                      LoraCoverageWarning, stacklevel=3)
    total = sum(1 for k in tensors if not k.endswith("weight_scale"))
    touched = {e.target for e in good}
    if len(touched) < total:
        n_lora = sum(e.kind == "lora" for e in good)
        warnings.warn(f"{name} changes {len(touched)} of the model's {total} tensors ({n_lora} low-rank, "
                      f"{len(good) - n_lora} full differences); the other {total - len(touched)} keep their base "
                      "values", LoraCoverageWarning, stacklevel=3)
    return good


def prepare_lora(model: nn.Module, source: str | Path | Mapping[str, Tensor] | Sequence[LoraEntry],
                 name: str | None = None, strict: bool = True) -> list[LoraEntry]:
    """Read (path), parse (state dict) and check a LoRA against `model`; returns the entries to apply."""
    entries, default = _as_entries(source, model_tensors(model))
    return check_lora(model, entries, name or default, strict)


def _split_target(target: str) -> tuple[str, str]:
    module, _, attr = target.rpartition(".")
    return module, attr


# ---- merged --------------------------------------------------------------------------------------
@torch.no_grad()
def merge_loras(model: nn.Module, loras: Sequence[tuple[str | Path | Mapping[str, Tensor] | Sequence[LoraEntry],
                                                        float]], strict: bool = True) -> nn.Module:
    """W += strength * scale * up @ down (diffs: W += strength * diff) for each LoRA, in order, in fp32 then cast
    back to W's dtype. Every LoRA is checked before any weight changes. Quantized (integer / fp8) weights cannot
    take a merge: use the runtime path (`RuntimeLoras`) or merge before quantizing."""
    prepared = [(prepare_lora(model, src, strict=strict), float(s)) for src, s in loras]
    tensors = model_tensors(model)
    for entries, _ in prepared:
        for e in entries:
            t = tensors[e.target]
            if not t.is_floating_point() or t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                raise LoraError(f"cannot merge a LoRA into {e.target} ({t.dtype}, quantized): use lora_mode "
                                "'runtime', or merge the LoRA before quantizing")
    for entries, strength in prepared:
        for e in entries:
            t = tensors[e.target]
            t.copy_((t.float() + strength * e.delta(t.shape, device=t.device)).to(t.dtype))
    return model


# ---- runtime -------------------------------------------------------------------------------------
def _is_linear_like(module: nn.Module) -> bool:
    """nn.Linear or a quantized linear (anything with in_features/out_features and a linear forward)."""
    return isinstance(module, nn.Linear) or (hasattr(module, "in_features") and hasattr(module, "out_features"))


@dataclass
class _Term:
    lora: str  # the runtime LoRA's name (its strength lives in RuntimeLoras.strengths)
    kind: str  # "lora" (down, up) | "dense" (weight delta) | "bias"
    tensors: list[Tensor]  # fp32 masters, where the LoRA was read (CPU)
    scale: float = 1.0
    _cache: tuple = ()  # ((device, dtype), tensors there): the copy the forward uses

    def on(self, ref: Tensor) -> list[Tensor]:
        """The term's tensors on ref's device and in ref's dtype (converted once from the fp32 masters)."""
        key = (ref.device, ref.dtype)
        if not self._cache or self._cache[0] != key:
            self._cache = (key, [t.to(ref.device, ref.dtype) for t in self.tensors])
        return self._cache[1]


class _LinearHook:
    """Forward hook: y = base(x) + sum over terms of s * scale * (x down^T) up^T (dense: x dW^T; bias: + db)."""

    def __init__(self, strengths: dict[str, float]) -> None:
        self.strengths = strengths
        self.terms: list[_Term] = []
        self.handle = None

    def __call__(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        x = args[0]
        for term in self.terms:
            s = self.strengths[term.lora]
            if s == 0:
                continue
            ts = term.on(x)
            if term.kind == "lora":
                down, up = ts
                out = out + F.linear(F.linear(x, down) * (s * term.scale), up).to(out.dtype)
            elif term.kind == "dense":
                out = out + F.linear(x, ts[0] * s).to(out.dtype)
            else:
                out = out + (ts[0] * s).to(out.dtype)
        return out


class _AddDelta(nn.Module):
    """Parametrization W -> W + sum_i s_i * delta_i (fp32 sum, cast back); the base stays in `original`."""

    def __init__(self, strengths: dict[str, float], shape: torch.Size) -> None:
        super().__init__()
        self.strengths, self.shape = strengths, tuple(shape)
        self.terms: list[_Term] = []

    def forward(self, w: Tensor) -> Tensor:
        active = [(t, self.strengths[t.lora]) for t in self.terms if self.strengths[t.lora] != 0]
        if not active:
            return w
        ref = torch.empty((), device=w.device, dtype=torch.float32)
        out = w.float()
        for term, s in active:
            ts = term.on(ref)
            if term.kind == "lora":
                down, up = ts
                out = out + (s * term.scale) * (up.flatten(1) @ down.flatten(1)).reshape(self.shape)
            else:
                out = out + s * ts[0].reshape(self.shape)
        return out.to(w.dtype)


class RuntimeLoras:
    """Unmerged LoRAs on a model: add, re-weight, switch and remove between requests without touching the base.

    Get the one attached to a model with `runtime_loras(model)`. LoRAs compose: each adds its own
    strength * scale * up @ down. `remove` (or `clear`) restores the exact original modules and parameters.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.strengths: dict[str, float] = {}
        self._targets: dict[str, list[str]] = {}  # LoRA name -> targets it touches
        self._hooks: dict[str, _LinearHook] = {}  # module name -> hook
        self._params: dict[str, _AddDelta] = {}  # parameter name -> parametrization

    @property
    def names(self) -> list[str]:
        return list(self.strengths)

    def add(self, source: str | Path | Mapping[str, Tensor] | Sequence[LoraEntry], strength: float = 1.0,
            name: str | None = None, strict: bool = True) -> str:
        """Attach a LoRA (path, state dict or entries) under `name` (default: the file's stem); returns the name."""
        if name is None:
            name = Path(source).stem if isinstance(source, (str, Path)) else f"lora{len(self.strengths)}"
            base, i = name, 2
            while name in self.strengths:
                name, i = f"{base}#{i}", i + 1
        elif name in self.strengths:
            raise LoraError(f"a runtime LoRA named {name!r} is already attached; remove it first")
        entries = prepare_lora(self.model, source, name, strict)
        tensors = model_tensors(self.model)
        plan = []  # validate everything before changing the model
        for e in entries:
            module_name, attr = _split_target(e.target)
            module = self.model.get_submodule(module_name)
            hooked = attr in ("weight", "bias") and _is_linear_like(module) and not DIRECT_ACCESS.match(module_name)
            if not hooked and not tensors[e.target].is_floating_point():
                raise LoraError(f"cannot apply a runtime LoRA to {e.target} ({tensors[e.target].dtype}): the model "
                                "reads this tensor directly")
            plan.append((e, module_name, attr, module, hooked))
        self.strengths[name] = float(strength)
        self._targets[name] = []
        for e, module_name, attr, module, hooked in plan:
            if hooked:
                if attr == "bias":
                    term = _Term(name, "bias", [e.diff.float().reshape(-1)])
                elif e.kind == "lora":
                    term = _Term(name, "lora", [e.down.float().flatten(1), e.up.float().flatten(1)], e.scale)
                else:
                    w = tensors[e.target]
                    term = _Term(name, "dense", [e.diff.float().reshape(w.shape[0], -1)])
                self._hook(module_name, module).terms.append(term)
            else:
                if e.kind == "lora":
                    term = _Term(name, "lora", [e.down.float(), e.up.float()], e.scale)
                else:
                    term = _Term(name, "dense", [e.diff.float()])
                self._param(e.target, module, attr, tensors[e.target].shape).terms.append(term)
            self._targets[name].append(e.target)
        return name

    def _hook(self, module_name: str, module: nn.Module) -> _LinearHook:
        if module_name not in self._hooks:
            hook = _LinearHook(self.strengths)
            hook.handle = module.register_forward_hook(hook)
            self._hooks[module_name] = hook
        return self._hooks[module_name]

    def _param(self, target: str, module: nn.Module, attr: str, shape: torch.Size) -> _AddDelta:
        if target not in self._params:
            p = _AddDelta(self.strengths, shape)
            parametrize.register_parametrization(module, attr, p)
            self._params[target] = p
        return self._params[target]

    def set_strength(self, name: str, strength: float) -> None:
        """Re-weight an attached LoRA (0 switches it off without detaching it)."""
        self._require(name)
        self.strengths[name] = float(strength)

    def remove(self, name: str) -> None:
        """Detach a LoRA; modules and parameters no other LoRA uses get their original form back."""
        self._require(name)
        for module_name, hook in list(self._hooks.items()):
            hook.terms = [t for t in hook.terms if t.lora != name]
            if not hook.terms:
                hook.handle.remove()
                del self._hooks[module_name]
        for target, p in list(self._params.items()):
            p.terms = [t for t in p.terms if t.lora != name]
            if not p.terms:
                module_name, attr = _split_target(target)
                parametrize.remove_parametrizations(self.model.get_submodule(module_name), attr,
                                                    leave_parametrized=False)
                del self._params[target]
        del self.strengths[name], self._targets[name]

    def clear(self) -> None:
        for name in list(self.strengths):
            self.remove(name)

    def _require(self, name: str) -> None:
        if name not in self.strengths:
            raise KeyError(f"no runtime LoRA named {name!r}; attached: {self.names}")

    def __repr__(self) -> str:
        return f"RuntimeLoras({self.strengths})"


def runtime_loras(model: nn.Module) -> RuntimeLoras:
    """The `RuntimeLoras` attached to `model` (created on first use)."""
    rt = model.__dict__.get("_runtime_loras")
    if rt is None:
        rt = RuntimeLoras(model)
        model.__dict__["_runtime_loras"] = rt
    return rt


LORA_MODES = ("merge", "runtime")


def apply_lora_configs(model: nn.Module, specs: Sequence, mode: str = "merge",
                       base_dir: str | Path = REPO_ROOT) -> RuntimeLoras | None:
    """Apply the inference config's `lora_configs` ([LoraSpec(path, strength)], in order) to the DiT: merged into
    the weights ("merge") or attached unmerged ("runtime": returns the `RuntimeLoras`)."""
    if mode not in LORA_MODES:
        raise ValueError(f"lora_mode must be one of {list(LORA_MODES)}, got {mode!r}")
    loras = [(resolve_lora_path(s.path, base_dir), float(s.strength)) for s in specs]
    for path, _ in loras:
        if not path.is_file():
            raise FileNotFoundError(f"LoRA file not found: {path}")
    if mode == "merge":
        if loras:
            merge_loras(model, loras)
        return None
    rt = runtime_loras(model)
    for path, strength in loras:
        rt.add(path, strength)
    return rt
