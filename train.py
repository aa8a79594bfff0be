"""Training entry point for every task (pretrain; ode and dmd follow the same launch).

    accelerate launch train.py --config configs/tiny/t2v_teacher.yaml [key=value ...]
    python train.py --config configs/tiny/t2v_teacher.yaml max_steps=10 run_dir=runs/debug
    python train.py --config configs/tiny/t2v_teacher.yaml --dry-run

`--dry-run` prints the resolved config and the memory/compute estimate (distill/plan.py) and exits.
"""

from __future__ import annotations

import argparse
import sys

from distill.config import TrainConfig, load_train_config, to_yaml


def trainer_for(cfg: TrainConfig):
    if cfg.task == "pretrain":
        from distill.pretrain import PretrainTrainer

        return PretrainTrainer(cfg)
    if cfg.task == "ode":
        from distill.ode import ODETrainer

        return ODETrainer(cfg)
    if cfg.task == "dmd":
        from distill.dmd import DMDTrainer

        return DMDTrainer(cfg)
    raise ValueError(f"unknown task {cfg.task!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with the settings that differ from distill/config.py")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4 max_steps=10")
    args = parser.parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        from distill.plan import estimate

        print(to_yaml(cfg))
        # The estimate is printed as YAML comments, so the output stays a loadable config.
        table = f"estimate per process ({cfg.task}, batch {cfg.batch_size} x accum {cfg.grad_accum}):\n"
        print("\n".join(f"# {line}" for line in (table + estimate(cfg).table()).splitlines()))
        return 0
    out = trainer_for(cfg).train()
    if out is not None:
        print(f"model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
