"""Training entry point for every task (pretrain; ode and dmd follow the same launch).

    accelerate launch train.py --config configs/train/tiny/t2v_teacher.yaml [key=value ...]
    python train.py --config configs/train/tiny/t2v_teacher.yaml max_steps=10 run_dir=runs/debug
    python train.py --config configs/train/tiny/t2v_teacher.yaml --dry-run

`--dry-run` prints the resolved config and the memory/compute estimate (distill/plan.py) and exits.
"""

from __future__ import annotations

import argparse
import sys

from distill.checkpoint import CheckpointError
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
    parser.add_argument("--plan-gpus", type=int, default=1, help="--dry-run: plan for this many GPUs")
    parser.add_argument("--plan-gpu-mem", type=float, default=80.0, help="--dry-run: GiB per GPU")
    parser.add_argument("--plan-engine", default=None,
                        help="--dry-run: ddp|zero2|fsdp|zero3|hybrid (default: distributed.engine, auto = ddp)")
    parser.add_argument("--plan-offload", action="store_true",
                        help="--dry-run: parameters, gradients, optimizer states and EMA in CPU memory")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4 max_steps=10")
    args = parser.parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
        if not args.dry_run:  # inputs that would otherwise fail after the models are built
            from distill.preflight import preflight

            preflight(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        from distill.plan import GPU_RESERVE_GB, estimate

        print(to_yaml(cfg))
        engine = args.plan_engine or (cfg.distributed.engine if cfg.distributed.engine != "auto" else "ddp")
        plan = estimate(cfg, engine, args.plan_gpus, offload=args.plan_offload)
        fits = plan.peak <= args.plan_gpu_mem - GPU_RESERVE_GB
        table = (f"estimate per GPU ({cfg.task}, batch {cfg.batch_size} x accum {cfg.grad_accum}):\n{plan.table()}\n"
                 f"fits {args.plan_gpus} x {args.plan_gpu_mem:.0f} GiB: {'yes' if fits else 'no'} "
                 f"(peak {plan.peak:.1f} GiB, {GPU_RESERVE_GB:.0f} GiB reserved per GPU)")
        # The estimate is printed as YAML comments, so the output stays a loadable config.
        print("\n".join(f"# {line}" for line in table.splitlines()))
        return 0
    from distill.trainer import NonFiniteLossError

    try:
        trainer = trainer_for(cfg)
    except CheckpointError as e:  # found before any model is built
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        out = trainer.train()
    except NonFiniteLossError as e:  # the guard's own stop: the message says what happened and what to change
        print(f"error: {e}", file=sys.stderr)
        return 1
    if out is not None:
        print(f"model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
