"""The ``mbpo`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .config import ConfigError, available_presets, make_config

log = logging.getLogger("mbpo")


def _device(value: str) -> str:
    if value not in ("cpu", "cuda") and not value.startswith("cuda:"):
        raise argparse.ArgumentTypeError(f"--device {value!r}: allowed cpu, cuda or cuda:N")
    return value


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} must be >= 1")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mbpo", description="Model-Based Policy Optimization.")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run MBPO in this process",
                       description="Run MBPO in one process and write OUT/summary.json and "
                                   "OUT/policy.pt (the actor's state dict).")
    t.add_argument("--env", required=True, choices=available_presets(), metavar="ENV",
                   help=f"task; one of {', '.join(available_presets())}")
    t.add_argument("--total-steps", type=_positive, required=True, help="env steps to train for")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", type=Path, required=True, help="output folder")
    t.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                   metavar="KEY=VALUE", help="override config fields, e.g. sac.hidden_size=512")
    t.add_argument("--device", type=_device, default="cpu", help="cpu or cuda[:N]")
    t.add_argument("--threads", type=_positive, default=None,
                   help="torch intra-op threads (default: torch's choice)")
    t.add_argument("--save-state", action="store_true",
                   help="also write OUT/state.pt, the full training state")
    t.add_argument("--resume-from", type=Path, default=None,
                   help="state.pt of an earlier run to continue (its config is used)")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    t.set_defaults(func=cmd_train)

    pr = sub.add_parser("presets", help="print a task's resolved configuration")
    pr.add_argument("--env", required=True, choices=available_presets(), metavar="ENV")
    pr.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[])
    pr.set_defaults(func=cmd_presets)
    return p


def cmd_presets(args: argparse.Namespace) -> int:
    print(make_config(args.env, args.overrides).to_json())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from .runtime import tune_allocator
    from .state import load_state, save_state
    from .trainer import MBPOTrainer

    tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: CUDA is not available on this machine")
    if args.resume_from:
        trainer = MBPOTrainer.from_state_dict(load_state(args.resume_from), args.device)
        if trainer.cfg.env != args.env:
            raise ConfigError(f"--env {args.env} differs from the resumed run's {trainer.cfg.env}")
    else:
        cfg = make_config(args.env, args.overrides, seed=args.seed)
        trainer = MBPOTrainer(cfg, args.device)
    cfg = trainer.cfg
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(cfg.to_json())
    start = time.perf_counter()
    trainer.train(args.total_steps, progress=not args.no_progress)
    wall = time.perf_counter() - start
    torch.save(trainer.agent.actor.state_dict(), args.out / "policy.pt")
    if args.save_state:
        save_state(trainer.state_dict(), args.out / "state.pt")
    summary = {
        "env": cfg.env,
        "seed": cfg.seed,
        "env_steps": trainer.env_steps,
        "eval_return": trainer.curve[-1][1] if trainer.curve else None,
        "curve": trainer.curve,
        "wall_s": wall,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("done: %d env steps, eval return %.1f, %.0f s; wrote %s", trainer.env_steps,
             summary["eval_return"], wall, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"mbpo: configuration error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
