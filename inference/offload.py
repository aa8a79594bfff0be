"""Serving a DiT larger than the accelerator: weights on the host, copied in one block (or phase) at a time.

`enable_offload(dit, device, granularity)` keeps the transformer blocks' weights on the host (pinned memory on
CUDA) and copies them to `device` just in time, driven by forward pre-hooks:

- `"block"`: one unit per transformer block. Entering block i activates its device copy, drops block i-1's and
  starts copying block i+1 on a side CUDA stream, so the copy overlaps block i's compute (after the last block
  the first one is prefetched for the next denoising step).
- `"phase"`: three units per block: (modulation, norm1, self-attention), (norm3, cross-attention), (norm2,
  FFN); entered at the block, at `norm3` and at `norm2` (each is called right before its phase's weights).
- `"model"`: the whole DiT is one unit, copied in when the DiT first runs and dropped by `release()` after
  the denoising stage.

Everything outside the blocks (patch/text/time embeddings, head, CLIP projection: ~2% of the 14B) stays on the
device for "block" and "phase". `lazy_load=True` (see `load_dit_lazy`) does not keep the blocks on the host at
all: each unit is read from the safetensors files (memory-mapped) when it is prefetched, so host memory holds
only the units in flight. A resting tensor is then a one-element placeholder expanded to its shape (stride 0,
right shape and dtype, no memory): LoRA shape checks work on it, writes into it fail.

Quantized linears (`QuantLinear`: codes and scales are buffers) and runtime LoRAs (forward hooks and
parametrizations on the same Parameter objects, whose `.data` is what moves) need nothing special. Merged LoRAs
are merged into the host weights before `enable_offload`; with `lazy_load` the files are the weights, so merged
LoRAs are refused by the config (use `lora_mode: "runtime"`).

On a CPU the same code runs with device = cpu and no streams (the tests); the CUDA-only parts are the side
stream, its events and `record_stream` in `_Unit.fetch` / `_Unit.activate`, and pinning in `_host_copy`.
`ComponentOffload` moves the text encoder, CLIP and the VAE to the device only for their stage.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

GRANULARITIES = ("block", "phase", "model")
# phase -> state-dict prefixes inside a block; phase 0 takes everything else (modulation, norm1, self_attn)
PHASES = (("cross_attn", ("norm3.", "cross_attn.")), ("ffn", ("norm2.", "ffn.")))
_PARAMETRIZED = re.compile(r"parametrizations\.([^.]+)\.original$")  # runtime LoRAs on direct tensors
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def check_granularity(granularity: str) -> str:
    """The granularity itself, or a ValueError naming the known ones."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"offload_granularity must be one of {list(GRANULARITIES)} (one transformer block, its "
                         f"attention / cross-attention / FFN parts, or the whole DiT), got {granularity!r}")
    return granularity


def state_name(name: str) -> str:
    """A parameter's name as the checkpoint spells it (runtime-LoRA parametrizations hide it as `...original`)."""
    return _PARAMETRIZED.sub(r"\1", name)


def placeholder(shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """A resting lazily loaded tensor: one element expanded to `shape` (right shape and dtype, no memory)."""
    return torch.zeros((), dtype=dtype).expand(shape)


def is_placeholder(t: Tensor) -> bool:
    return t.numel() > 1 and t.untyped_storage().nbytes() <= t.element_size()


# ---- the tensors of one unit --------------------------------------------------------------------
@dataclass
class _Slot:
    """One tensor of a unit: a Parameter (its `.data` moves, the object stays) or a buffer (replaced)."""

    key: str  # checkpoint key
    owner: nn.Module  # the module holding a buffer (unused for parameters)
    attr: str
    param: nn.Parameter | None
    home: Tensor  # at rest: host copy, or a placeholder when lazy

    def set(self, t: Tensor) -> None:
        if self.param is not None:
            self.param.data = t
        else:
            self.owner._buffers[self.attr] = t


@dataclass
class _Unit:
    """A group of tensors that travels together; `fetch` starts the copy, `activate` points the model at it."""

    name: str
    slots: list[_Slot]
    pending: tuple[list[Tensor], object] | None = None  # (device tensors, CUDA event) of a started copy
    active: bool = False

    @property
    def nbytes(self) -> int:
        return sum(s.home.numel() * s.home.element_size() for s in self.slots)

    def fetch(self, device: torch.device, stream, read: Callable[[_Slot], Tensor]) -> None:
        """Start copying to `device` (on `stream` when CUDA: overlaps the compute on the main stream)."""
        if self.pending is not None or self.active:
            return
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            tensors = [read(s).to(device, non_blocking=True) for s in self.slots]
            event = None
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
        self.pending = (tensors, event)

    def activate(self, device: torch.device, read: Callable[[_Slot], Tensor]) -> None:
        """Make the model use the device copy (fetching it now if no prefetch started it)."""
        if self.active:
            return
        if self.pending is None:
            self.fetch(device, None, read)
        tensors, event = self.pending
        if event is not None:  # CUDA: the compute stream waits for the copy; the allocator waits for the compute
            main = torch.cuda.current_stream(device)
            main.wait_event(event)
            for t in tensors:
                t.record_stream(main)
        for slot, t in zip(self.slots, tensors, strict=True):
            slot.set(t)
        self.pending, self.active = None, True

    def drop(self) -> None:
        """Back to the host copy (or placeholder); the device memory returns to the allocator."""
        for slot in self.slots:
            slot.set(slot.home)
        self.pending, self.active = None, False


# ---- the block offloader ------------------------------------------------------------------------
@dataclass
class OffloadStats:
    """What the offloader did: unit activations, copies started ahead, the most units on the device at once."""

    activations: int = 0
    prefetches: int = 0
    max_active: int = 0
    order: list[str] = field(default_factory=list)  # unit names in activation order (kept for the last 1,000)


class BlockOffloader:
    """Runs a WanModel whose block weights live on the host; see the module docstring.

    `files` (lazy_load): checkpoint key -> safetensors file for every block tensor; the blocks must then hold
    placeholders (`load_dit_lazy`). Without it the current block tensors become the host copies.
    """

    def __init__(self, model: nn.Module, device: torch.device | str, granularity: str = "block",
                 files: dict[str, Path] | None = None) -> None:
        self.granularity = check_granularity(granularity)
        self.model, self.device = model, torch.device(device)
        self.lazy = files is not None
        self._files = files or {}
        self._handles: dict[Path, object] = {}
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.stats = OffloadStats()
        self.units, entries = self._build_units()
        self._hooks = [m.register_forward_pre_hook(self._pre_hook(i)) for i, m in enumerate(entries)]

    # -- construction --
    def _build_units(self) -> tuple[list[_Unit], list[nn.Module]]:
        if self.granularity == "model":
            return [self._unit("model", self.model)], [self.model]
        for name, t in self._outside_blocks():  # resident for the whole session
            resident = t.detach().to(self.device)
            _Slot(name, *self._owner(name), resident).set(resident)
        units, entries = [], []
        for i, block in enumerate(self.model.blocks):
            if self.granularity == "block":
                units.append(self._unit(f"blocks.{i}", block))
                entries.append(block)
                continue
            groups = {"self_attn": [], "cross_attn": [], "ffn": []}
            for name, _ in self._tensors(block):
                phase = next((p for p, prefixes in PHASES if name.startswith(prefixes)), "self_attn")
                groups[phase].append(name)
            for phase, entry in (("self_attn", block), ("cross_attn", block.norm3), ("ffn", block.norm2)):
                units.append(self._unit(f"blocks.{i}.{phase}", block, set(groups[phase])))
                entries.append(entry)
        return units, entries

    @staticmethod
    def _tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
        yield from module.named_parameters()
        yield from module.named_buffers()

    def _outside_blocks(self) -> list[tuple[str, Tensor]]:
        return [(n, t) for n, t in self._tensors(self.model) if not n.startswith("blocks.")]

    def _owner(self, name: str) -> tuple[nn.Module, str, nn.Parameter | None]:
        module_name, _, attr = name.rpartition(".")
        owner = self.model.get_submodule(module_name)
        param = owner._parameters.get(attr)
        return owner, attr, param

    def _unit(self, name: str, module: nn.Module, only: set[str] | None = None) -> _Unit:
        prefix = "" if module is self.model else f"{name.split('.')[0]}.{name.split('.')[1]}."
        slots = []
        for sub, t in self._tensors(module):
            if only is not None and sub not in only:
                continue
            full = prefix + sub
            owner, attr, param = self._owner(full)
            key = state_name(full)
            if self.lazy and key.startswith("blocks."):
                if key not in self._files:
                    raise KeyError(f"lazy_load: {key} is in none of the checkpoint files")
                home = placeholder(t.shape, t.dtype)
            else:
                home = _host_copy(t, self.device)
            slot = _Slot(key, owner, attr, param, home)
            slot.set(home)
            slots.append(slot)
        return _Unit(name, slots)

    # -- running --
    def _read(self, slot: _Slot) -> Tensor:
        """The host tensor of a slot: its home, or (lazy) the tensor read from its safetensors file."""
        if not is_placeholder(slot.home):
            return slot.home
        path = self._files[slot.key]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        t = self._handles[path].get_tensor(slot.key).to(slot.home.dtype)
        return t.pin_memory() if self.device.type == "cuda" else t

    def _pre_hook(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self.enter(index)
        return hook

    def enter(self, index: int) -> None:
        """Unit `index` is about to run: activate it, drop the others except the next one, prefetch the next."""
        unit, n = self.units[index], len(self.units)
        unit.activate(self.device, self._read)
        nxt = (index + 1) % n
        for j, other in enumerate(self.units):
            if j not in (index, nxt) and (other.active or other.pending is not None):
                other.drop()
        if n > 1 and not self.units[nxt].active and self.units[nxt].pending is None:
            self.units[nxt].fetch(self.device, self.stream, self._read)
            self.stats.prefetches += 1
        self.stats.activations += 1
        self.stats.order = [*self.stats.order[-999:], unit.name]
        self.stats.max_active = max(self.stats.max_active, sum(u.active for u in self.units))

    def release(self) -> None:
        """Drop every unit from the device (after the denoising stage)."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        for unit in self.units:
            unit.drop()

    def remove(self) -> None:
        """Undo: hooks off, every weight back on the device (loaded from the files when lazy)."""
        for h in self._hooks:
            h.remove()
        for unit in self.units:
            for slot in unit.slots:
                slot.set(self._read(slot).to(self.device))
        self.model.__dict__.pop("_offloader", None)

    def resident_bytes(self) -> int:
        """Bytes of the units now active on the device (host copies when device is the CPU)."""
        return sum(u.nbytes for u in self.units if u.active)


def _host_copy(t: Tensor, device: torch.device) -> Tensor:
    """The host copy a unit rests in: pinned on CUDA (so copies can be asynchronous), the tensor itself on CPU."""
    t = t.detach()
    if device.type != "cuda":
        return t
    return t.cpu().pin_memory()


def enable_offload(model: nn.Module, device: torch.device | str, granularity: str = "block",
                   files: dict[str, Path] | None = None) -> BlockOffloader:
    """Attach a `BlockOffloader` to a WanModel (its weights on the host or, lazy, placeholders in the blocks)."""
    if getattr(model, "_offloader", None) is not None:
        raise ValueError("offload is already enabled on this model")
    if not hasattr(model, "blocks"):
        raise TypeError(f"offload expects a WanModel (with .blocks), got {type(model).__name__}")
    off = BlockOffloader(model, device, granularity, files)
    model.__dict__["_offloader"] = off
    return off


def offloader(model: nn.Module) -> BlockOffloader | None:
    """The offloader attached to a model, if any."""
    return model.__dict__.get("_offloader")


# ---- lazy loading -------------------------------------------------------------------------------
def safetensors_index(source: str | Path) -> dict[str, Path]:
    """Checkpoint key -> file for a safetensors file, an `.index.json` of shards, or a folder holding either."""
    from models.loading import DIT_WEIGHTS, read_json

    source = Path(source)
    if source.is_dir():
        index = source / f"{DIT_WEIGHTS}.index.json"
        source = index if index.is_file() else source / DIT_WEIGHTS
    if source.name.endswith(".index.json"):
        weight_map = read_json(source)["weight_map"]
        return {k: source.parent / v for k, v in weight_map.items()}
    if source.suffix != ".safetensors" or not source.is_file():
        raise ValueError(f"lazy_load reads blocks from safetensors files; {source} is not one (convert .pt/.pth "
                         "checkpoints with models.loading.write_safetensors first)")
    with safe_open(str(source), framework="pt", device="cpu") as f:
        return dict.fromkeys(f.keys(), source)


def _meta_state(files: dict[str, Path]) -> dict[str, Tensor]:
    """Key -> meta tensor of the stored shape and dtype (headers only, nothing read)."""
    out = {}
    for path in sorted(set(files.values())):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = torch.empty(sl.get_shape(), dtype=_ST_DTYPES[sl.get_dtype()], device="meta")
    return out


def load_dit_lazy(folder: str | Path, distill: bool = False, explicit: str | None = None,
                  dtype: torch.dtype | None = None, *, scheme: str | None = None) -> nn.Module:
    """A WanModel whose blocks hold placeholders and whose other tensors are read (cast to `dtype`); the
    key -> file map of the blocks is `model.lazy_files`. Keys and shapes are checked against the files' headers
    first (same errors as a full load). `scheme` ("int8" | "fp8"): the folder's quantized DiT."""
    from models.components import build_dit
    from models.loading import DIT_CONFIG, check_keys, find_dit_weights, read_json

    folder = Path(folder)
    model = build_dit(read_json(folder / DIT_CONFIG), "meta")
    if scheme is None:
        source = find_dit_weights(folder, distill, explicit).path
        quantized: set[str] = set()
    else:
        from inference.quantized import QuantLinear, _set_module, check_quantized_state, find_quantized_weights

        source = find_quantized_weights(folder, scheme, distill, explicit)
        names = check_quantized_state(_meta_state(safetensors_index(source)), scheme, f"quantized DiT {source}")
        for name in names:
            lin = model.get_submodule(name)
            _set_module(model, name, QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, scheme,
                                                 device="meta"))
        quantized = {f"{n}.{s}" for n in names for s in ("weight", "weight_scale")}
    files = safetensors_index(source)
    shapes = _meta_state(files)
    check_keys(model, shapes, f"DiT weights {source}")
    state = {}
    for key, meta in shapes.items():
        want = dtype if dtype is not None and meta.is_floating_point() and key not in quantized else meta.dtype
        if key.startswith("blocks."):
            state[key] = placeholder(meta.shape, want)
        else:
            with safe_open(str(files[key]), framework="pt", device="cpu") as f:
                state[key] = f.get_tensor(key).to(want)
    model.load_state_dict(state, strict=True, assign=True)
    model.weights_source = str(source)
    model.lazy_files = {k: v for k, v in files.items() if k.startswith("blocks.")}
    return model


# ---- text encoder, CLIP, VAE --------------------------------------------------------------------
class ComponentOffload:
    """Components that rest on the host and visit `device` for their stage only (`with offload.stage(name)`).

    Like the DiT's units: every tensor gets a host copy (pinned on CUDA) and only `.data` moves, so leaving a stage
    copies nothing back (inference never writes weights) and the modules keep their identity."""

    def __init__(self, device: torch.device | str, modules: dict[str, nn.Module]) -> None:
        self.device = torch.device(device)
        self.modules = modules
        self.units = {name: _module_unit(name, module, self.device) for name, module in modules.items()}

    @contextlib.contextmanager
    def stage(self, *names: str) -> Iterator[None]:
        """Put the named components (those managed here; others are ignored) on the device, then back."""
        units = [self.units[n] for n in names if n in self.units]
        for unit in units:
            unit.activate(self.device, lambda slot: slot.home)
        try:
            yield
        finally:
            for unit in units:
                unit.drop()
            if units and self.device.type == "cuda":
                torch.cuda.empty_cache()


def _module_unit(name: str, module: nn.Module, device: torch.device) -> _Unit:
    """One unit holding every parameter and buffer of `module`, resting in host copies."""
    slots = []
    for sub, t in [*module.named_parameters(), *module.named_buffers()]:
        owner_name, _, attr = sub.rpartition(".")
        owner = module.get_submodule(owner_name)
        slot = _Slot(sub, owner, attr, owner._parameters.get(attr), _host_copy(t, device))
        slot.set(slot.home)
        slots.append(slot)
    return _Unit(name, slots)
