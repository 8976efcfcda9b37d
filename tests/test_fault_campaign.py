"""The fault campaign's short version (benchmarks/faults.py): one seeded fault of each kind on a
4-round `mbpo run --stack`, each followed by the documented recovery; nothing may be lost,
duplicated or changed. The full campaign (24 faults, 10 rounds) is a benchmark whose figures
are in docs/reliability.md."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_short_fault_campaign_recovers_every_fault_and_changes_nothing(tmp_path):
    report_file = tmp_path / "faults.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/faults.py", "--faults", "6", "--seed", "3", "--rounds", "4",
         "--rounds-per-run", "2", "--updates-per-step", "5", "--workdir", str(tmp_path / "w"),
         "--json", str(report_file)],
        capture_output=True, text=True, timeout=1800, env=os.environ | {"PYTHONPATH": os.getcwd()})
    assert report_file.exists(), proc.stderr[-4000:]
    r = json.loads(report_file.read_text())
    kinds = {k: n for k, n in r["by_kind"].items() if n}
    assert r["faults_injected"] == 6, proc.stderr[-4000:]
    expected = {"kill_s3", "kill_mlflow", "kill_step", "kill_driver", "stack_cycle"}
    if os.geteuid() == 0:  # mounting the small tmpfs for the full disk needs root
        expected.add("disk_full")
    assert set(kinds) == expected, kinds
    # at least the driver kill fails the run; every failure said why and how to resume
    assert 1 <= r["runs_failed"] == r["failures_clear"] and r["resumes"] >= 1, r["faults"]
    assert r["run_complete"]
    assert r["transitions_stored"] == r["transitions_expected"] == 250
    assert r["transitions_lost"] == r["transitions_duplicated"] == 0
    assert r["real_shards_not_in_manifest"] == r["manifest_shards_missing"] == 0
    assert r["model_shards_per_round_once"]
    assert r["mlflow_eval_points_missing"] == r["mlflow_eval_points_wrong"] == 0
    assert r["mlflow_points_repeated"] == 0, r["mlflow_metric_lengths"]
    assert r["mlflow_status"] == "FINISHED" and r["mlflow_model_versions"] == 1
    assert r["pending_after_sync"] == 0
    assert r["curve_equal"] and r["weights_equal"]
    assert r["leftover_processes"] == 0
    assert proc.returncode == 0, proc.stderr[-4000:]
