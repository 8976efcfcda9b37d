"""The ``mbpo`` command line: train in-process, or run, compile and submit the pipeline."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from components import DEFAULT_IMAGE
from mbpo_core.config import ConfigError, MBPOConfig, available_presets, make_config
from mbpo_core.storage import StorageError

from . import cliargs as argtypes
from .chain import (
    DEFAULT_ROUNDS_PER_RUN,
    TrainingRun,
    existing_run,
    new_run,
)
from .submit import TOKEN_ENV

log = logging.getLogger("mbpo")


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
                   help="Model Registry name for the final policy (default mbpo-ENV; '' = none)")
    p.add_argument("--no-tracking", action="store_true", help="log nothing to MLflow")
    if local:
        p.add_argument("--stack", nargs="?", const=DEFAULT_STACK_DIR, default=None, metavar="DIR",
                       help="use the local stack started by `mbpo stack up` (S3 store and MLflow "
                            f"server; default dir {DEFAULT_STACK_DIR})")


def _use_stack(args: argparse.Namespace) -> None:
    """Point this process (and the steps it starts) at the local stack's S3 and MLflow."""
    if not getattr(args, "stack", None):
        return
    from .stack import load, status

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


DEFAULT_STACK_DIR = ".mbpo-stack"
DRY_RUN_HELP = ("check everything the command checks before it starts (arguments, configuration, "
                "store, tracking URI, resume source), print the resolved configuration as JSON "
                "and exit: nothing is written, started or tracked")
DEFAULT_CHECKPOINT_EVERY = 10


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mbpo", description="Model-Based Policy Optimization.",
                                epilog="Exit codes: 0 done; 1 a run failed; 2 bad arguments or "
                                       "configuration (nothing started or written); 3 storage or "
                                       "state file error. train, run and submit take --dry-run.")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True)

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

    c = sub.add_parser("compile", help="compile the pipeline to KFP YAML",
                       description="Compile a K-round pipeline (fresh, or with --continuation one "
                                   "that resumes from imported states) to a KFP v2 YAML package.")
    c.add_argument("--env", required=True, choices=available_presets(), metavar="ENV")
    c.add_argument("--rounds", type=argtypes.rounds, required=True, help="rounds unrolled in the pipeline")
    c.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                   metavar="KEY=VALUE", help="checked now; pass them as the `overrides` parameter")
    c.add_argument("--continuation", action="store_true",
                   help="the pipeline that continues from a stored round (importer inputs)")
    c.add_argument("--image", type=argtypes.image_ref, default=DEFAULT_IMAGE,
                   help=f"component image (default {DEFAULT_IMAGE})")
    c.add_argument("--gpu", action="store_true",
                   help="an accelerator (nvidia.com/gpu) and device=cuda for fit_ensemble and "
                        "update_sac")
    c.add_argument("-o", "--output", type=argtypes.yaml_file, required=True,
                   help="YAML file to write (.yaml or .yml)")
    c.set_defaults(func=cmd_compile)

    sb = sub.add_parser("submit", help="submit a training run to a KFP cluster",
                        description="Compile and submit the chain of pipeline runs of a training "
                                    f"run to the KFP API at --host (bearer token from ${TOKEN_ENV}).")
    _add_run_config(sb)
    _add_pipeline_args(sb, local=False)
    _add_tracking_args(sb, local=False)
    sb.add_argument("--host", type=argtypes.kfp_host, default=os.environ.get("KFP_HOST") or None,
                    help="KFP API URL, http(s)://... (default $KFP_HOST; omit inside the cluster)")
    sb.add_argument("--namespace", type=argtypes.namespace, default=None,
                    help="Kubeflow profile namespace")
    sb.add_argument("--kfp-experiment", type=argtypes.experiment_name, default="mbpo",
                    help="KFP experiment name")
    sb.add_argument("--image", type=argtypes.image_ref, default=DEFAULT_IMAGE,
                    help=f"component image (default {DEFAULT_IMAGE})")
    sb.add_argument("--gpu", action="store_true",
                    help="an accelerator for fit_ensemble and update_sac (device=cuda there)")
    sb.add_argument("--seeds", type=argtypes.seed, nargs="+", default=None, metavar="SEED",
                    help="submit one training run per seed, under one MLflow parent run")
    chain = sb.add_mutually_exclusive_group()
    chain.add_argument("--follow", action="store_true",
                       help="wait for each pipeline run and submit the next from here")
    chain.add_argument("--chain-in-cluster", action="store_true",
                       help="each pipeline run submits the next itself (no waiting here)")
    sb.add_argument("--dry-run", action="store_true",
                    help=DRY_RUN_HELP + "; also prints the run URL(s) it would use; the KFP API "
                         "is not contacted")
    sb.set_defaults(func=cmd_submit)

    st = sub.add_parser("stack", help="local S3 server + MLflow server (up, down, status, env)",
                        description="Start, stop or inspect a SeaweedFS S3 server and an MLflow "
                                    "tracking server (artifacts on that S3) on loopback.")
    st.add_argument("action", choices=["up", "down", "status", "env"])
    st.add_argument("--dir", default=DEFAULT_STACK_DIR, help="where the stack keeps its data")
    st.set_defaults(func=cmd_stack)

    ru = sub.add_parser("runs", help="list MLflow runs: task, seed, steps, returns, wall time")
    ru.add_argument("--experiment", default="mbpo")
    ru.add_argument("--tracking-uri", type=argtypes.tracking_uri, default=None,
                    help="default $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db")
    ru.add_argument("--stack", nargs="?", const=DEFAULT_STACK_DIR, default=None, metavar="DIR")
    ru.set_defaults(func=cmd_runs, no_tracking=False)

    cp = sub.add_parser("compare", help="plot runs' learning curves side by side")
    cp.add_argument("runs", nargs="+", metavar="RUN", help="MLflow run ids or run names")
    cp.add_argument("-o", "--output", type=Path, required=True, help="PNG to write")
    cp.add_argument("--reference", nargs="*", default=[], choices=["mbpo", "sac"],
                    help="also plot published curves (mean +- std over seeds) for the runs' task")
    cp.add_argument("--experiment", default="mbpo")
    cp.add_argument("--tracking-uri", type=argtypes.tracking_uri, default=None)
    cp.add_argument("--stack", nargs="?", const=DEFAULT_STACK_DIR, default=None, metavar="DIR")
    cp.set_defaults(func=cmd_compare, no_tracking=False)

    sy = sub.add_parser("sync", help="send metrics kept while the MLflow server was down",
                        description="Send the metrics (and run ends) that a training run kept "
                                    "in SOURCE/tracking-pending while its MLflow server was "
                                    "unreachable, then delete them.")
    sy.add_argument("source", metavar="SOURCE",
                    help="a `mbpo train` --out folder, or a pipeline run's URL (STORE/runs/NAME)")
    sy.add_argument("--tracking-uri", type=argtypes.tracking_uri, default=None,
                    help="send them here instead of the server each record names")
    sy.set_defaults(func=cmd_sync)

    pr = sub.add_parser("presets", help="print a task's resolved configuration")
    pr.add_argument("--env", required=True, choices=available_presets(), metavar="ENV")
    pr.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[])
    pr.set_defaults(func=cmd_presets)
    return p


def cmd_stack(args: argparse.Namespace) -> int:
    from . import stack

    if args.action == "up":
        info = stack.up(args.dir)
        print(f"MLflow UI:  {info.mlflow_uri}\nS3 (SeaweedFS): {info.s3_endpoint}  (store "
              f"{info.env()['MBPO_STORE']})\n\nUse it with `mbpo run --stack` / `mbpo train "
              f"--stack`, or export (also: eval \"$(mbpo stack env)\"):")
        for k, v in info.env().items():
            print(f"export {k}={v}")
    elif args.action == "down":
        print("stopped" if stack.down(args.dir) else f"no stack recorded in {args.dir}")
    elif args.action == "status":
        state = stack.status(args.dir)
        if state is None:
            print(f"no stack recorded in {args.dir}")
            return 1
        info = stack.load(args.dir)
        print(f"s3 {info.s3_endpoint}: {'up' if state['s3'] else 'DOWN'}\n"
              f"mlflow {info.mlflow_uri}: {'up' if state['mlflow'] else 'DOWN'}")
        return 0 if all(state.values()) else 1
    else:
        info = stack.load(args.dir)
        if info is None:
            print(f"no stack recorded in {args.dir}", file=sys.stderr)
            return 1
        for k, v in info.env().items():
            print(f"export {k}={v}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from mbpo_core.tracking import list_runs

    from .compare import format_table

    _use_stack(args)
    uri = _tracking_uri(args, local=True)
    rows = list_runs(uri, args.experiment)
    if not rows:
        print(f"no runs in experiment {args.experiment!r} at {uri}")
        return 0
    print(format_table(rows))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from mbpo_core.tracking import eval_curve

    from .compare import plot_curves

    _use_stack(args)
    uri = _tracking_uri(args, local=True)
    curves = [eval_curve(uri, ref, args.experiment) for ref in args.runs]
    tasks = {label.split("(")[-1].split(",")[0] for label, _ in curves}
    task = tasks.pop() if len(tasks) == 1 else None
    if args.reference and task is None:
        log.warning("runs of several tasks: no reference curves drawn")
    path = plot_curves(curves, args.output, args.reference, task)
    print(f"wrote {path}")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from mbpo_core.storage import open_store
    from mbpo_core.tracking import PENDING_DIR, check_reachable, check_tracking_uri, send_pending

    pending = open_store(str(args.source).rstrip("/") + "/" + PENDING_DIR)
    keys = [k for k in pending.list() if k.endswith(".jsonl")]
    if not keys:
        print(f"nothing pending in {pending.url}")
        return 0
    uris = {args.tracking_uri} if args.tracking_uri else {
        json.loads(pending.get(k).decode().splitlines()[0])["uri"] for k in keys}
    for uri in uris:
        check_tracking_uri(uri)
        check_reachable(uri)
    sent = send_pending(pending, tracking_uri=args.tracking_uri)
    print(f"sent {sent} tracking records from {pending.url}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    print(make_config(args.env, args.overrides).to_json())
    return 0


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


def _training_run(args: argparse.Namespace, local: bool) -> TrainingRun:
    run = _new_or_existing_run(args)
    run.tracking_uri = _tracking_uri(args, local)
    run.mlflow_experiment = args.experiment
    run.registered_model = _registered_model(args, run.env)
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
            from .local import check_docker

            check_docker(run, args.image, args.out / "kfp-root", dry_run=True)
        return _print_plan(args, [run], out=str(args.out), rounds_per_run=args.rounds_per_run,
                           runner=args.runner)
    from .local import run_local

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
    from .chain import default_run_name
    from .seeds import parent_run, run_seeds

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


def cmd_compile(args: argparse.Namespace) -> int:
    from .pipeline import compile_pipeline

    make_config(args.env, args.overrides)  # fail now, not on the cluster
    from .cluster import ClusterSettings

    path = compile_pipeline(args.rounds, args.output, resume=args.continuation, image=args.image,
                            cluster=ClusterSettings(gpu=args.gpu))
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB, {args.rounds} rounds)")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from .chain import default_run_name
    from .seeds import parent_run
    from .submit import ClusterTarget, submit_chain

    target = ClusterTarget(args.host, args.namespace, args.kfp_experiment, args.image,
                           args.rounds_per_run, args.chain_in_cluster, args.gpu)
    runs = []
    if args.seeds:  # one chain per seed: the cluster runs them side by side
        # (_validate_args: distinct seeds, --env and --total-steps, no --resume-from or --follow)
        base = args.run_name or default_run_name(args.env, args.seeds[0]).replace(
            f"-s{args.seeds[0]}-", "-seeds-")
        for seed in args.seeds:
            args.seed, args.run_name = seed, f"{base}-s{seed}"
            runs.append(_training_run(args, local=False))
    else:
        runs.append(_training_run(args, local=False))
    for run in runs:
        if not run.run_url.startswith("s3://"):
            raise ConfigError(f"--store for a cluster run must be an s3:// URL (pods cannot see "
                              f"{run.run_url!r})")
    if args.dry_run:  # the KFP API is not contacted
        return _print_plan(args, runs, host=args.host, namespace=args.namespace,
                           kfp_experiment=args.kfp_experiment, image=args.image, gpu=args.gpu,
                           rounds_per_run=args.rounds_per_run,
                           chain="follow" if args.follow else "in-cluster"
                           if args.chain_in_cluster else "first-run-only")
    if args.seeds:
        parent = parent_run(runs[0].tracking_uri, args.experiment, args.env, args.overrides,
                            args.seeds, base)
        for run in runs:
            run.parent_run_id = parent or ""
    for run in runs:
        name = run.run_url.rstrip("/").rsplit("/", 1)[-1]
        for run_id in submit_chain(run, target, name, follow=args.follow):
            print(run_id)
        if not args.follow and not args.chain_in_cluster:
            print(f"submitted the first pipeline run of {name}; continue its chain with: mbpo "
                  f"submit --resume-from {run.run_url} --host ... (or --follow / "
                  "--chain-in-cluster)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 a run failed (pipeline, submission, tracking server, docker,
    divergence), 2 bad arguments or configuration (nothing was started or written), 3 storage or
    state file."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        _validate_args(args)
        return args.func(args)
    except ConfigError as e:
        print(f"mbpo: configuration error: {e}", file=sys.stderr)
        return 2
    except StorageError as e:
        print(f"mbpo: storage error: {e}", file=sys.stderr)
        return 3
    except ValueError as e:  # mbpo_core.state.StateError (not imported here: it pulls in torch)
        if type(e).__name__ != "StateError":
            raise
        print(f"mbpo: state error: {e}", file=sys.stderr)
        return 3
    except RuntimeError as e:
        if type(e).__name__ not in ("PipelineRunError", "SubmitError", "TrackingError",
                                      "DivergenceError"):
            raise
        print(f"mbpo: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
