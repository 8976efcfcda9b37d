"""A diverging SAC update mid-run, in `mbpo train` and in the pipeline: the run stops with a clear
error, keeps its last good round, and resuming from it gives exactly the undisturbed run."""

import json
import os
import subprocess
import sys

import pytest

import mbpo_core.trainer
from mbpo_core.runstore import RunStore
from pipelines.cli import main
from tests.conftest import TINY
from tests.faultinject.diverge import diverging

pytestmark = pytest.mark.slow
ENV = "InvertedPendulum-v5"
# TINY collects 100 steps in round 0, then 50 per round: round 2 is the first with 200 real rows
DIVERGE_AT_ROWS = 200
TRAIN = ["--env", ENV, "--total-steps", "300", "--seed", "4", "--no-progress", "--no-tracking"]


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory):
    """The eval curve of the same run without the fault."""
    out = tmp_path_factory.mktemp("undisturbed")
    assert main(["train", *TRAIN, "--out", str(out), "--set", *TINY]) == 0
    return json.loads((out / "summary.json").read_text())["curve"]


def test_train_divergence_keeps_the_last_checkpoint_and_resumes(tmp_path, monkeypatch, capsys,
                                                                undisturbed):
    out = tmp_path / "diverged"
    with monkeypatch.context() as m:
        m.setattr(mbpo_core.trainer, "update_sac",
                  diverging(mbpo_core.trainer.update_sac, DIVERGE_AT_ROWS))
        rc = main(["train", *TRAIN, "--out", str(out), "--checkpoint-every", "1", "--set", *TINY])
    err = capsys.readouterr().err
    assert rc == 1
    assert "SAC diverged" in err and "critic_loss" in err
    assert f"last good checkpoint is {out / 'state.pt'} (round 2, 150 env steps)" in err
    assert not (out / "summary.json").exists(), "a diverged run publishes no result"

    resumed = tmp_path / "resumed"
    assert main(["train", *TRAIN, "--out", str(resumed), "--resume-from",
                 str(out / "state.pt")]) == 0
    assert json.loads((resumed / "summary.json").read_text())["curve"] == undisturbed


def test_pipeline_divergence_keeps_the_last_good_round_and_resumes(tmp_path, undisturbed):
    out, store = tmp_path / "run", tmp_path / "store"
    cmd = [sys.executable, "-m", "pipelines.cli", "run", *TRAIN, "--out", str(out), "--store",
           str(store), "--run-name", "diverging", "--set", *TINY]
    inject = os.path.join(os.getcwd(), "tests", "faultinject")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ | {
        "PYTHONPATH": f"{inject}{os.pathsep}{os.getcwd()}",
        "MBPO_TEST_DIVERGE_AT_ROWS": str(DIVERGE_AT_ROWS)})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "SAC diverged" in proc.stderr and "--resume-from" in proc.stderr, proc.stderr[-3000:]

    run = RunStore(f"{store}/runs/diverging")
    ckpt = run.checkpoint()
    assert (ckpt.round, ckpt.env_steps) == (1, 150), "the last good round is the checkpoint"
    assert not run.store.exists("rounds/000002/update_sac.json")
    assert not run.store.exists("rounds/000002/evaluate.json")
    assert run.curve() == undisturbed[:2]

    # resume without the fault: it continues from round 1 and equals the undisturbed run
    assert main(["run", "--resume-from", str(out), "--out", str(out), "--no-tracking",
                 "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["curve"] == undisturbed
    assert run.checkpoint().round == 4


def test_a_diverged_tracked_train_run_ends_failed_in_mlflow(tmp_path, monkeypatch, mlflow_store):
    """The run's MLflow record says FAILED (not RUNNING forever, nor FINISHED)."""
    from mlflow.tracking import MlflowClient

    with monkeypatch.context() as m:
        m.setattr(mbpo_core.trainer, "update_sac",
                  diverging(mbpo_core.trainer.update_sac, DIVERGE_AT_ROWS))
        args = [a for a in TRAIN if a != "--no-tracking"]
        rc = main(["train", *args, "--out", str(tmp_path / "diverged"), "--experiment",
                   "diverged-train", "--registered-model", "", "--set", *TINY])
    assert rc == 1
    client = MlflowClient(mlflow_store)
    [run] = client.search_runs([client.get_experiment_by_name("diverged-train").experiment_id])
    assert run.info.status == "FAILED"
    assert len(client.get_metric_history(run.info.run_id, "eval/return_mean")) == 2  # rounds 0, 1
