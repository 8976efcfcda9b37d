"""The ``mbpo`` command line: train in-process, or run, compile and submit the pipeline.

One module per command or family of commands, each with its parser setup and its ``cmd_*``:
``train`` (train), ``run`` (run, seed groups), ``remote`` (compile, submit), ``tools`` (stack,
runs, compare, sync, presets); ``common`` holds what they share. Slow imports (torch, kfp,
mlflow) stay inside the commands, so ``mbpo --help`` and argument errors are fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mbpo_core.config import ConfigError
from mbpo_core.storage import StorageError

from . import remote, run, tools, train
from .common import (
    DEFAULT_STACK_DIR,
    DRY_RUN_HELP,
    _add_pipeline_args,
    _add_run_config,
    _add_tracking_args,
    _check_device,
    _check_sqlite_folder,
    _new_or_existing_run,
    _print_plan,
    _registered_model,
    _tracking_uri,
    _training_run,
    _use_stack,
    _validate_args,
)
from .remote import cmd_compile, cmd_submit
from .run import _run_seeds, cmd_run
from .tools import cmd_compare, cmd_presets, cmd_runs, cmd_stack, cmd_sync
from .train import DEFAULT_CHECKPOINT_EVERY, _last_good, _train_setup, _train_tracker, cmd_train

__all__ = [
    "DEFAULT_CHECKPOINT_EVERY", "DEFAULT_STACK_DIR", "DRY_RUN_HELP", "_add_pipeline_args",
    "_add_run_config", "_add_tracking_args", "_check_device", "_check_sqlite_folder",
    "_last_good", "_new_or_existing_run", "_print_plan", "_registered_model", "_run_seeds",
    "_tracking_uri", "_train_setup", "_train_tracker", "_training_run", "_use_stack",
    "_validate_args", "build_parser", "cmd_compare", "cmd_compile", "cmd_presets", "cmd_run",
    "cmd_runs", "cmd_stack", "cmd_submit", "cmd_sync", "cmd_train", "main",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mbpo", description="Model-Based Policy Optimization.",
                                epilog="Exit codes: 0 done; 1 a run failed; 2 bad arguments or "
                                       "configuration (nothing started or written); 3 storage or "
                                       "state file error. train, run and submit take --dry-run.")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True)
    train.add_parser(sub)       # train
    run.add_parser(sub)         # run
    remote.add_parsers(sub)     # compile, submit
    tools.add_parsers(sub)      # stack, runs, compare, sync, presets
    return p


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
        if getattr(args, "stack", None):
            print(f"mbpo: is the local stack down? `mbpo stack status --dir {args.stack}` says; "
                  f"`mbpo stack up --dir {args.stack}` brings it back; then run this command "
                  "again", file=sys.stderr)
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
