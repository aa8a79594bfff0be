"""Converter of DiT weights to the quantized LightX2V layout (the format and the runtime: `inference/quantized.py`).

    python -m inference.quant --config configs/infer/tiny/t2v_distill_4step.json \
        --out checkpoints/tiny-t2v-distill-4step-quant --scheme int8
    python -m inference.quant --model_path /models/Wan2.1-T2V-14B --scheme fp8 \
        --lora /loras/style.safetensors --lora_strength 0.8          # merge the LoRA, then quantize; --out: in place

LoRAs (the config's merge-mode ones and --lora files) are merged into the fp32 weights first, then the block
linears are quantized per output channel; the per-layer relative errors and a before/after memory table are
printed and written next to the weights. `--out` defaults to the model folder itself (only the scheme's
sub-folder is written).
"""


from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from inference.quantized import (
    FORMAT,
    QUANT_DTYPES,
    SCHEMES,
    projected_bytes,
    quantize_state_dict,
    scheme_info,
    subdir_name,
)
from inference.schedule import read_schedule, write_schedule
from models.components import copy_components, load_dit
from models.loading import (
    DIT_CONFIG,
    DIT_WEIGHTS,
    find_dit_weights,
    write_safetensors,
)


# ---- the converter -------------------------------------------------------------------------------
def error_table(errors: Mapping[str, float]) -> str:
    """Markdown table of relative errors per layer kind (`self_attn.q`, ..., `ffn.2`): count, max, mean."""
    kinds: dict[str, list[float]] = defaultdict(list)
    for name, err in errors.items():
        kinds[re.sub(r"^blocks\.\d+\.", "", name)].append(err)
    lines = ["| layer | count | max rel. error | mean rel. error |", "|---|---|---|---|"]
    for kind, errs in kinds.items():
        lines.append(f"| {kind} | {len(errs)} | {max(errs):.2e} | {sum(errs) / len(errs):.2e} |")
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def memory_table(state: Mapping[str, Tensor], source_dtype: torch.dtype, scheme: str) -> tuple[str, int, int]:
    """Markdown table of DiT weight bytes (fp32, bf16, int8 / fp8 with the rest in bf16, before -> after);
    returns (table, bytes before, bytes after)."""
    before = projected_bytes(state, source_dtype)
    after = projected_bytes(state, source_dtype, scheme)
    rows = [("fp32", projected_bytes(state, torch.float32)), ("bf16", projected_bytes(state, torch.bfloat16)),
            ("int8 (rest bf16)", projected_bytes(state, torch.bfloat16, "int8")),
            ("fp8 (rest bf16)", projected_bytes(state, torch.bfloat16, "fp8")),
            (f"before: source ({str(source_dtype).removeprefix('torch.')})", before),
            (f"after: {scheme} (rest {str(source_dtype).removeprefix('torch.')})", after)]
    lines = ["| DiT weights | bytes | size |", "|---|---|---|"]
    lines += [f"| {label} | {n} | {_mb(n)} |" for label, n in rows]
    return "\n".join(lines), before, after


def _lora_list(cfg: Any, loras: Sequence[str], strengths: Sequence[float]) -> list[tuple[Path, float]]:
    from inference.lora import REPO_ROOT, resolve_lora_path

    if len(strengths) > len(loras):
        raise ValueError(f"{len(strengths)} --lora_strength values for {len(loras)} --lora files")
    out = []
    if cfg is not None and cfg.lora_mode == "merge":
        out += [(resolve_lora_path(s.path, REPO_ROOT), float(s.strength)) for s in cfg.lora_configs]
    out += [(Path(p), float(strengths[i]) if i < len(strengths) else 1.0) for i, p in enumerate(loras)]
    for path, _ in out:
        if not path.is_file():
            raise FileNotFoundError(f"LoRA file not found: {path}")
    return out


def convert(model_path: str | Path, out: str | Path | None, scheme: str, loras: Sequence[tuple[Path, float]] = (),
            distill: bool | None = None, explicit: str | None = None) -> dict[str, Any]:
    """Load the DiT of `model_path` (distill_models/ when `distill`, default: when present), merge `loras` in fp32,
    quantize, write `<out>/<subdir>/diffusion_pytorch_model.safetensors` (+ config and components when `out` is a
    new folder). Returns a summary: path, errors (layer -> relative error), bytes before/after, tables."""
    from inference.lora import merge_loras

    model_path = Path(model_path)
    out = Path(out) if out is not None else model_path
    scheme_info(scheme)
    if distill is None:
        distill = find_dit_weights(model_path, True, explicit).kind == "distill"
    src = find_dit_weights(model_path, distill, explicit)
    model = load_dit(model_path, distill, explicit).eval().requires_grad_(False)
    source_dtype = model.patch_embedding.weight.dtype
    model.float()  # merge and quantize in fp32; the rest is written back in the source dtype
    if loras:
        merge_loras(model, [(str(p), s) for p, s in loras])
    state, errors = quantize_state_dict(model.state_dict(), scheme)
    state = {k: v if k.endswith("weight_scale") or v.dtype in QUANT_DTYPES else v.to(source_dtype)
             for k, v in state.items()}
    hp_state = model.state_dict()
    mem, before, after = memory_table(hp_state, source_dtype, scheme)
    sub = out / subdir_name(scheme, src.kind == "distill")
    if out.resolve() != model_path.resolve():
        out.mkdir(parents=True, exist_ok=True)
        (out / DIT_CONFIG).write_text(json.dumps(model.config, indent=2) + "\n")
        copy_components(model_path, out)
        if src.kind == "distill" and (schedule := read_schedule(model_path)) is not None:
            write_schedule(out, schedule)  # the same student: its schedule travels with it
    meta = {"format": FORMAT, "quant_scheme": scheme, "source": str(src.path),
            "loras": json.dumps([[str(p), s] for p, s in loras])}
    path = write_safetensors(state, sub / DIT_WEIGHTS, metadata=meta)
    return dict(path=path, source=src.path, errors=errors, bytes_before=before, bytes_after=after,
                error_table=error_table(errors), memory_table=mem, distill=src.kind == "distill")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", help="Wan-style model folder (default: the --config's model_path)")
    p.add_argument("--out", help="output folder (default: --model_path itself: only the quantized sub-folder)")
    p.add_argument("--scheme", required=True, choices=list(SCHEMES))
    p.add_argument("--lora", action="append", default=[], help="LoRA file merged before quantizing (repeatable)")
    p.add_argument("--lora_strength", action="append", type=float, default=[],
                   help="strength of the matching --lora (default 1.0)")
    p.add_argument("--config", help="inference JSON: model_path, model_cls (distill_models/ or base DiT), "
                   "dit_original_ckpt, and lora_configs (merged first when lora_mode is merge)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg, distill, explicit = None, None, None
    model_path = args.model_path
    if args.config:
        from inference.config import load_config
        from inference.loader import resolve_model_path

        cfg = load_config(args.config)
        model_path = resolve_model_path(cfg, args.model_path)
        distill, explicit = cfg.model_cls == "wan2.1_distill", cfg.dit_original_ckpt
    if model_path is None:
        raise SystemExit("error: pass --model_path DIR (or --config with a model_path)")
    loras = _lora_list(cfg, args.lora, args.lora_strength)
    res = convert(model_path, args.out, args.scheme, loras, distill, explicit)
    print(f"source DiT: {res['source']}")
    for path, s in loras:
        print(f"merged LoRA {path} (strength {s})")
    print(f"quantized {len(res['errors'])} linears to {args.scheme} (symmetric, per output channel)\n")
    print(res["error_table"] + "\n")
    print(res["memory_table"] + "\n")
    print(f"DiT weights: {_mb(res['bytes_before'])} -> {_mb(res['bytes_after'])} "
          f"({res['bytes_after'] / res['bytes_before']:.1%})")
    print(f"wrote {res['path']}")
    out = Path(args.out) if args.out else Path(model_path)
    keys = {"model_path": str(out), "dit_quantized": True, "dit_quant_scheme": args.scheme}
    note = "; drop the merged lora_configs" if loras else ""
    print(f"use it with an inference config holding {json.dumps(keys)}{note}")
    sys.stdout.flush()
    return res


if __name__ == "__main__":
    main()
