"""Write a randomly initialised tiny model folder (DiT + the shared tiny components), for tests and demos.

    python -m scripts.make_tiny_model --spec tiny-t2v --out runs/tiny-random-t2v

The logic lives in `models.components.make_tiny_model` (library code that tests and benchmarks import).
"""

from __future__ import annotations

import argparse

from models.components import TINY_COMPONENTS, make_tiny_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default="tiny-t2v")
    p.add_argument("--out", required=True)
    p.add_argument("--components", default=str(TINY_COMPONENTS))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(make_tiny_model(args.out, args.spec, args.components, args.seed))


if __name__ == "__main__":
    main()
