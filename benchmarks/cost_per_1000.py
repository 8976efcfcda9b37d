"""Seconds per 1,000 Hopper-v5 env steps at the paper preset, with 20k, 50k and 100k real
transitions in the buffer: fp32, bf16, and the code of an earlier commit, in turns in one run.

    git worktree add /tmp/mbpo-before <commit>      # the code to compare against
    OMP_NUM_THREADS=2 python benchmarks/cost_per_1000.py --before /tmp/mbpo-before \
        --warm-epochs 40 --fit-epochs 10 --round-epochs 25

One round (250 env steps) is timed and scaled to 1,000 steps: collecting the steps, the ensemble
fit on all real data, warm-started from a fit on the data without the new steps (weights and
Adam moments, as in a run), the rollouts at that stage's length (k = 1 at 20k, 3 at 50k, 9 at
100k: the original's Hopper schedule [20, 150, 1, 15]), and the SAC updates (20 per step; a
tenth of them is run and scaled unless --full-sac). Each variant runs in its own process on the
same data and the same warm start. Run nothing else meanwhile.

The data are uniform-random-policy Hopper transitions, on which a fit keeps improving for far
longer than in a run: a run's fits on Hopper stop after a median of about 25 epochs once past
its first few rounds, while a fit to early stopping on 100k random-policy transitions takes
hundreds. By default the timed fit runs to early stopping from a warm start fitted to early
stopping; ``--fit-epochs 10 --round-epochs 25`` instead times 10 epochs of each variant from the
same warm start (capped at ``--warm-epochs``) and counts a round's fit as 25 epochs at that
speed: the cost of a run's fit at each variant's measured speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_ROUND = 250


def prepare(size: int, folder: Path, warm_epochs: int) -> Path:
    """``size`` real transitions and an ensemble fitted on all but the last round's, saved.

    The warm start is fitted to early stopping (``warm_epochs`` = 0), as the previous round's
    fit in a run would have been; a cap makes it cheaper but leaves the timed fit more to do."""

    from mbpo_core.buffer import ReplayBuffer
    from mbpo_core.config import make_config
    from mbpo_core.state import save_state
    from mbpo_core.steps import Collector, Dynamics, collect, fit_ensemble

    path = folder / f"hopper-{size}-warm{warm_epochs or 'stop'}.pt"
    if path.exists():
        return path
    cfg = make_config("Hopper-v5", seed=0)
    col = Collector(cfg)
    rows = collect(col, None, size).rows
    real = ReplayBuffer(cfg.real_buffer_size, 11, 3)
    real.add_rows(rows[:-STEPS_PER_ROUND])
    # the warm start's own fit in bf16 where available: only its result matters here
    dyn = Dynamics(make_config("Hopper-v5", [f"ensemble.max_epochs={warm_epochs}",
                                             "ensemble.precision=bf16"], seed=0))
    started = time.perf_counter()
    res = fit_ensemble(dyn, real)
    print(f"  prepared {size}: warm-start fit {res.epochs} epochs, "
          f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    state = dyn.state_dict()
    state["optimizer"] = single_group(dyn)
    save_state({"rows": rows, "dynamics": state, "collector": col.state_dict()}, path)
    return path


def single_group(dyn) -> dict:
    """The ensemble's Adam state in the one-group layout of code before the weight decay moved
    into Adam, which that code loads and this code converts back (ensemble.load_optimizer_state)."""
    opt, params = dyn.optimizer, list(dyn.model.parameters())
    flat = [q for g in opt.param_groups for q in g["params"]]
    saved = opt.state_dict()
    by_param = {id(q): saved["state"][j] for j, q in enumerate(flat) if j in saved["state"]}
    group = {k: v for k, v in saved["param_groups"][0].items() if k != "params"}
    group.update(weight_decay=0.0, params=list(range(len(params))))
    return {"state": {i: by_param[id(q)] for i, q in enumerate(params) if id(q) in by_param},
            "param_groups": [group]}


def worker(data: Path, overrides: list[str], full_sac: bool, fit_epochs: int) -> dict:
    """One timed round in this process (which may import an earlier commit's code)."""
    import torch

    from mbpo_core.buffer import ReplayBuffer
    from mbpo_core.config import make_config
    from mbpo_core.runtime import tune_allocator
    from mbpo_core.state import load_state
    from mbpo_core.steps import (
        Agent,
        Collector,
        Dynamics,
        collect,
        fit_ensemble,
        imagine,
        make_generator,
        update_sac,
    )

    tune_allocator()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    state = load_state(data)
    rows = state["rows"]
    cfg = make_config("Hopper-v5", overrides, seed=0)
    fit_cfg = cfg if not fit_epochs else make_config(
        "Hopper-v5", [*overrides, f"ensemble.max_epochs={fit_epochs}",
                      f"ensemble.patience={fit_epochs}"], seed=0)
    real = ReplayBuffer(cfg.real_buffer_size, 11, 3)
    real.add_rows(rows[:-STEPS_PER_ROUND])
    dyn = Dynamics.from_state_dict(fit_cfg, state["dynamics"])
    col = Collector.from_state_dict(cfg, state["collector"])
    agent, g = Agent(cfg), make_generator(1)
    k = cfg.rollout_length(rows.shape[0])
    t: dict[str, float] = {}
    start = time.perf_counter()
    collect(col, agent.actor, STEPS_PER_ROUND)
    t["collect"] = time.perf_counter() - start
    real.add_rows(rows[-STEPS_PER_ROUND:])  # the same new steps for every variant
    start = time.perf_counter()
    fitted = fit_ensemble(dyn, real)
    t["fit_ensemble"] = time.perf_counter() - start
    start = time.perf_counter()
    dream = imagine(cfg, dyn, agent.actor, real, k, g)
    t["imagine"] = time.perf_counter() - start
    model = ReplayBuffer(cfg.model_buffer_capacity(k), 11, 3)
    model.add_rows(dream.rows)
    n_updates = cfg.sac.updates_per_step * STEPS_PER_ROUND
    scale = 1 if full_sac else 10
    update_sac(cfg, agent, real, model, 20)  # warm-up
    start = time.perf_counter()
    sac_stats = update_sac(cfg, agent, real, model, n_updates // scale)
    t["update_sac"] = (time.perf_counter() - start) * scale
    per_round = sum(t.values())
    # the same data and warm start for every variant: the fit's holdout error and SAC's losses
    # show what bf16 products change
    return {"s_per_1000": per_round * 1000 / STEPS_PER_ROUND, "round_s": t,
            "fit_s_per_epoch": t["fit_ensemble"] / fitted.epochs,
            "fit_epochs": fitted.epochs, "elite_holdout_mse": fitted.elite_holdout_mse,
            "sac": sac_stats, "rollout_length": k, "real": rows.shape[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--before", type=Path, default=None,
                   help="a checkout of the earlier code (git worktree), run as 'before'")
    p.add_argument("--sizes", type=int, nargs="+", default=[20_000, 50_000, 100_000])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warm-epochs", type=int, default=0,
                   help="cap on the warm start's fit (default 0: to early stopping, as in a run)")
    p.add_argument("--full-sac", action="store_true")
    p.add_argument("--fit-epochs", type=int, default=0,
                   help="time this many fit epochs (no early stop) instead of a fit to early "
                        "stopping; with --round-epochs the round's fit is scaled to that count")
    p.add_argument("--round-epochs", type=float, default=0,
                   help="epochs to early stopping of a fit in a run at this stage, to scale the "
                        "timed epochs to (see the module docstring)")
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    p.add_argument("--worker", nargs=2, metavar=("DATA", "OVERRIDES_JSON"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(Path(args.worker[0]), json.loads(args.worker[1]), args.full_sac,
                                args.fit_epochs)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    variants = {"fp32": (REPO, []),
                "bf16": (REPO, ["sac.precision=bf16", "ensemble.precision=bf16"])}
    if args.before:
        variants = {"before": (args.before.resolve(), [])} | variants
    results: dict = {}
    for size in args.sizes:
        data = prepare(size, args.out.resolve(), args.warm_epochs)
        for _ in range(args.repeats):
            for name, (code, overrides) in variants.items():
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(data),
                       json.dumps(overrides), "--fit-epochs", str(args.fit_epochs)] + (
                           ["--full-sac"] if args.full_sac else [])
                env = os.environ | {"PYTHONPATH": str(code)}
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=code)
                if done.returncode != 0:
                    raise RuntimeError(f"{name} at {size}: {done.stderr[-2000:]}")
                r = json.loads(done.stdout.strip().splitlines()[-1])
                if args.round_epochs:  # the fit of a run at this stage: its epochs, this speed
                    fit_s = r["fit_s_per_epoch"] * args.round_epochs
                    round_s = sum(r["round_s"].values()) - r["round_s"]["fit_ensemble"] + fit_s
                    r["round_s"]["fit_ensemble"] = fit_s
                    r["s_per_1000"] = round_s * 1000 / STEPS_PER_ROUND
                results.setdefault(str(size), {}).setdefault(name, []).append(r)
                print(f"{size:>7} {name:<7} {r['s_per_1000']:7.0f} s/1000 steps  (k={r['rollout_length']}, "
                      f"fit {r['fit_epochs']} epochs at {r['fit_s_per_epoch']:.2f} s, "
                      f"holdout mse {r['elite_holdout_mse']:.4f}, "
                      f"critic loss {r['sac']['critic_loss']:.3f}; " + ", ".join(
                          f"{k} {v:.1f}" for k, v in r["round_s"].items()) + ")", flush=True)
    print("\nmedians, s per 1,000 env steps:")
    for size, by in results.items():
        med = {n: statistics.median(r["s_per_1000"] for r in rs) for n, rs in by.items()}
        ratio = "".join(f"  {n}/before {med[n] / med['before']:.2f}" for n in med
                        if n != "before" and "before" in med)
        print(f"{size:>7}: " + ", ".join(f"{n} {v:.0f}" for n, v in med.items()) + ratio)
    (args.out / "cost_per_1000.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
