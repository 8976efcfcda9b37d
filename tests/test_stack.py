"""`mbpo stack` survives restarts: a second `up`, `down` then `up`, and `up` after a member was
killed give back the same data, buckets, credentials, MLflow runs and stored objects."""

import os
import signal
import subprocess
import sys
import time

import boto3
import pytest

from pipelines import stack
from pipelines.cli import main
from pipelines.s3server import process_alive

pytestmark = pytest.mark.slow


def _s3(info: stack.StackInfo):
    return boto3.client("s3", endpoint_url=info.s3_endpoint, region_name="us-east-1",
                        aws_access_key_id=info.access_key, aws_secret_access_key=info.secret_key)


def test_stack_comes_back_with_its_runs_and_shards(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    directory = tmp_path / "stack"
    assert main(["stack", "up", "--dir", str(directory)]) == 0
    first = stack.load(directory)
    try:
        again = stack.up(directory)  # idempotent: nothing restarted
        assert (again.s3_pid, again.mlflow_pid) == (first.s3_pid, first.mlflow_pid)

        _s3(first).put_object(Bucket=stack.STORE_BUCKET, Key="store/runs/r/real/0.npz", Body=b"rows")
        client = MlflowClient(first.mlflow_uri)
        run = client.create_run(client.create_experiment("kept"))
        client.log_metric(run.info.run_id, "eval/return_mean", 123.0, step=250)

        # SeaweedFS killed: status says what is down and what to do; `up` starts only it
        os.killpg(first.s3_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while process_alive(first.s3_pid):  # SIGKILL is delivered asynchronously
            assert time.monotonic() < deadline
            time.sleep(0.05)
        capsys.readouterr()
        assert main(["stack", "status", "--dir", str(directory)]) == 1
        out = capsys.readouterr().out
        assert ": DOWN" in out and "s3 down" in out and "mbpo stack up --dir" in out
        assert main(["stack", "up", "--dir", str(directory)]) == 0
        back = stack.load(directory)
        assert back.s3_pid != first.s3_pid and back.mlflow_pid == first.mlflow_pid
        assert (back.s3_endpoint, back.access_key, back.secret_key) == (
            first.s3_endpoint, first.access_key, first.secret_key)
        body = _s3(back).get_object(Bucket=stack.STORE_BUCKET, Key="store/runs/r/real/0.npz")
        assert body["Body"].read() == b"rows"

        # down, then up in the same folder: the same runs, objects and credentials
        assert stack.down(directory)
        assert not process_alive(back.s3_pid) and not process_alive(back.mlflow_pid)
        assert stack.status(directory) == {"s3": False, "mlflow": False}
        assert main(["stack", "up", "--dir", str(directory)]) == 0
        morning = stack.load(directory)
        assert (morning.access_key, morning.secret_key) == (first.access_key, first.secret_key)
        assert stack.status(directory) == {"s3": True, "mlflow": True}
        history = MlflowClient(morning.mlflow_uri).get_metric_history(run.info.run_id,
                                                                      "eval/return_mean")
        assert [(m.step, m.value) for m in history] == [(250, 123.0)]
        body = _s3(morning).get_object(Bucket=stack.STORE_BUCKET, Key="store/runs/r/real/0.npz")
        assert body["Body"].read() == b"rows"
        # the tracking server still stores artifacts in its bucket on the restarted S3
        client = MlflowClient(morning.mlflow_uri)
        (tmp_path / "a.txt").write_text("artifact")
        client.log_artifact(run.info.run_id, str(tmp_path / "a.txt"))
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["a.txt"]
    finally:
        stack.down(directory)


def test_down_stops_only_what_its_own_up_started(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    stack.up(a)
    try:
        info_b = stack.up(b)
        assert main(["stack", "down", "--dir", str(a)]) == 0
        assert "stopped" in capsys.readouterr().out
        assert stack.status(b) == {"s3": True, "mlflow": True}
        assert process_alive(info_b.s3_pid) and process_alive(info_b.mlflow_pid)
        assert main(["stack", "down", "--dir", str(a)]) == 0  # again: nothing left to stop
        assert "nothing was running" in capsys.readouterr().out
    finally:
        stack.down(a)
        stack.down(b)


def test_run_interrupted_by_a_stack_outage_resumes_to_the_undisturbed_result(tmp_path, monkeypatch):
    """SeaweedFS SIGKILLed mid-run: the run fails naming the cause; `mbpo stack up` brings the
    store back and `mbpo run --resume-from` ends with exactly `mbpo train`'s curve and policy."""
    from tests.conftest import TINY
    from tests.test_pipeline_local import _assert_same_run, _train, assert_every_shard_once

    directory, out = tmp_path / "stack", tmp_path / "run"
    info = stack.up(directory)
    try:
        for key in info.env():  # --stack sets them in this process: restore them afterwards
            monkeypatch.setenv(key, "")
            monkeypatch.delenv(key)
        run_url = f"{info.env()['MBPO_STORE']}/runs/outage"
        cmd = [sys.executable, "-m", "pipelines.cli", "run", "--stack", str(directory), "--env",
               "InvertedPendulum-v5", "--total-steps", "250", "--seed", "8", "--out", str(out),
               "--run-name", "outage", "--no-progress", "--set", *TINY]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=os.environ | {"PYTHONPATH": os.getcwd(), "AWS_MAX_ATTEMPTS": "2"})
        s3 = _s3(info)  # round 0 complete: its evaluate record is in the store
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, "the run ended before the outage"
            assert time.monotonic() < deadline, "round 0 did not complete in time"
            listed = s3.list_objects_v2(Bucket=stack.STORE_BUCKET,
                                        Prefix="store/runs/outage/rounds/000000/evaluate.json")
            if listed.get("KeyCount"):
                break
            time.sleep(0.2)
        os.killpg(info.s3_pid, signal.SIGKILL)  # the store dies in the middle of round 1
        _, err = proc.communicate(timeout=600)
        assert proc.returncode != 0, "a run whose store died must not end as done"
        assert "StorageError" in err or "storage" in err.lower(), err[-2000:]
        assert f"--resume-from {run_url}" in err, err[-2000:]

        assert main(["stack", "up", "--dir", str(directory)]) == 0
        assert main(["run", "--stack", str(directory), "--resume-from", run_url, "--out", str(out),
                     "--no-progress"]) == 0
        _assert_same_run(out, _train(tmp_path, 250, 8))
        assert_every_shard_once(run_url, [100, 50, 50, 50])
    finally:
        stack.down(directory)
