"""Create the frozen components shared by every tiny model: PCA codec, tiny umT5 + byte tokenizer, tiny CLIP.

    python -m scripts.make_tiny_components --out checkpoints/tiny-components

The codec is fitted on rendered shapes-world videos; the text and image encoders are randomly initialised
(seeded) and frozen, as the DiT learns to read whatever features they produce. Deterministic given --seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from data.shapes import PROMPTS, ShapesWorld
from models.clip import CLIPImageEncoder
from models.codec import fit_pca_codec
from models.components import save_components
from models.registry import TINY_CLIP, TINY_STRIDE, TINY_TEXT, TINY_Z
from models.t5 import UMT5Encoder, word_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="checkpoints/tiny-components")
    p.add_argument("--z-dim", type=int, default=TINY_Z)
    p.add_argument("--spatial-stride", type=int, default=TINY_STRIDE)
    p.add_argument("--normalize", choices=["channel", "global"], default="global",
                   help="latent std per channel, or one for all (keeps PCA's energy order; see models/codec.py)")
    p.add_argument("--tokenizer", choices=["word", "byte"], default="byte",
                   help="word: one token per word of the shapes-world prompts (like umT5's SentencePiece "
                        "vocabulary); byte: UTF-8 bytes (no vocabulary)")
    p.add_argument("--videos", type=int, default=512, help="rendered videos the codec is fitted on")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    world = ShapesWorld(args.frames, args.size, args.size)
    # Seeds far from the training data seeds (distill/data.py) so the codec is not fitted on eval videos.
    videos = np.stack([world.sample(10**9 + args.seed * 10**6 + i)[1] for i in range(args.videos)])
    codec = fit_pca_codec(videos, args.z_dim, args.spatial_stride, args.normalize)
    torch.manual_seed(args.seed)
    text = UMT5Encoder(**{k: v for k, v in TINY_TEXT.items() if k != "type"})
    clip = CLIPImageEncoder(**{k: v for k, v in TINY_CLIP.items() if k != "type"})
    tokenizer = word_tokenizer(" ".join(PROMPTS).split()) if args.tokenizer == "word" else "byte"
    out = save_components(Path(args.out), codec, text, clip, tokenizer=tokenizer)
    print(f"wrote {out}: codec z={args.z_dim} stride {args.spatial_stride} ({args.normalize} std) fitted on "
          f"{args.videos} videos, {args.tokenizer} tokenizer, tiny umT5, tiny CLIP")


if __name__ == "__main__":
    main()
