"""Faults against the real parts: the S3 server going away mid-run, the MLflow server dying."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mbpo_core.runstore import RunStore
from mbpo_core.shards import ShardManifest
from mbpo_core.storage import open_store, split_uri
from pipelines import stack
from pipelines.cli import main
from pipelines.s3server import S3Server
from tests.conftest import TINY

pytestmark = pytest.mark.slow
ENV = "InvertedPendulum-v5"


def _wait(predicate, what: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_s3_outage_mid_run_then_finish_loses_and_duplicates_nothing(tmp_path, monkeypatch):
    server = S3Server.start(tmp_path / "s3", "fault-key", "fault-secret-0123456789")
    try:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        server.create_bucket("faults")
        store_url, out = "s3://faults/store", tmp_path / "run"
        cmd = [sys.executable, "-m", "pipelines.cli", "run", "--env", ENV, "--total-steps", "300",
               "--seed", "5", "--out", str(out), "--store", store_url, "--run-name", "outage",
               "--no-tracking", "--no-progress", "--set", *TINY]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=os.environ | {"PYTHONPATH": os.getcwd()})
        run = RunStore(f"{store_url}/runs/outage")

        def round0_done() -> bool:
            try:
                return run.store.exists("rounds/000000/evaluate.json")
            except Exception:
                return False
        _wait(round0_done, "round 0", proc)
        server.stop()          # the object store goes away in the middle of round 1 ...
        time.sleep(4)
        server.restart()       # ... and comes back
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:  # boto3's retries may or may not bridge the outage: either
            assert "S3" in err or "storage" in err, err[-2000:]  # it failed clearly, and then
            assert main(["run", "--resume-from", str(out), "--out", str(out), "--no-tracking",
                         "--no-progress"]) == 0  # a resume finishes the run
        # the same run as one without an outage, every shard once
        assert main(["train", "--env", ENV, "--total-steps", "300", "--seed", "5", "--out",
                     str(tmp_path / "train"), "--no-progress", "--no-tracking", "--set",
                     *TINY]) == 0
        got = json.loads((out / "summary.json").read_text())
        want = json.loads((tmp_path / "train" / "summary.json").read_text())
        assert got["curve"] == want["curve"]
        ckpt = run.checkpoint()
        store, key = split_uri(ckpt.artifacts["real_manifest"])
        manifest = ShardManifest.from_json(store.get(key).decode())
        assert [s.rows for s in manifest.shards] == [100, 50, 50, 50, 50]
        stored = sorted(f"{run.url}/{k}" for k in open_store(run.url).list("real/"))
        assert stored == sorted(s.uri for s in manifest.shards)
    finally:
        server.stop()


def test_mlflow_server_lost_mid_run_training_goes_on(tmp_path):
    directory = tmp_path / "stack"
    info = stack.up(directory)
    try:
        out = tmp_path / "train"
        cmd = [sys.executable, "-m", "pipelines.cli", "train", "--env", ENV, "--total-steps",
               "2500", "--out", str(out), "--no-progress", "--stack", str(directory),
               "--experiment", "faults", "--set", *TINY]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=os.environ | {"PYTHONPATH": os.getcwd()})
        from mlflow.tracking import MlflowClient

        client = MlflowClient(info.mlflow_uri)

        def logging_started() -> bool:
            try:
                exp = client.get_experiment_by_name("faults")
                runs = client.search_runs([exp.experiment_id]) if exp else []
                return bool(runs and runs[0].data.metrics)
            except Exception:
                return False
        _wait(logging_started, "the first metrics in MLflow", proc)
        os.killpg(info.mlflow_pid, signal.SIGKILL)  # the tracking server dies mid-run
        _, err = proc.communicate(timeout=600)
    finally:
        stack.down(directory)
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["env_steps"] == 2500 and len(summary["curve"]) == 49
    assert err.count("MLflow tracking failed") == 1, "the loss is reported once, clearly"
