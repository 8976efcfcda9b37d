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
    return _columns(head, lines)


def _columns(head: list[str], lines: list[list[str]], right: tuple[int, ...] = ()) -> str:
    """A plain-text table: a header, a rule, and the lines; columns in ``right`` right-aligned."""
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:{'>' if i in right else '<'}{w}}}" for i, w in enumerate(widths))
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


def _reference_seeds(source: str, task: str) -> list[list[tuple[float, float]]] | None:
    """A published curve's (env steps, eval return) points per seed, or None (no such curve)."""
    name = task.split("-")[0] + ".csv"
    path = resources.files("pipelines") / "reference_curves" / source / name
    if not path.is_file():
        return None
    by_seed: dict[str, list[tuple[float, float]]] = defaultdict(list)
    with path.open() as f:
        for row in csv.DictReader(f):
            by_seed[row["seed"]].append((float(row["step"]), float(row["reward"])))
    return [sorted(points) for points in by_seed.values()]


def reference_curve(source: str, task: str) -> tuple[list[float], list[float], list[float]] | None:
    """Mean and std over seeds of a published curve (see reference_curves/README.md), or None."""
    seeds = _reference_seeds(source, task)
    if seeds is None:
        return None
    import numpy as np

    grid = np.linspace(0, min(c[-1][0] for c in seeds), 60)
    ys = np.array([np.interp(grid, *zip(*c)) for c in seeds])
    return grid.tolist(), ys.mean(0).tolist(), ys.std(0).tolist()


def window_mean(points: list[tuple[int, float]], lo: float, hi: float) -> float | None:
    """Mean eval return over the evaluations at lo <= env steps <= hi (None if there are none):
    one seed's figure over a stretch of its curve, steadier than its last point."""
    inside = [r for s, r in points if lo <= s <= hi]
    return sum(inside) / len(inside) if inside else None


def reference_window_mean(source: str, task: str, steps: list[float]
                          ) -> tuple[float, float, int] | None:
    """Mean and std over a published curve's seeds of each seed's mean return at ``steps``
    (linearly interpolated: the published evaluations fall on other steps), and its number of
    seeds; None when there is no such curve or ``steps`` reach past its end."""
    seeds = _reference_seeds(source, task)
    if seeds is None or not steps or max(steps) > min(c[-1][0] for c in seeds):
        return None
    import numpy as np

    per_seed = np.array([np.interp(steps, *zip(*c)).mean() for c in seeds])
    return float(per_seed.mean()), float(per_seed.std()), len(per_seed)


def format_window(curves: list[tuple[str, list[tuple[int, float]]]], lo: float, hi: float,
                  references: list[str], task: str | None) -> str:
    """The table of ``mbpo compare --window``: each run's mean over the window, their mean, and
    the published curves' (std over seeds) at the same env steps."""
    rows = []
    means = []
    for label, points in curves:
        m = window_mean(points, lo, hi)
        n = sum(lo <= s <= hi for s, _ in points)
        rows.append([label, str(n), "-" if m is None else f"{m:.1f}"])
        if m is not None:
            means.append(m)
    if len(means) > 1:
        avg = sum(means) / len(means)
        std = (sum((m - avg) ** 2 for m in means) / len(means)) ** 0.5
        rows.append([f"mean over the {len(means)} runs", "", f"{avg:.1f} +- {std:.1f}"])
    steps = sorted({s for _, points in curves for s, _ in points if lo <= s <= hi})
    for source in references:
        ref = reference_window_mean(source, task, steps) if task else None
        if ref is not None:
            rows.append([f"{source} (published, {task.split('-')[0]}, {ref[2]} seeds)", "",
                         f"{ref[0]:.1f} +- {ref[1]:.1f}"])
    table = _columns(["run", "evaluations", "mean eval return"], rows, right=(1, 2))
    return f"mean eval return over {lo:g} to {hi:g} env steps\n{table}"


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
