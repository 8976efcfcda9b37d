"""What several ``mbpo`` sub-commands share: argument groups, the checks that tie arguments
together, the tracking URI, the local stack, the training run to start or continue, --dry-run."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from mbpo_core.config import ConfigError, available_presets

from .. import cliargs as argtypes
from ..chain import (
    DEFAULT_ROUNDS_PER_RUN,
    TrainingRun,
    existing_run,
    new_run,
)

DEFAULT_STACK_DIR = ".mbpo-stack"
DRY_RUN_HELP = ("check everything the command checks before it starts (arguments, configuration, "
                "store, tracking URI, resume source), print the resolved configuration as JSON "
                "and exit: nothing is written, started or tracked")


def _add_run_config(p: argparse.ArgumentParser) -> None:
    """Arguments shared by every command that starts a training run."""
    p.add_argument("--env", choices=available_presets(), metavar="ENV",
                   help=f"task; one of {', '.join(available_presets())}")
    p.add_argument("--total-steps", type=argtypes.total_steps,
                   help=f"env steps to train for (1 to {argtypes.MAX_TOTAL_STEPS})")
    p.add_argument("--seed", type=argtypes.seed, default=0,
                   help=f"0 to {argtypes.SEED_MAX} (default 0)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                   metavar="KEY=VALUE", help="override config fields, e.g. sac.hidden_size=512")
    p.add_argument("--device", type=argtypes.device, default="cpu", help="cpu or cuda[:N]")


def _add_tracking_args(p: argparse.ArgumentParser, local: bool) -> None:
    default = "$MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db" if local else \
        "$MLFLOW_TRACKING_URI, else no tracking"
    p.add_argument("--tracking-uri", type=argtypes.tracking_uri, default=None,
                   help=f"MLflow tracking URI (default {default}); credentials for it come from "
                        "MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN")
    p.add_argument("--experiment", type=argtypes.experiment_name, default="mbpo",
                   help="MLflow experiment (default mbpo)")
    p.add_argument("--registered-model", type=argtypes.registered_model, default=None, metavar="NAME",
                   help="Model Registry name for the final policy (default mbpo-ENV, or with "
                        "--resume-from the name the run began with; '' = none)")
    p.add_argument("--no-tracking", action="store_true", help="log nothing to MLflow")
    if local:
        p.add_argument("--stack", nargs="?", const=DEFAULT_STACK_DIR, default=None, metavar="DIR",
                       help="use the local stack started by `mbpo stack up` (S3 store and MLflow "
                            f"server; default dir {DEFAULT_STACK_DIR})")


def _use_stack(args: argparse.Namespace) -> None:
    """Point this process (and the steps it starts) at the local stack's S3 and MLflow."""
    if not getattr(args, "stack", None):
        return
    from ..stack import load, status

    info = load(args.stack)
    state = status(args.stack) if info else None
    if info is None or not all(state.values()):
        raise ConfigError(f"--stack {args.stack}: no running stack there; start it with "
                          f"`mbpo stack up --dir {args.stack}`")
    os.environ.update(info.env())
    if hasattr(args, "store") and args.store in (None, "./mbpo-store"):
        args.store = info.env()["MBPO_STORE"]


def _tracking_uri(args: argparse.Namespace, local: bool) -> str:
    from mbpo_core.tracking import check_reachable, check_tracking_uri, default_tracking_uri

    if args.no_tracking:
        return ""
    uri = args.tracking_uri or (default_tracking_uri() if local
                                else os.environ.get("MLFLOW_TRACKING_URI", ""))
    if uri:
        check_tracking_uri(uri)
        if local:  # a cluster's tracking server need not be reachable from here
            _check_sqlite_folder(uri)
            check_reachable(uri)
    return uri


def _check_sqlite_folder(uri: str) -> None:
    """MLflow creates a SQLite file but not its folder, and retries for minutes if it is missing."""
    if not uri.startswith("sqlite:///"):
        return
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    if path and path != ":memory:" and not Path(path).parent.is_dir():
        raise ConfigError(f"tracking URI {uri!r}: folder {str(Path(path).parent)!r} does not "
                          "exist; create it or choose another --tracking-uri")


def _registered_model(args: argparse.Namespace, env: str) -> str:
    return f"mbpo-{env}" if args.registered_model is None else args.registered_model


def _add_pipeline_args(p: argparse.ArgumentParser, local: bool) -> None:
    default_store = "./mbpo-store" if local else None
    p.add_argument("--store", type=argtypes.store_url, default=os.environ.get("MBPO_STORE", default_store),
                   required=not local and not os.environ.get("MBPO_STORE"),
                   help="object store for replay shards and run records: a local folder, "
                        "file:///path or s3://bucket/prefix (S3 endpoint and credentials from "
                        "MBPO_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY); "
                        f"default $MBPO_STORE or {default_store}")
    p.add_argument("--run-name", type=argtypes.run_name, default=None,
                   help="name of the training run under STORE/runs/ (default: task-seed-time)")
    p.add_argument("--rounds-per-run", type=argtypes.rounds, default=DEFAULT_ROUNDS_PER_RUN,
                   help=f"rounds unrolled into one pipeline run (default {DEFAULT_ROUNDS_PER_RUN}); "
                        "a longer training run is a chain of pipeline runs")
    p.add_argument("--resume-from", type=argtypes.run_ref, default=None, metavar="RUN",
                   help="continue a stopped training run from its last complete round: its run "
                        "URL (STORE/runs/NAME) or a local --out folder; its stored config is used")


def _training_run(args: argparse.Namespace, local: bool) -> TrainingRun:
    run = _new_or_existing_run(args)
    run.tracking_uri = _tracking_uri(args, local)
    run.mlflow_experiment = args.experiment
    run.registered_model = _registered_model(args, run.env)
    if args.resume_from and args.registered_model is None:  # where the run began registering
        stored = (run.store.read_info() or {}).get("tracking") or {}
        run.registered_model = stored.get("registered_model", run.registered_model)
    return run


def _new_or_existing_run(args: argparse.Namespace) -> TrainingRun:
    if args.resume_from:
        run = existing_run(args.resume_from, args.total_steps, args.device)
        if args.env and args.env != run.env:
            raise ConfigError(f"--env {args.env} differs from the resumed run's {run.env}")
        if args.overrides:
            raise ConfigError("--set cannot change a resumed run; its stored configuration is used")
        return run
    missing = [f for f in ("env", "total_steps") if getattr(args, f) is None]
    if missing:
        raise ConfigError(f"{', '.join('--' + m.replace('_', '-') for m in missing)} required "
                          "(unless --resume-from)")
    return new_run(args.env, args.seed, args.overrides, args.total_steps, args.store,
                   args.run_name, args.device)


def _validate_args(args: argparse.Namespace) -> None:
    """The rules that tie arguments together, checked before any command starts."""
    seeds = getattr(args, "seeds", None)
    if seeds:
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"--seeds {' '.join(map(str, seeds))}: each seed once")
        if args.resume_from or args.env is None or args.total_steps is None:
            raise ConfigError("--seeds needs --env and --total-steps, and no --resume-from "
                              "(resume each seed's run on its own)")
        if getattr(args, "follow", False):
            raise ConfigError("--seeds takes no --follow (use --chain-in-cluster, or submit and "
                              "follow each seed's run on its own)")
    elif getattr(args, "parallel", 1) != 1:
        raise ConfigError(f"--parallel {args.parallel}: applies only with --seeds")


def _check_device(device: str) -> None:
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: allowed cuda:0 to cuda:{torch.cuda.device_count() - 1}"
                          " on this machine")


def _print_plan(args: argparse.Namespace, runs: list[TrainingRun], **extra: object) -> int:
    """--dry-run of run/submit: what would run, as JSON on stdout; nothing written or started."""
    plan = {"command": args.command, "dry_run": True, **extra,
            "tracking_uri": runs[0].tracking_uri or None, "experiment": args.experiment,
            "registered_model": runs[0].registered_model or None,
            "runs": [{"run_url": r.run_url, "resumed": bool(args.resume_from), "seed": r.seed,
                      "total_steps": r.total_steps, "device": r.device,
                      "config": r.config.to_dict()} for r in runs]}
    print(json.dumps(plan, indent=2))
    return 0
