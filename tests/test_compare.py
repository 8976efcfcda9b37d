"""`mbpo compare --window`: a run's mean eval return over a stretch of env steps, beside the
published curves' at the same steps (the figure the learning targets are stated in)."""

import csv
import json
from collections import defaultdict
from importlib import resources

import pytest

from pipelines.compare import reference_window_mean, window_mean
from tests.test_cli_validation import _call


def _published(source: str, task: str) -> dict[float, list[float]]:
    """The published CSV read directly: eval returns of every seed at each env step."""
    path = resources.files("pipelines") / "reference_curves" / source / f"{task}.csv"
    by_step: dict[float, list[float]] = defaultdict(list)
    with path.open() as f:
        for row in csv.DictReader(f):
            by_step[float(row["step"])].append(float(row["reward"]))
    return by_step


def test_window_mean_takes_the_evaluations_inside_the_bounds_inclusive():
    points = [(250, 10.0), (500, 30.0), (750, 50.0), (1000, 200.0)]
    assert window_mean(points, 500, 750) == 40.0
    assert window_mean(points, 0, 10**6) == 72.5
    assert window_mean(points, 1000, 1000) == 200.0
    assert window_mean(points, 501, 749) is None


def test_reference_window_mean_at_published_steps_is_the_mean_over_seeds_there():
    by_step = _published("mbpo", "Hopper")
    steps = sorted(s for s in by_step if 15000 <= s <= 20100)[:3]
    assert len(steps) == 3
    per_step_mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
    mean, std, n = reference_window_mean("mbpo", "Hopper-v5", steps)
    assert n == len(by_step[steps[0]])
    assert mean == pytest.approx(sum(per_step_mean) / 3)
    assert std > 0  # the seeds differ
    # past the published curve's end there is nothing to compare with
    assert reference_window_mean("mbpo", "Hopper-v5", [max(by_step) + 1000]) is None
    assert reference_window_mean("mbpo", "NoSuchTask-v5", steps) is None


def test_compare_window_prints_each_run_their_mean_and_the_reference(tmp_path):
    runs = []
    for seed, returns in [(0, [10.0, 30.0, 90.0]), (1, [20.0, 40.0, 100.0])]:
        folder = tmp_path / f"hopper-s{seed}"
        folder.mkdir()
        curve = [[step, r, 0.0] for step, r in zip([5250, 5500, 5750], returns)]
        (folder / "summary.json").write_text(json.dumps(
            {"env": "Hopper-v5", "seed": seed, "curve": curve}))
        runs.append(str(folder))
    rc, out, err = _call(["compare", *runs, "-o", str(tmp_path / "c.png"), "--reference", "mbpo",
                          "--window", "5500", "5750"])
    assert rc == 0, err
    assert (tmp_path / "c.png").stat().st_size > 0
    lines = out.splitlines()
    assert "mean eval return over 5500 to 5750 env steps" in lines
    row = {line.split(" (")[0]: line.split() for line in lines if line.startswith("hopper-s")}
    assert row["hopper-s0"][-2:] == ["2", "60.0"] and row["hopper-s1"][-2:] == ["2", "70.0"]
    assert any(line.startswith("mean over the 2 runs") and line.endswith("65.0 +- 5.0")
               for line in lines)
    ref = reference_window_mean("mbpo", "Hopper-v5", [5500, 5750])
    assert any(line.startswith("mbpo (published, Hopper, 5 seeds)")
               and line.endswith(f"{ref[0]:.1f} +- {ref[1]:.1f}") for line in lines)


def test_compare_window_bounds_are_checked_before_anything_is_read(tmp_path):
    png = tmp_path / "c.png"
    rc, _, err = _call(["compare", str(tmp_path / "missing"), "-o", str(png),
                        "--window", "2000", "1000"])
    assert rc == 2 and "--window 2000 1000: allowed LO <= HI" in err
    rc, _, err = _call(["compare", "x", "-o", str(png), "--window", "-5", "10"])
    assert rc == 2 and "argument --window" in err and "allowed 0 to" in err
    assert not png.exists()
