"""Pipeline overhead and storage traffic.

1. Overhead: wall time of ``mbpo run`` (the kfp.local pipeline) over ``mbpo train`` (one process)
   for the same configuration and seed, and where the extra time goes: time inside the steps
   (from the run records) against task start-up and orchestration (the rest).
2. Bytes per round written to object storage (replay shards, records) and to the KFP pipeline
   root (step states), from a short run at a task's preset.

    python benchmarks/pipeline.py overhead --env InvertedPendulum-v5 --total-steps 1500
    python benchmarks/pipeline.py bytes --env Hopper-v5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from mbpo_core.config import make_config
from mbpo_core.runstore import STEPS, RunStore
from mbpo_core.storage import open_store


def _mbpo(*args: str, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipelines.cli", "--log-level", "WARNING", *args],
                   check=True, stdout=subprocess.DEVNULL, env=os.environ | (env or {}))
    return time.perf_counter() - start


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def overhead(a: argparse.Namespace) -> None:
    common = ["--env", a.env, "--total-steps", str(a.total_steps), "--seed", str(a.seed)]
    if a.set:
        common += ["--set", *a.set]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for rep in range(a.repeats):
            train_s = _mbpo("train", *common, "--out", str(tmp / f"train{rep}"), "--no-progress")
            modes = [("warm", [])] + ([("cold", ["--no-warm-workers"])] if a.cold else [])
            for mode, extra in modes:
                out = tmp / f"run-{mode}{rep}"
                run_s = _mbpo("run", *common, "--out", str(out), "--store", str(tmp / "store"),
                              "--run-name", f"{mode}{rep}", *extra)
                run = RunStore(open_store(tmp / "store").uri(f"runs/{mode}{rep}"))
                in_steps = defaultdict(float)
                for _, m in run.metrics():
                    for step in STEPS:
                        in_steps[step] += m.get(f"time/{step}_s", 0.0)
                same = (json.loads((out / "summary.json").read_text())["curve"]
                        == json.loads((tmp / f"train{rep}" / "summary.json").read_text())["curve"])
                rows.append((mode, train_s, run_s, dict(in_steps), same,
                             len(run.complete_rounds())))
                print(f"rep {rep} {mode}: train {train_s:.1f} s, run {run_s:.1f} s, "
                      f"ratio {run_s / train_s:.3f}, same curve: {same}", flush=True)
    for mode in sorted({r[0] for r in rows}):
        sel = [r for r in rows if r[0] == mode]
        ratios = sorted(r[2] / r[1] for r in sel)
        med = ratios[len(ratios) // 2]
        mode_row = sel[[r[2] / r[1] for r in sel].index(med)]
        _, train_s, run_s, in_steps, _, rounds = mode_row
        tasks = rounds * 5 + 3
        inside = sum(in_steps.values())
        print(f"\n{mode} workers, {a.env} {a.total_steps} steps, {rounds} rounds, {tasks} tasks: "
              f"median ratio run/train = {med:.3f} over {len(sel)} repeat(s)")
        print(f"  train {train_s:.1f} s; run {run_s:.1f} s = {inside:.1f} s inside the steps "
              f"+ {run_s - inside:.1f} s task start-up, orchestration and setup "
              f"({(run_s - inside) / tasks:.2f} s per task)")
        for step in STEPS:
            print(f"    {step:13s} {in_steps.get(step, 0.0):7.1f} s inside the step")


def bytes_per_round(a: argparse.Namespace) -> None:
    cfg = make_config(a.env, a.set)
    args = ["--env", a.env, "--seed", "0", "--set", *a.set] if a.set else ["--env", a.env]
    steps = cfg.init_steps + a.rounds * cfg.steps_per_round
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _mbpo("run", *args, "--total-steps", str(steps), "--out", str(tmp / "out"),
              "--store", str(tmp / "store"), "--run-name", "b")
        run_dir = tmp / "store" / "runs" / "b"
        run = RunStore(open_store(tmp / "store").uri("runs/b"))
        print(f"{a.env}: {len(run.complete_rounds())} rounds, {steps} env steps "
              f"(first round = {cfg.init_steps} warm-up steps)")
        per_round: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for p in run_dir.rglob("*"):
            if not p.is_file():
                continue
            rel = p.relative_to(run_dir).parts
            if rel[0] in ("real", "model"):
                per_round[int(rel[1].split("-")[0])][f"{rel[0]} shard"] += p.stat().st_size
            elif rel[0] == "rounds":
                per_round[int(rel[1])]["records"] += p.stat().st_size
        kfp_root = tmp / "out" / "kfp-root"
        for pipeline_run in kfp_root.iterdir():
            if pipeline_run.name.startswith("."):
                continue
            for task in pipeline_run.iterdir():
                name = task.name
                idx = int(name.rsplit("-", 1)[1]) - 1 if name.rsplit("-", 1)[-1].isdigit() else 0
                if name.startswith(("collect", "fit-ensemble", "imagine", "update-sac", "evaluate")):
                    base = name.rsplit("-", 1)[0] if name.rsplit("-", 1)[-1].isdigit() else name
                    per_round[idx][f"KFP artifacts: {base}"] += _dir_bytes(task)
        for r in sorted(per_round):
            total = sum(per_round[r].values())
            k = int(run.read_record(r, "imagine")["metrics"]["rollout/length"])
            print(f"round {r} (k={k}): {total / 1e6:.2f} MB")
            for what, n in sorted(per_round[r].items()):
                print(f"    {what:32s} {n / 1e6:9.3f} MB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    o = sub.add_parser("overhead")
    o.add_argument("--env", default="InvertedPendulum-v5")
    o.add_argument("--total-steps", type=int, default=1500)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--set", nargs="*", default=[])
    o.add_argument("--repeats", type=int, default=1)
    o.add_argument("--cold", action="store_true", help="also measure without warm workers")
    o.set_defaults(func=overhead)
    b = sub.add_parser("bytes")
    b.add_argument("--env", default="Hopper-v5")
    b.add_argument("--rounds", type=int, default=1, help="rounds after the warm-up round")
    b.add_argument("--set", nargs="*", default=[])
    b.set_defaults(func=bytes_per_round)
    a = p.parse_args()
    a.func(a)


if __name__ == "__main__":
    main()
