"""Mini Wan2.2 TI2V-5B folders: the official file layout, architectures and key names of `Wan-AI/Wan2.2-TI2V-5B`
at reduced width and depth, with seeded random weights, for rehearsing TI2V inference on a CPU in seconds.

    python -m models.mini_ti2v --out mini/ti2v [--seed 0]

Files (the official layout, docs/wan22_ti2v.md):

- `config.json` + `diffusion_pytorch_model.safetensors`: a `model_type: "ti2v"` DiT, in_dim = out_dim = 48;
- `Wan2.2_VAE.pth`: the Wan2.2 VAE at base width 8 with the real level structure, 48 latent channels (and so the
  real latent statistics), 16x spatial / 4x temporal compression;
- `models_t5_umt5-xxl-enc-bf16.pth` + `google/umt5-xxl/`: the mini umT5 and tokenizer of models/mini.py.

There is no CLIP file: TI2V-5B takes none. The same seed gives the same tensors.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.loading import DIT_CONFIG, DIT_WEIGHTS, write_safetensors
from models.mini import MINI_DIT, MINI_UMT5, _plain, _random, mini_tokenizer, randomize, write_tokenizer_folder
from models.registry import WAN_FILES
from models.t5 import UMT5Encoder
from models.vae22 import WAN22_VAE_FILE, Wan22VAE
from models.wan_model import WanModel

# The real VAE's structure (4 levels: 16x spatial with the 2x2 patchify; time downsampled on levels 1 and 2) at
# base widths 8 (encoder) and 12 (decoder); z_dim 48 as the real one, so the DiT's 48 channels and the official
# latent mean/std apply.
MINI_VAE22 = dict(dim=8, dec_dim=12, z_dim=48, dim_mult=(1, 2, 4, 4), num_res_blocks=1,
                  temporal_downsample=(False, True, True))
MINI_TI2V_DIT = dict(model_type="ti2v", in_dim=48, text_dim=MINI_UMT5["dim"], **{**MINI_DIT, "out_dim": 48})


@dataclass
class MiniTI2V:
    """The networks of a mini TI2V-5B (fp32, random weights) and its tokenizer."""

    dit: WanModel
    vae: Wan22VAE
    text_encoder: UMT5Encoder
    tokenizer: Any  # tokenizers.Tokenizer


@torch.no_grad()
def build_mini_ti2v(seed: int = 0) -> MiniTI2V:
    """Random mini TI2V-5B networks drawn from `seed` (text encoder, VAE, DiT in that order)."""
    g = torch.Generator().manual_seed(seed)
    tokenizer = mini_tokenizer()
    text = _random(lambda: UMT5Encoder(vocab_size=tokenizer.get_vocab_size(), **MINI_UMT5), g)
    text.to(torch.bfloat16).float()  # the official file is bf16: hold bf16-exact values
    vae = randomize(Wan22VAE(**MINI_VAE22), g)  # built normally: the latent statistics are buffers
    for name, p in vae.named_parameters():  # the RMS norm scales are [C, 1, 1(, 1)]: 1 + 0.1 N, not matrices
        if name.endswith("gamma"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    dit = _random(lambda: WanModel.from_config(MINI_TI2V_DIT), g)
    for m in (text, vae, dit):
        m.eval().requires_grad_(False)
    return MiniTI2V(dit, vae, text, tokenizer)


def write_mini_ti2v(out: str | Path, seed: int = 0) -> Path:
    """Write a mini TI2V-5B folder in the official layout to `out` (created; must be empty or absent)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    model = build_mini_ti2v(seed)
    out.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "WanModel", "_diffusers_version": "0.33.0", **model.dit.config}
    (out / DIT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(model.dit.state_dict(), out / DIT_WEIGHTS)
    torch.save(_plain(model.vae.state_dict()), out / WAN22_VAE_FILE)
    torch.save(_plain(model.text_encoder.state_dict(), torch.bfloat16), out / WAN_FILES["text_encoder"])
    write_tokenizer_folder(out / WAN_FILES["tokenizer"], model.tokenizer)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write a mini Wan2.2 TI2V-5B folder (official layout, random weights)")
    p.add_argument("--out", required=True, help="folder to create (must be empty or absent)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        path = write_mini_ti2v(args.out, args.seed)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
