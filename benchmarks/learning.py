"""Learning benchmark: eval return vs env steps for one task and several seeds.

    python benchmarks/learning.py --env InvertedPendulum-v5 --seeds 0 1 2 --total-steps 5000

Prints each seed's curve, the first env-step count at which the eval return reaches --target,
and writes bench_out/learning-<env>.json (+ .png when matplotlib is available).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from mbpo_core.config import make_config
from mbpo_core.runtime import tune_allocator
from mbpo_core.trainer import MBPOTrainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--env", default="InvertedPendulum-v5")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--total-steps", type=int, default=5000)
    p.add_argument("--target", type=float, default=950.0)
    p.add_argument("--set", dest="overrides", nargs="+", default=[])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tune_allocator()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    results = {}
    for seed in args.seeds:
        cfg = make_config(args.env, args.overrides, seed=seed)
        trainer = MBPOTrainer(cfg)
        start = time.perf_counter()
        def report(metrics: dict[str, float], env_steps: int, seed: int = seed) -> None:
            times = " ".join(f"{k[5:-2]}={v:.0f}s" for k, v in metrics.items() if k.startswith("time/"))
            print(f"  seed {seed} env_steps {env_steps} eval {metrics['eval/return_mean']:.1f} "
                  f"k={metrics['rollout/length']:.0f} model_mse={metrics['model/elite_holdout_mse']:.4f} "
                  f"{times}", flush=True)

        curve = trainer.train(args.total_steps, sink=report, progress=False)
        wall = time.perf_counter() - start
        reached = next((s for s, m, _ in curve if m >= args.target), None)
        results[seed] = {"curve": curve, "wall_s": wall, "reached_target_at": reached}
        print(f"seed {seed}: final {curve[-1][1]:.1f} at {curve[-1][0]} steps; "
              f"reached {args.target:g} at {reached}; wall {wall:.0f} s", flush=True)
        print("  " + " ".join(f"{int(s)}:{m:.0f}" for s, m, _ in curve), flush=True)

    finals = [r["curve"][-1][1] for r in results.values()]
    print(f"{args.env}: mean final eval return {sum(finals) / len(finals):.1f} over seeds "
          f"{args.seeds} at {args.total_steps} env steps")
    path = args.out / f"learning-{args.env}.json"
    path.write_text(json.dumps({"env": args.env, "overrides": args.overrides,
                                "results": results}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for seed, r in results.items():
            xs, ys = [c[0] for c in r["curve"]], [c[1] for c in r["curve"]]
            ax.plot(xs, ys, label=f"seed {seed}")
        ax.set_xlabel("env steps")
        ax.set_ylabel("eval return")
        ax.set_title(f"MBPO on {args.env}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path.with_suffix(".png"), dpi=100)
    except ImportError:
        pass
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
