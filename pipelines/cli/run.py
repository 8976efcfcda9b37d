"""``mbpo run``: the pipeline on this machine under kfp.local, one training run or a seed group."""

from __future__ import annotations

import argparse
import logging
import os

from components import DEFAULT_IMAGE

from .. import cliargs as argtypes
from ..chain import new_run
from .common import (
    DRY_RUN_HELP,
    _add_pipeline_args,
    _add_run_config,
    _add_tracking_args,
    _check_device,
    _print_plan,
    _registered_model,
    _tracking_uri,
    _training_run,
    _use_stack,
)

log = logging.getLogger("mbpo")


def add_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("run", help="run the pipeline on this machine (kfp.local)",
                       description="Run the MBPO pipeline locally with kfp.local's SubprocessRunner, "
                                   "as a chain of pipeline runs, and write OUT/summary.json and "
                                   "OUT/policy.pt like `mbpo train`.")
    _add_run_config(r)
    r.add_argument("--out", type=argtypes.out_dir, required=True, help="output folder")
    _add_pipeline_args(r, local=True)
    _add_tracking_args(r, local=True)
    r.add_argument("--threads", type=argtypes.threads, default=None,
                   help=f"torch intra-op threads in every step, 1 to {argtypes.MAX_THREADS} (default: "
                        "torch's choice)")
    r.add_argument("--runner", choices=["subprocess", "docker"], default="subprocess",
                   help="kfp.local runner: subprocess (this Python; default) or docker (each "
                        "step in a container of --image, on the host network; needs a Docker "
                        "engine, and an MLflow server or --no-tracking)")
    r.add_argument("--image", type=argtypes.image_ref, default=DEFAULT_IMAGE,
                   help=f"component image for --runner docker (default {DEFAULT_IMAGE})")
    r.add_argument("--seeds", type=argtypes.seed, nargs="+", default=None, metavar="SEED",
                   help="run these seeds (each its own training run and MLflow run, under one "
                        "parent run); OUT/seed-N/ per seed, OUT/summary.json with the mean curve")
    r.add_argument("--parallel", type=argtypes.positive, default=1,
                   help="with --seeds: how many seeds run at once (default 1)")
    r.add_argument("--parent-run-id", default="", help=argparse.SUPPRESS)
    r.add_argument("--keep-artifacts", action="store_true",
                   help="keep every pipeline run's KFP artifacts under OUT/kfp-root (default: only "
                        "those the chain still needs)")
    r.add_argument("--verbose", action="store_true",
                   help="print kfp.local's task logs here instead of only to OUT/pipeline.log")
    r.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    r.add_argument("--no-warm-workers", action="store_true",
                   help="start every step as a cold Python process (slower; same results)")
    r.add_argument("--dry-run", action="store_true",
                   help=DRY_RUN_HELP + "; also prints the run URL(s) it would use")
    r.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    _use_stack(args)
    if args.runner == "subprocess":  # steps run on this machine
        _check_device(args.device)
    if args.seeds:
        return _run_seeds(args)
    run = _training_run(args, local=True)
    run.parent_run_id = args.parent_run_id
    if args.dry_run:
        if args.runner == "docker":
            from ..local import check_docker

            check_docker(run, args.image, args.out / "kfp-root", dry_run=True)
        return _print_plan(args, [run], out=str(args.out), rounds_per_run=args.rounds_per_run,
                           runner=args.runner)
    from ..local import run_local

    if args.threads:
        os.environ["MBPO_THREADS"] = str(args.threads)
    log.info("training run %s", run.run_url)
    result = run_local(run, args.out, args.rounds_per_run, warm_workers=not args.no_warm_workers,
                       keep_artifacts=args.keep_artifacts, verbose=args.verbose,
                       progress=not args.no_progress, runner=args.runner,
                       image=args.image if args.runner == "docker" else None)
    log.info("done: %d env steps, eval return %s, %.0f s; wrote %s", result["env_steps"],
             result["eval_return"], result["wall_s"], args.out)
    return 0


def _run_seeds(args: argparse.Namespace) -> int:
    from ..chain import default_run_name
    from ..seeds import parent_run, run_seeds

    # (_validate_args: distinct seeds, --env and --total-steps, no --resume-from)
    name = args.run_name or default_run_name(args.env, args.seeds[0]).replace(
        f"-s{args.seeds[0]}-", "-seeds-")
    # every seed's configuration, run name and store place are valid before anything starts
    runs = [new_run(args.env, seed, args.overrides, args.total_steps, args.store,
                    f"{name}-s{seed}", args.device) for seed in args.seeds]
    uri = _tracking_uri(args, local=True)
    if args.dry_run:
        for run in runs:
            run.tracking_uri, run.mlflow_experiment = uri, args.experiment
            run.registered_model = _registered_model(args, run.env)
        return _print_plan(args, runs, out=str(args.out), rounds_per_run=args.rounds_per_run,
                           runner=args.runner, seed_group=name, parallel=args.parallel)
    parent = parent_run(uri, args.experiment, args.env, args.overrides, args.seeds, name)
    base = ["--log-level", args.log_level, "run", "--env", args.env, "--total-steps",
            str(args.total_steps), "--store", args.store, "--rounds-per-run",
            str(args.rounds_per_run), "--experiment", args.experiment, "--device", args.device]
    base += ["--tracking-uri", uri] if uri else ["--no-tracking"]
    if args.registered_model is not None:
        base += ["--registered-model", args.registered_model]
    if args.threads:
        base += ["--threads", str(args.threads)]
    if args.overrides:
        base += ["--set", *args.overrides]
    result = run_seeds(base, args.seeds, args.out, name, args.parallel, parent, uri)
    last = result["curve"][-1] if result["curve"] else None
    log.info("seeds %s done%s; wrote %s", args.seeds,
             f": eval return {last[1]:.1f} +- {last[2]:.1f} at {last[0]} steps" if last else "",
             args.out)
    return 1 if result["failed"] else 0
