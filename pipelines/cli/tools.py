"""The ``mbpo`` tools around training runs: stack (local S3 + MLflow servers), runs, compare, sync
and presets."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mbpo_core.config import ConfigError, available_presets, make_config

from .. import cliargs as argtypes
from .common import DEFAULT_STACK_DIR, _tracking_uri, _use_stack

log = logging.getLogger("mbpo")


def add_parsers(sub: argparse._SubParsersAction) -> None:
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
    cp.add_argument("runs", nargs="+", metavar="RUN",
                    help="MLflow run ids or run names, or --out folders of `mbpo train` / `mbpo "
                         "run` (a run still going shows the rounds it has done)")
    cp.add_argument("-o", "--output", type=Path, required=True, help="PNG to write")
    cp.add_argument("--reference", nargs="*", default=[], choices=["mbpo", "sac"],
                    help="also plot published curves (mean +- std over seeds) for the runs' task")
    cp.add_argument("--window", nargs=2, type=argtypes.env_steps, metavar=("LO", "HI"),
                    help="also print each run's mean eval return over LO to HI env steps, their "
                         "mean, and the --reference curves' over the same steps")
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


def cmd_stack(args: argparse.Namespace) -> int:
    from .. import stack

    if args.action == "up":
        try:
            info = stack.up(args.dir)
        except (stack.StackError, RuntimeError, TimeoutError, OSError) as e:
            print(f"mbpo stack up: {e}\nwhat was running before is as it was; see the logs in "
                  f"{args.dir} (weed.log under s3/, mlflow.log)", file=sys.stderr)
            return 1
        print(f"MLflow UI:  {info.mlflow_uri}\nS3 (SeaweedFS): {info.s3_endpoint}  (store "
              f"{info.env()['MBPO_STORE']})\n\nUse it with `mbpo run --stack` / `mbpo train "
              f"--stack`, or export (also: eval \"$(mbpo stack env)\"):")
        for k, v in info.env().items():
            print(f"export {k}={v}")
    elif args.action == "down":
        if stack.load(args.dir) is None:
            print(f"no stack recorded in {args.dir}")
        else:
            print("stopped" if stack.down(args.dir) else "nothing was running",
                  f"(data and credentials kept in {args.dir}: `mbpo stack up --dir {args.dir}` "
                  "brings it back)")
    elif args.action == "status":
        state = stack.status(args.dir)
        if state is None:
            print(f"no stack recorded in {args.dir}; start one with `mbpo stack up --dir {args.dir}`")
            return 1
        info = stack.load(args.dir)
        print(f"s3 {info.s3_endpoint}: {'up' if state['s3'] else 'DOWN'}\n"
              f"mlflow {info.mlflow_uri}: {'up' if state['mlflow'] else 'DOWN'}")
        if not all(state.values()):
            down = " and ".join(k for k, ok in state.items() if not ok)
            print(f"{down} down: `mbpo stack up --dir {args.dir}` starts only what is down, on "
                  "the same data, buckets and credentials; then continue an interrupted run with "
                  "`mbpo run --stack --resume-from RUN`")
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

    from ..compare import format_table

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

    from ..compare import format_window, local_curve, plot_curves

    if args.window and args.window[0] > args.window[1]:
        raise ConfigError(f"--window {args.window[0]} {args.window[1]}: allowed LO <= HI")
    _use_stack(args)
    uri = None
    curves = []
    for ref in args.runs:
        if Path(ref).is_dir():
            curves.append(local_curve(Path(ref)))
        else:
            uri = uri or _tracking_uri(args, local=True)
            curves.append(eval_curve(uri, ref, args.experiment))
    tasks = {label.split("(")[-1].split(",")[0] for label, _ in curves}
    task = tasks.pop() if len(tasks) == 1 else None
    if args.reference and task is None:
        log.warning("runs of several tasks: no reference curves drawn")
    path = plot_curves(curves, args.output, args.reference, task)
    print(f"wrote {path}")
    if args.window:
        print(format_window(curves, *args.window, args.reference, task))
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from mbpo_core.storage import open_store
    from mbpo_core.tracking import PENDING_DIR, check_reachable, check_tracking_uri, send_pending

    source = str(args.source).rstrip("/")
    local = "://" not in source or source.startswith("file://")
    if local and not Path(source.removeprefix("file://")).is_dir():
        raise ConfigError(f"sync {source}: no such run folder; allowed: a `mbpo train` --out "
                          "folder, or a pipeline run's URL (STORE/runs/NAME)")
    pending = open_store(source + "/" + PENDING_DIR)
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
