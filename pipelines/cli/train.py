"""``mbpo train``: MBPO in this process, with checkpoints, resume and MLflow tracking."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from mbpo_core.config import ConfigError, MBPOConfig, available_presets, make_config

from .. import cliargs as argtypes
from .common import (
    DRY_RUN_HELP,
    _add_tracking_args,
    _check_device,
    _registered_model,
    _tracking_uri,
    _use_stack,
)

log = logging.getLogger("mbpo")

DEFAULT_CHECKPOINT_EVERY = 10


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="run MBPO in this process",
                       description="Run MBPO in one process and write OUT/summary.json and "
                                   "OUT/policy.pt (the actor's state dict).")
    t.add_argument("--env", required=True, choices=available_presets(), metavar="ENV",
                   help=f"task; one of {', '.join(available_presets())}")
    t.add_argument("--total-steps", type=argtypes.total_steps, required=True,
                   help=f"env steps to train for (1 to {argtypes.MAX_TOTAL_STEPS})")
    t.add_argument("--seed", type=argtypes.seed, default=0, help=f"0 to {argtypes.SEED_MAX} (default 0)")
    t.add_argument("--out", type=argtypes.out_dir, required=True, help="output folder")
    t.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                   metavar="KEY=VALUE", help="override config fields, e.g. sac.hidden_size=512")
    t.add_argument("--device", type=argtypes.device, default="cpu", help="cpu or cuda[:N]")
    t.add_argument("--threads", type=argtypes.threads, default=None,
                   help=f"torch intra-op threads, 1 to {argtypes.MAX_THREADS} (default: torch's choice)")
    t.add_argument("--save-state", action="store_true",
                   help="also write OUT/state.pt, the full training state, at the end and every "
                        "--checkpoint-every rounds")
    t.add_argument("--checkpoint-every", type=argtypes.positive, default=None, metavar="ROUNDS",
                   help=f"write OUT/state.pt every ROUNDS rounds (implies --save-state; default "
                        f"{DEFAULT_CHECKPOINT_EVERY} with --save-state): a crash or a diverging "
                        "run keeps the last one, and --resume-from continues from it")
    t.add_argument("--resume-from", type=argtypes.existing_file, default=None,
                   help="state.pt of an earlier run to continue (its config is used)")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_tracking_args(t, local=True)
    t.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP)
    t.set_defaults(func=cmd_train)


def _train_setup(args: argparse.Namespace):  # noqa: ANN202 (MBPOConfig, state or None, URI)
    """Every check `mbpo train` makes before it writes or trains; `--dry-run` stops after it."""
    from mbpo_core.state import StateError, load_state
    from mbpo_core.trainer import STATE_FORMAT

    _check_device(args.device)
    _use_stack(args)
    tracking_uri = _tracking_uri(args, local=True)
    state = None
    if args.resume_from:
        state = load_state(args.resume_from)
        if state.get("format") != STATE_FORMAT or not isinstance(state.get("config"), dict):
            raise StateError(f"state file {str(args.resume_from)!r} has format "
                             f"{state.get('format')!r}; this code reads format {STATE_FORMAT}")
        cfg = MBPOConfig.from_dict(state["config"])
        if cfg.env != args.env:
            raise ConfigError(f"--env {args.env} differs from the resumed run's {cfg.env}")
    else:
        cfg = make_config(args.env, args.overrides, seed=args.seed)
    return cfg, state, tracking_uri


def cmd_train(args: argparse.Namespace) -> int:
    cfg, state, tracking_uri = _train_setup(args)
    if args.dry_run:
        print(json.dumps({
            "command": "train", "dry_run": True, "out": str(args.out),
            "resume_from": str(args.resume_from) if args.resume_from else None,
            "total_steps": args.total_steps, "device": args.device,
            "tracking_uri": tracking_uri or None, "experiment": args.experiment,
            "registered_model": _registered_model(args, cfg.env) or None,
            "config": cfg.to_dict()}, indent=2))
        return 0

    import torch

    from mbpo_core.runtime import tune_allocator
    from mbpo_core.state import save_state
    from mbpo_core.steps import DivergenceError
    from mbpo_core.trainer import MBPOTrainer

    tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    tracking_state: dict = {}
    if state is not None:
        tracking_state = state.pop("tracking", None) or {}
        trainer = MBPOTrainer.from_state_dict(state, args.device)
    else:
        trainer = MBPOTrainer(cfg, args.device)
    cfg = trainer.cfg
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(cfg.to_json())
    tracker = _train_tracker(tracking_uri, tracking_state, cfg, args)
    every = args.checkpoint_every or (DEFAULT_CHECKPOINT_EVERY if args.save_state else None)
    checkpoint = args.out / "state.pt"

    def save_checkpoint() -> None:
        state = trainer.state_dict()
        if tracker is not None:
            state["tracking"] = {"uri": tracker.tracking_uri, "run_id": tracker.run_id}
        save_state(state, checkpoint)  # atomic: a crash mid-write keeps the previous one
        log.info("checkpoint: round %d, %d env steps -> %s", trainer.round, trainer.env_steps,
                 checkpoint)

    def sink(metrics: dict, step: int) -> None:
        if tracker is not None:
            tracker.log_metrics(metrics, step)
            tracker.log_curve(trainer.curve, f"{cfg.env}, seed {cfg.seed}")
        if every and trainer.round % every == 0 and trainer.env_steps < args.total_steps:
            save_checkpoint()
    start = time.perf_counter()
    try:
        trainer.train(args.total_steps, sink=sink, progress=not args.no_progress)
    except DivergenceError as e:
        if tracker is not None:
            tracker.finish("FAILED")
        raise DivergenceError(f"{e}. {_last_good(checkpoint, args)}") from None
    wall = time.perf_counter() - start
    policy = trainer.save_policy(args.out / "policy.pt")  # a CPU copy, whatever the device
    if tracker is not None:
        from components.ops import log_final_policy

        log_final_policy(tracker, cfg, policy, _registered_model(args, cfg.env))
        tracker.finish()
    if every:
        save_checkpoint()
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


def _last_good(checkpoint: Path, args: argparse.Namespace) -> str:
    """Where a failed `mbpo train` can continue from, as a command."""
    from mbpo_core.state import load_state

    if not checkpoint.is_file():
        return ("No checkpoint was written (--save-state / --checkpoint-every keep one); the run "
                "must start again")
    state = load_state(checkpoint)
    return (f"The last good checkpoint is {checkpoint} (round {state['round']}, "
            f"{state['env_steps']} env steps); continue with: mbpo train --env {args.env} "
            f"--total-steps {args.total_steps} --out OUT --resume-from {checkpoint} --save-state")


def _train_tracker(uri: str, resumed: dict, cfg, args: argparse.Namespace):  # noqa: ANN001,ANN202
    """The MLflow run of `mbpo train`: KFP's or the caller's MLFLOW_RUN_ID, the resumed run's,
    or a new one."""
    if not uri:
        return None
    from mbpo_core.storage import LocalStore
    from mbpo_core.tracking import PENDING_DIR, Tracker

    pending = LocalStore(args.out / PENDING_DIR)  # metrics wait here while MLflow is down
    run_id = os.environ.get("MLFLOW_RUN_ID") or (resumed.get("run_id")
                                                  if resumed.get("uri") == uri else None)
    if run_id:
        tracker = Tracker(uri, run_id, pending)
        tracker.reopen()
        if not resumed:
            tracker.log_config(cfg)
        return tracker
    return Tracker.create(uri, cfg, experiment=args.experiment, run_name=args.out.name,
                          tags={"mbpo.entry": "train"}, pending=pending)
