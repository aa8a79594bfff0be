"""Write a randomly initialised tiny model folder (DiT + the shared tiny components), for tests and demos.

    python -m scripts.make_tiny_model --spec tiny-t2v --out runs/tiny-random-t2v
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from models.components import build_dit, copy_components
from models.loading import write_dit_folder
from models.registry import get_spec

DEFAULT_COMPONENTS = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-components"


def make_tiny_model(out: str | Path, spec: str = "tiny-t2v", components: str | Path = DEFAULT_COMPONENTS,
                    seed: int = 0, **dit_overrides) -> Path:
    """A Wan-style folder with a random DiT of `spec` (head initialised non-zero so outputs vary)."""
    torch.manual_seed(seed)
    dit = build_dit({**get_spec(spec).dit, **dit_overrides})
    torch.nn.init.normal_(dit.head.head.weight, std=0.02)  # Wan's init zeroes the head: outputs would be constant
    write_dit_folder(out, dit)
    copy_components(components, out)
    return Path(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default="tiny-t2v")
    p.add_argument("--out", required=True)
    p.add_argument("--components", default=str(DEFAULT_COMPONENTS))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(make_tiny_model(args.out, args.spec, args.components, args.seed))


if __name__ == "__main__":
    main()
