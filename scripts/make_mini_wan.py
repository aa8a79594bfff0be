"""Write a mini Wan2.1 model folder: the real layout, architectures and key names at reduced size, random weights.

    python -m scripts.make_mini_wan --task t2v --layout official --out /models/mini-t2v
    python -m scripts.make_mini_wan --task i2v --layout diffusers --out /models/mini-i2v-diffusers --sharded
    python -m scripts.make_mini_wan --task t2v --moe --out /models/mini-wan22-t2v   # Wan2.2 A14B: two experts

The same --seed gives the same weights in both layouts (see models/mini.py).
"""

from __future__ import annotations

import argparse

from models.mini import GEOMETRIES, LAYOUTS, TASKS, write_mini


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--layout", choices=LAYOUTS, default="official")
    parser.add_argument("--out", required=True, help="new (or empty) folder to write")
    parser.add_argument("--sharded", action="store_true",
                        help="DiT weights in shards with an index, as in the 14B folders")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--geometry", choices=GEOMETRIES, default="mini",
                        help="1.3b: the real Wan2.1-T2V-1.3B DiT and VAE (GPU rehearsal; ~7 GB on disk)")
    parser.add_argument("--moe", action="store_true",
                        help="a Wan2.2 A14B folder: high_noise_model/ + low_noise_model/ (diffusers: transformer/ + "
                             "transformer_2/), shared VAE and umT5, no CLIP")
    args = parser.parse_args(argv)
    out = write_mini(args.out, args.task, args.layout, sharded=args.sharded, seed=args.seed, geometry=args.geometry,
                     moe=args.moe)
    kind = "Wan2.2 A14B (two experts)" if args.moe else args.geometry
    print(f"wrote a {kind} {args.task.upper()} model ({args.layout} layout) to {out}")


if __name__ == "__main__":
    main()
