"""`mbpo runs` and `mbpo compare`: runs from MLflow as a table, and learning curves side by side
(from MLflow, or from runs' --out folders)."""

from __future__ import annotations

import csv
from collections import defaultdict
from importlib import resources
from pathlib import Path

REFERENCES = ("mbpo", "sac")


def format_table(rows: list[dict]) -> str:
    head = ["run", "task", "seed", "steps", "last return", "best return", "wall", "status"]
    lines = [[r["name"] or r["run_id"][:12], r["task"], r["seed"], str(r["steps"]),
              "-" if r["last_return"] is None else f"{r['last_return']:.1f}",
              "-" if r["best_return"] is None else f"{r['best_return']:.1f}",
              f"{r['wall_s'] / 60:.1f} min", r["status"]] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*line) for line in lines])


def local_curve(folder: Path) -> tuple[str, list[tuple[int, float]]]:
    """(label, [(env steps, eval return)]) of a run's --out folder: its summary.json when the run
    is done, else the rounds its store holds so far (a run still going, or stopped)."""
    import json

    summary, config = folder / "summary.json", folder / "config.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        if "seeds" in s:  # `mbpo run --seeds`: the mean over the seeds
            env, seed = s["runs"][0]["env"], "mean of " + " ".join(map(str, s["seeds"]))
        else:
            env, seed = s["env"], s.get("seed", "?")
        curve = s["curve"]
    elif (folder / "run.json").is_file() and config.is_file():
        from mbpo_core.runstore import RunStore

        c = json.loads(config.read_text())
        env, seed = c["env"], c["seed"]
        curve = RunStore(json.loads((folder / "run.json").read_text())["run_url"]).curve()
    else:
        from mbpo_core.config import ConfigError

        raise ConfigError(f"{folder}: no summary.json, nor run.json and config.json; allowed: the "
                          "--out folder of `mbpo train` or `mbpo run`, or an MLflow run id or name")
    return f"{folder.name} ({env}, seed {seed})", [(int(p[0]), float(p[1])) for p in curve]


def reference_curve(source: str, task: str) -> tuple[list[float], list[float], list[float]] | None:
    """Mean and std over seeds of a published curve (see reference_curves/README.md), or None."""
    name = task.split("-")[0] + ".csv"
    path = resources.files("pipelines") / "reference_curves" / source / name
    if not path.is_file():
        return None
    by_seed: dict[str, list[tuple[float, float]]] = defaultdict(list)
    with path.open() as f:
        for row in csv.DictReader(f):
            by_seed[row["seed"]].append((float(row["step"]), float(row["reward"])))
    import numpy as np

    grid = np.linspace(0, min(max(s for s, _ in c) for c in by_seed.values()), 60)
    ys = np.array([np.interp(grid, *zip(*sorted(c))) for c in by_seed.values()])
    return grid.tolist(), ys.mean(0).tolist(), ys.std(0).tolist()


def plot_curves(curves: list[tuple[str, list[tuple[int, float]]]], out: Path,
                references: list[str], task: str | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    max_step = 0
    for label, points in curves:
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", ms=2.5, label=label)
            max_step = max(max_step, max(steps))
    for source in references:
        ref = reference_curve(source, task or "") if task else None
        if ref is None:
            continue
        x, mean, std = ref
        keep = [i for i, s in enumerate(x) if s <= max(max_step, 1) * 1.05]
        x, mean, std = ([v[i] for i in keep] for v in (x, mean, std))
        lo = [m - s for m, s in zip(mean, std)]
        hi = [m + s for m, s in zip(mean, std)]
        line = ax.plot(x, mean, ls="--", label=f"{source} (published, {task.split('-')[0]})")[0]
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.12)
    ax.set_xlabel("env steps")
    ax.set_ylabel("eval return")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
