"""``mbpo compile`` and ``mbpo submit``: the pipeline as a KFP package, and training runs sent to
a KFP cluster."""

from __future__ import annotations

import argparse
import os

from components import DEFAULT_IMAGE
from mbpo_core.config import ConfigError, available_presets, make_config

from .. import cliargs as argtypes
from ..submit import TOKEN_ENV
from .common import (
    DRY_RUN_HELP,
    _add_pipeline_args,
    _add_run_config,
    _add_tracking_args,
    _print_plan,
    _training_run,
)


def add_parsers(sub: argparse._SubParsersAction) -> None:
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


def cmd_compile(args: argparse.Namespace) -> int:
    from ..pipeline import compile_pipeline

    make_config(args.env, args.overrides)  # fail now, not on the cluster
    from ..cluster import ClusterSettings
    from ..submit import continue_chain

    path = compile_pipeline(args.rounds, args.output, resume=args.continuation, image=args.image,
                            cluster=ClusterSettings(gpu=args.gpu), chain_step=continue_chain)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB, {args.rounds} rounds)")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from ..chain import default_run_name
    from ..seeds import parent_run
    from ..submit import ClusterTarget, submit_chain

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
