"""Quantized DiT weights (LightX2V layout) at run time: int8 or fp8 (float8_e4m3fn) linears in every block.

The converter that writes them is `inference/quant.py` (`python -m inference.quant`).

Format (docs/lightx2v_formats.md, "Quantized weights"): the nn.Linear layers of `self_attn` (q, k, v, o),
`cross_attn` (q, k, v, o and
the I2V k_img, v_img) and `ffn` (0, 2) of every block are stored as `<name>.weight` int8 / float8_e4m3fn [out, in]
plus `<name>.weight_scale` fp32 [out, 1], symmetric per output channel:

    scale = max_j |W[i, j]| / qmax      (qmax: 127 for int8, 448 for fp8 e4m3)
    Q     = round(W / scale) (int8)  |  fp8(W / scale)
    W    ~= Q * scale

Every other tensor (embeddings, modulation, norms, head, biases) stays in high precision.

Folder layout written by the converter (LightX2V's: one sub-folder per scheme, `distill_` for a distilled DiT):

    <out>/config.json, components.json + component files (tiny) or the Wan VAE/umT5/tokenizer/CLIP files (real)
    <out>/<scheme>/diffusion_pytorch_model.safetensors            quantized base DiT
    <out>/distill_<scheme>/diffusion_pytorch_model.safetensors    quantized distilled DiT (from distill_models/)

`--out` defaults to the model folder itself (only the sub-folder is written, nothing is copied). Inference configs
select it with `"dit_quantized": true, "dit_quant_scheme": "int8" | "fp8"` (optionally `"dit_quantized_ckpt"`: an
explicit file or folder); `load_quantized_dit` builds the DiT with `QuantLinear` in place of those nn.Linear.

`QuantLinear` computes y = x (Q * scale)^T + b: on the CPU by dequantizing the layer's weight on the fly (one fused
tensor expression per call, no loop over rows); on CUDA with bf16 activations it runs W8A8 with per-token dynamic
activation scales (fp8: `torch._scaled_mm` with row-wise scales; int8: `torch._int_mm`) when the kernel exists,
and falls back to dequantizing otherwise. Runtime LoRAs (`inference.lora.runtime_loras`) hook its forward.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.components import build_dit
from models.loading import (
    DIT_CONFIG,
    DIT_WEIGHTS,
    load_into,
    read_json,
    read_sharded,
)

# scheme -> (storage dtype, largest code); fp8 e4m3fn's largest finite value is 448
SCHEMES: dict[str, tuple[torch.dtype, float]] = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}
QUANT_DTYPES = {dtype: name for name, (dtype, _) in SCHEMES.items()}
# The linears that are quantized (module names of models/wan_model.py); nothing else may hold quantized codes:
# the head and the time MLPs read their weights directly (F.linear on .float()), not through a module forward.
TARGETS = re.compile(r"^blocks\.\d+\.(self_attn\.(q|k|v|o)|cross_attn\.(q|k|v|o|k_img|v_img)|ffn\.(0|2))$")
FORMAT = "stepdistill-quant-v1"  # safetensors metadata "format" of the converter's files


class QuantError(ValueError):
    """A quantized checkpoint that does not follow the layout (or does not match the requested scheme)."""


def canonical_scheme(scheme: str) -> str:
    """Our scheme name for a LightX2V one (`int8-vllm`, `fp8-sgl`, `fp8-q8f`, ...: same per-channel layout);
    other names pass through unchanged (and `scheme_info` names the known ones)."""
    from inference.config import LIGHTX2V_QUANT_SCHEMES

    return LIGHTX2V_QUANT_SCHEMES.get(scheme, scheme)


def scheme_info(scheme: str) -> tuple[torch.dtype, float]:
    """(storage dtype, qmax) of a scheme; an unknown scheme is a ValueError naming the known ones."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; expected one of {list(SCHEMES)}")
    return SCHEMES[scheme]


def subdir_name(scheme: str, distill: bool) -> str:
    """Sub-folder of a model folder that holds the quantized DiT: `int8`, `fp8`, `distill_int8`, `distill_fp8`."""
    scheme_info(scheme)
    return f"distill_{scheme}" if distill else scheme


# ---- the arithmetic ------------------------------------------------------------------------------
@torch.no_grad()
def quantize_weight(weight: Tensor, scheme: str) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel quantization of a linear weight.

    weight: [out, in] float -> (codes [out, in] int8 | float8_e4m3fn, scale [out, 1] fp32), scale = max|W_row| / qmax.
    An all-zero row gets scale 0 and codes 0 (it dequantizes to exactly 0).
    """
    dtype, qmax = scheme_info(scheme)
    if weight.ndim != 2:
        raise ValueError(f"quantize_weight expects a linear weight [out, in], got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    scale = w.abs().amax(dim=1, keepdim=True) / qmax  # [out, 1]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # avoid 0/0 on zero rows
    # clamp: w / scale can exceed qmax by an ulp, and fp8 e4m3fn has no inf (out of range would become NaN)
    x = (w / safe).clamp_(-qmax, qmax)
    codes = x.round_().to(dtype) if dtype == torch.int8 else x.to(dtype)
    return codes, scale


def dequantize_weight(codes: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """codes [out, in] * scale [out, 1], computed in fp32, returned in `dtype`."""
    return (codes.float() * scale.float()).to(dtype)


def relative_error(weight: Tensor, codes: Tensor, scale: Tensor) -> float:
    """||W - dequant(Q)||_F / ||W||_F (0 for an all-zero W)."""
    w = weight.detach().float()
    norm = w.norm()
    return 0.0 if norm == 0 else float((w - dequantize_weight(codes, scale)).norm() / norm)


# ---- the module ----------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """nn.Linear with quantized weights: buffers `weight` (int8 / float8_e4m3fn [out, in]) and `weight_scale`
    (fp32 [out, 1]), parameter `bias` ([out], high precision). x [..., in] -> y [..., out] in x's dtype.

    `w8a8` (class default True) allows the CUDA W8A8 kernels; set it False on an instance (or the class) to always
    dequantize. int8 uses `torch._int_mm` only when `int8_mm` is also True: on an H200 (torch 2.11) the unfused
    per-token activation quantization made it 2.4-3.3x slower than bf16 and ~2x slower than dequantizing
    (benchmarks/results/gpu_check_h200.json), so int8 dequantizes by default; fp8 `_scaled_mm` was 1.0-1.6x
    the bf16 time. Casting the module (`model.to(torch.bfloat16)`) casts the bias only: codes and fp32 scales keep their
    dtype (a device move applies to all)."""

    w8a8: bool = True
    int8_mm: bool = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scheme: str = "int8",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        qdtype, _ = scheme_info(scheme)
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=qdtype, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        b = torch.zeros(out_features, dtype=dtype or torch.float32, device=device) if bias else None
        self.bias = None if b is None else nn.Parameter(b, requires_grad=False)
        self._fast_failed = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str) -> QuantLinear:
        """Quantize an nn.Linear (the bias is kept as it is)."""
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme, device=linear.weight.device,
                dtype=linear.weight.dtype)
        codes, scale = quantize_weight(linear.weight, scheme)
        q.weight, q.weight_scale = codes, scale
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight the module represents: [out, in] in `dtype`."""
        return dequantize_weight(self.weight, self.weight_scale, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.w8a8 and x.is_cuda and not self._fast_failed and self._fast_ok(x):
            try:
                return self._forward_w8a8(x)
            except RuntimeError as e:  # a kernel missing on this GPU / torch build: dequantize from now on
                self._fast_failed = True
                warnings.warn(f"QuantLinear: W8A8 {self.scheme} kernel unavailable ({e}); dequantizing instead",
                              stacklevel=2)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def _fast_ok(self, x: Tensor) -> bool:
        """The kernels' constraints: bf16 activations, dims multiples of 16, fp8 needs compute capability >= 8.9."""
        if x.dtype != torch.bfloat16 or self.in_features % 16 or self.out_features % 16:
            return False
        if self.scheme == "fp8":
            return hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(x.device) >= (8, 9)
        return self.int8_mm and hasattr(torch, "_int_mm") and x.numel() // self.in_features > 16  # _int_mm: M > 16

    def _forward_w8a8(self, x: Tensor) -> Tensor:
        """Per-token dynamic activation scales a_scale [M, 1]; y = (Qx Qw^T) * a_scale * w_scale^T + b."""
        _, qmax = SCHEMES[self.scheme]
        x2 = x.reshape(-1, self.in_features)
        a_scale = x2.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-12) / qmax  # [M, 1]
        xs = (x2.float() / a_scale).clamp_(-qmax, qmax).contiguous()
        if self.scheme == "fp8":
            y = torch._scaled_mm(xs.to(torch.float8_e4m3fn), self.weight.t(), scale_a=a_scale,
                                 scale_b=self.weight_scale.t(), out_dtype=x.dtype)
        else:
            acc = torch._int_mm(xs.round_().to(torch.int8), self.weight.t())  # int32 [M, out]
            y = (acc.float() * a_scale * self.weight_scale.t()).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 (nn.Module's signature)
        codes, scale = self.weight, self.weight_scale
        super()._apply(fn, recurse)
        # dtype casts must not touch the codes (the format) nor the fp32 scales; device moves do
        if self.weight.dtype != codes.dtype:
            self.weight = codes.to(self.weight.device)
        if self.weight_scale.dtype != scale.dtype:
            self.weight_scale = scale.to(self.weight_scale.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme}")


def target_names(model: nn.Module) -> list[str]:
    """Names of the linears that are quantized (see TARGETS), in model order."""
    return [n for n, m in model.named_modules() if TARGETS.match(n) and isinstance(m, nn.Linear | QuantLinear)]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: str) -> dict[str, float]:
    """Replace the target nn.Linear layers of a DiT by `QuantLinear` in place; returns name -> relative error."""
    scheme_info(scheme)
    errors = {}
    for name in target_names(model):
        lin = model.get_submodule(name)
        if isinstance(lin, nn.Linear):
            q = QuantLinear.from_linear(lin, scheme)
            errors[name] = relative_error(lin.weight, q.weight, q.weight_scale)
            _set_module(model, name, q)
    return errors


@torch.no_grad()
def quantize_state_dict(state: Mapping[str, Tensor], scheme: str) -> tuple[dict[str, Tensor], dict[str, float]]:
    """A DiT state dict -> (quantized state dict in the LightX2V layout, layer name -> relative error).

    Target weights become codes + `weight_scale`; every other tensor is returned as it is."""
    scheme_info(scheme)
    out: dict[str, Tensor] = {}
    errors: dict[str, float] = {}
    for key, t in state.items():
        name = key.removesuffix(".weight")
        if key.endswith(".weight") and TARGETS.match(name) and t.ndim == 2:
            codes, scale = quantize_weight(t, scheme)
            out[key], out[f"{name}.weight_scale"] = codes, scale
            errors[name] = relative_error(t, codes, scale)
        else:
            out[key] = t
    return out, errors


# ---- memory --------------------------------------------------------------------------------------
def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def module_bytes(model: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (what the weights occupy in memory)."""
    return tensor_bytes([*model.parameters(), *model.buffers()])


def projected_bytes(state: Mapping[str, Tensor], dtype: torch.dtype, scheme: str | None = None) -> int:
    """Bytes of a (high-precision) DiT state dict stored in `dtype`, with the target linears in `scheme` (1 byte per
    weight + a 4-byte scale per output channel) when given."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for key, t in state.items():
        name = key.removesuffix(".weight")
        if scheme is not None and key.endswith(".weight") and TARGETS.match(name) and t.ndim == 2:
            total += t.numel() + 4 * t.shape[0]
        else:
            total += t.numel() * itemsize
    return total


# ---- loading -------------------------------------------------------------------------------------
def _weights_in(path: Path) -> Path | None:
    """The DiT weights file in a folder (single file or the index of shards), or the file itself."""
    if path.is_file():
        return path
    for name in (DIT_WEIGHTS, f"{DIT_WEIGHTS}.index.json"):
        if (path / name).is_file():
            return path / name
    return None


def find_quantized_weights(folder: str | Path, scheme: str, distill: bool = False,
                           explicit: str | Path | None = None) -> Path:
    """The quantized DiT of a folder: `explicit` (dit_quantized_ckpt: a file or folder) > `<folder>/distill_<scheme>/`
    (distill) > `<folder>/<scheme>/`. Raises FileNotFoundError naming the expected paths."""
    folder, scheme = Path(folder), canonical_scheme(scheme)
    if explicit is not None:
        found = _weights_in(Path(explicit))
        if found is None:
            raise FileNotFoundError(f"dit_quantized_ckpt not found: {explicit} (expected a safetensors file or a "
                                    f"folder holding {DIT_WEIGHTS})")
        return found
    candidates = [folder / subdir_name(scheme, True)] if distill else []
    candidates.append(folder / subdir_name(scheme, False))
    for cand in candidates:
        found = _weights_in(cand)
        if found is not None:
            return found
    expected = " or ".join(str(c / DIT_WEIGHTS) for c in candidates)
    others = sorted(p.name for p in folder.iterdir() if p.is_dir() and _weights_in(p) and
                    p.name.removeprefix("distill_") in SCHEMES) if folder.is_dir() else []
    hint = f" (the folder has quantized weights for: {others})" if others else ""
    raise FileNotFoundError(f"dit_quantized is true but there are no {scheme} DiT weights: expected {expected}{hint}. "
                            f"Write them with `python -m inference.quant --model_path {folder} --scheme {scheme}`, "
                            "or set dit_quantized_ckpt")


def check_quantized_state(state: Mapping[str, Tensor], scheme: str, what: str = "quantized DiT") -> list[str]:
    """Validate a quantized state dict against the layout; returns the names of the quantized linears.

    Errors (QuantError) name the keys: no quantized weight at all, codes of another scheme, a missing or misshapen
    `weight_scale`, a scale without codes, quantized tensors outside the target linears."""
    qdtype, _ = scheme_info(scheme)
    quant = {k.removesuffix(".weight"): v for k, v in state.items()
             if k.endswith(".weight") and v.dtype in QUANT_DTYPES}
    if not quant:
        raise QuantError(f"{what} holds no quantized weights ({scheme}: {qdtype}); expected a file written by "
                         "`python -m inference.quant`")
    other = sorted(f"{n}.weight ({v.dtype})" for n, v in quant.items() if v.dtype != qdtype)
    if other:
        raise QuantError(f"{what} does not hold {scheme} weights: {len(other)} tensor(s) are of another scheme, e.g. "
                         f"{other[:3]}; set dit_quant_scheme to match the file")
    outside = sorted(n for n in quant if not TARGETS.match(n))
    if outside:
        raise QuantError(f"{what} has quantized weights outside the self_attn/cross_attn/ffn linears: {outside[:5]}")
    missing = [f"{n}.weight_scale" for n in quant if f"{n}.weight_scale" not in state]
    if missing:
        more = f", ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise QuantError(f"{what} lacks {len(missing)} weight_scale key(s): {', '.join(missing[:10])}{more}")
    orphans = sorted(k for k in state if k.endswith(".weight_scale") and k.removesuffix(".weight_scale") not in quant)
    if orphans:
        raise QuantError(f"{what} has weight_scale key(s) without quantized weights: {orphans[:5]}")
    bad = [f"{n}.weight_scale {tuple(state[f'{n}.weight_scale'].shape)} {state[f'{n}.weight_scale'].dtype}"
           for n, w in quant.items()
           if tuple(state[f"{n}.weight_scale"].shape) != (w.shape[0], 1) or state[f"{n}.weight_scale"].dtype !=
           torch.float32]
    if bad:
        raise QuantError(f"{what}: weight_scale must be fp32 [out, 1]; got {bad[:3]}")
    return list(quant)


def load_quantized_dit(folder: str | Path, distill: bool = False, explicit: str | None = None,
                       dtype: torch.dtype | None = None, *, scheme: str) -> nn.Module:
    """A WanModel from `<folder>/config.json` and the folder's quantized weights (see `find_quantized_weights`):
    the quantized linears become `QuantLinear`, every other tensor is cast to `dtype` (when given)."""
    folder, scheme = Path(folder), canonical_scheme(scheme)
    path = find_quantized_weights(folder, scheme, distill, explicit)
    state = read_sharded(path.parent, path.name.removesuffix(".index.json")) if path.name.endswith(".index.json") \
        else read_sharded(path.parent, path.name)
    names = check_quantized_state(state, scheme, f"quantized DiT {path}")
    keep = {f"{n}.{s}" for n in names for s in ("weight", "weight_scale")}
    if dtype is not None:
        state = {k: v.to(dtype) if k not in keep and v.is_floating_point() else v for k, v in state.items()}
    model = build_dit(read_json(folder / DIT_CONFIG), "meta")
    for name in names:
        lin = model.get_submodule(name)
        _set_module(model, name, QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, scheme,
                                             device="meta"))
    load_into(model, state, f"quantized DiT {path}")
    model.weights_source = str(path)
    return model


