"""Several seeds of one configuration: one training run per seed under one MLflow parent run.

Locally each seed is its own `mbpo run` process (a chain of kfp.local pipeline runs), ``parallel``
at a time; on a cluster `mbpo submit --seeds` submits one chain per seed, which the cluster runs
side by side. When all seeds are done the parent run gets the across-seed mean and std of the
eval return at every evaluation, and OUT/summary.json holds each seed's summary.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def parent_run(tracking_uri: str, experiment: str, env: str, overrides: list[str], seeds: list[int],
               name: str) -> str | None:
    """The MLflow parent run of a seed group (its params: the config of seed ``seeds[0]``)."""
    if not tracking_uri:
        return None
    from mbpo_core.config import make_config
    from mbpo_core.tracking import Tracker

    tracker = Tracker.create(tracking_uri, make_config(env, overrides, seed=seeds[0]),
                             experiment=experiment, run_name=name,
                             tags={"mbpo.seeds": " ".join(map(str, seeds)),
                                   "mbpo.kind": "seed-group"})
    return tracker.run_id


def mean_curve(summaries: list[dict[str, Any]]) -> list[list[float]]:
    """[steps, mean, std] over seeds at the evaluations every seed has."""
    by_step: dict[int, list[float]] = {}
    for s in summaries:
        for steps, ret, _ in s["curve"]:
            by_step.setdefault(int(steps), []).append(float(ret))
    out = []
    for steps in sorted(by_step):
        vals = by_step[steps]
        if len(vals) == len(summaries):
            m = sum(vals) / len(vals)
            out.append([steps, m, math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals))])
    return out


def run_seeds(base_cmd: list[str], seeds: list[int], out: Path, run_name: str, parallel: int,
              parent_id: str | None, tracking_uri: str) -> dict[str, Any]:
    """Start `mbpo run` for every seed (``parallel`` at a time) and gather their summaries."""
    out.mkdir(parents=True, exist_ok=True)
    pending = list(seeds)
    running: dict[int, subprocess.Popen] = {}
    failed: list[int] = []
    start = time.perf_counter()
    while pending or running:
        while pending and len(running) < parallel:
            seed = pending.pop(0)
            cmd = [*base_cmd, "--seed", str(seed), "--out", str(out / f"seed-{seed}"),
                   "--run-name", f"{run_name}-s{seed}", "--no-progress"]
            if parent_id:
                cmd += ["--parent-run-id", parent_id]
            log.info("seed %d: %s", seed, " ".join(cmd[2:]))
            running[seed] = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *cmd])
        for seed, proc in list(running.items()):
            if proc.poll() is not None:
                del running[seed]
                if proc.returncode != 0:
                    failed.append(seed)
                    log.error("seed %d failed (exit code %d); its output is in %s", seed,
                              proc.returncode, out / f"seed-{seed}")
        time.sleep(0.5)
    summaries = [json.loads((out / f"seed-{s}" / "summary.json").read_text())
                 for s in seeds if s not in failed]
    result = {"seeds": seeds, "failed": failed, "curve": mean_curve(summaries),
              "runs": summaries, "wall_s": time.perf_counter() - start}
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    if parent_id:
        from mbpo_core.tracking import Tracker

        parent = Tracker(tracking_uri, parent_id)
        for steps, mean, std in result["curve"]:
            parent.log_metrics({"eval/return_mean": mean, "eval/return_std": std}, steps)
        parent.log_curve(result["curve"], f"mean over seeds {seeds}")
        parent.finish("FAILED" if failed else "FINISHED")
    return result
