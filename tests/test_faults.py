"""Faults against the real parts: the S3 server going away mid-run, the MLflow server dying."""

import json
import os
import re
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


def test_s3_outage_fails_a_step_clearly_and_a_resume_loses_and_duplicates_nothing(
        tmp_path, monkeypatch):
    """The object store stays away until the run has failed (boto3's retries cut short, so the
    failure path always runs): the run names the cause and the resume command, and the resume,
    once the store is back, ends as an undisturbed run would."""
    server = S3Server.start(tmp_path / "s3", "fault-key", "fault-secret-0123456789")
    try:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        server.create_bucket("faults")
        store_url, out = "s3://faults/store", tmp_path / "run"
        cmd = [sys.executable, "-m", "pipelines.cli", "run", "--env", ENV, "--total-steps", "250",
               "--seed", "5", "--out", str(out), "--store", store_url, "--run-name", "outage",
               "--no-tracking", "--no-progress", "--set", *TINY]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=os.environ | {"PYTHONPATH": os.getcwd(),
                                                  "AWS_MAX_ATTEMPTS": "2"})
        run = RunStore(f"{store_url}/runs/outage")

        def round0_done() -> bool:
            try:
                return run.store.exists("rounds/000000/evaluate.json")
            except Exception:
                return False
        _wait(round0_done, "round 0", proc)
        server.stop()          # the object store goes away in the middle of round 1 ...
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 1, err[-3000:]       # ... for longer than the retries last
        # a server on its way down answers 500, one gone refuses connections: either is named
        assert re.search(r"^cause: StorageError: \w+ s3://faults/store/runs/outage/\S+: the S3 "
                         r"(endpoint|server at) http://127\.0\.0\.1:\d+ (is unreachable|failed)",
                         err, re.M), err[-3000:]
        assert f"continue it with: mbpo run --resume-from {store_url}/runs/outage" in err
        server.restart()       # ... and comes back; the documented resume finishes the run
        assert main(["run", "--resume-from", str(out), "--out", str(out), "--no-tracking",
                     "--no-progress"]) == 0
        # the same run as one without an outage, every shard once
        assert main(["train", "--env", ENV, "--total-steps", "250", "--seed", "5", "--out",
                     str(tmp_path / "train"), "--no-progress", "--no-tracking", "--set",
                     *TINY]) == 0
        got = json.loads((out / "summary.json").read_text())
        want = json.loads((tmp_path / "train" / "summary.json").read_text())
        assert got["curve"] == want["curve"]
        ckpt = run.checkpoint()
        store, key = split_uri(ckpt.artifacts["real_manifest"])
        manifest = ShardManifest.from_json(store.get(key).decode())
        assert [s.rows for s in manifest.shards] == [100, 50, 50, 50]
        stored = sorted(f"{run.url}/{k}" for k in open_store(run.url).list("real/"))
        assert stored == sorted(s.uri for s in manifest.shards)
    finally:
        server.stop()


def _history(client, run_id: str, key: str = "eval/return_mean") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _started_tracked(cmd: list[str], log_file, mlflow_uri: str, experiment: str):
    """Start a tracked `mbpo` command; return it, the client and its MLflow run id once the
    first metrics are in MLflow."""
    from mlflow.tracking import MlflowClient

    with log_file.open("w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                                env=os.environ | {"PYTHONPATH": os.getcwd(),
                                                  "MBPO_TRACKING_RETRY_S": "1"})
    client = MlflowClient(mlflow_uri)

    def first_run():  # noqa: ANN202
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return runs[0] if runs and runs[0].data.metrics else None

    def logging_started() -> bool:
        try:
            return first_run() is not None
        except Exception:
            return False
    _wait(logging_started, "the first metrics in MLflow", proc)
    return proc, client, first_run().info.run_id


def test_mlflow_server_lost_mid_run_training_goes_on_and_loses_no_metrics(tmp_path, live_stack):
    directory, info = live_stack
    out = tmp_path / "train"
    cmd = [sys.executable, "-m", "pipelines.cli", "train", "--env", ENV, "--total-steps",
           "600", "--out", str(out), "--no-progress", "--stack", str(directory),
           "--experiment", "faults", "--registered-model", "faults-policy", "--set", *TINY]
    log_file = tmp_path / "train.log"
    proc, client, run_id = _started_tracked(cmd, log_file, info.mlflow_uri, "faults")
    os.killpg(info.mlflow_pid, signal.SIGKILL)  # the tracking server dies mid-run ...
    pending = out / "tracking-pending"
    _wait(lambda: any(pending.glob("*.jsonl")), "metrics kept while MLflow is down", proc)
    # ... and comes back while training goes on. The trainer is paused while the server starts,
    # so that rounds remain to find it back however slow the start is on a loaded machine (the
    # case of a run ending while the server is still down is the next test's).
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        info = stack.restart_mlflow(directory)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    proc.wait(timeout=600)
    err = log_file.read_text()
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["env_steps"] == 600 and len(summary["curve"]) == 11
    assert err.count("MLflow tracking failed") == 1, "the loss is reported once, clearly"
    assert "tracking server at" in err and "answers again after" in err, err[-3000:]
    assert re.search(r"sent [1-9]\d* tracking records kept while MLflow was down", err), \
        err[-3000:]
    # nothing lost: every round's metrics reached MLflow, the kept ones sent after the restart
    assert _history(client, run_id) == [(int(s), m) for s, m, _ in summary["curve"]], err[-3000:]
    assert len(_history(client, run_id, "sac/critic_loss")) == 11
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not list(pending.glob("*.jsonl"))


def test_metrics_kept_in_the_run_store_reach_mlflow_from_a_later_step_or_mbpo_sync(
        monkeypatch, capsys, caplog, live_stack):
    """The pipeline path: each step is its own process, so what one step could not send is kept
    in the run's S3 store, and a later step (or `mbpo sync` after the run) sends it."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.tracking import MlflowClient

    from mbpo_core.config import make_config
    from mbpo_core.sac import Actor
    from mbpo_core.tracking import PENDING_DIR, Tracker
    from pipelines.s3server import free_port

    directory, info = live_stack
    for k, v in info.env().items():
        monkeypatch.setenv(k, v)
    run_url = "s3://mbpo/store/runs/kept"
    pending = open_store(f"{run_url}/{PENDING_DIR}")
    first = Tracker.create(info.mlflow_uri, make_config(ENV, TINY), experiment="kept",
                           pending=pending)
    first.log_metrics({"eval/return_mean": 1.0}, 100)
    client = MlflowClient(info.mlflow_uri)

    def step(value: float, steps: int, uri: str = info.mlflow_uri, end: bool = False) -> None:
        """What one pipeline step process does: a fresh tracker, one batch of metrics."""
        tracker = Tracker(uri, first.run_id, pending=pending, retry_s=1)
        tracker.log_metrics({"eval/return_mean": value, "sac/alpha": 0.1}, steps)
        if end:
            tracker.finish()

    os.killpg(info.mlflow_pid, signal.SIGKILL)
    step(2.0, 150)                                   # two steps while the server is down
    step(3.0, 200)
    assert len(pending.list()) == 2
    stack.restart_mlflow(directory)
    step(4.0, 250)                                   # the next step sends them, in order
    assert _history(client, first.run_id) == [(100, 1.0), (150, 2.0), (200, 3.0), (250, 4.0)]
    assert pending.list() == []

    # the last step ends while its server is unreachable (a port nothing listens on) ...
    dead = f"http://127.0.0.1:{free_port()}"
    caplog.clear()
    last = Tracker(dead, first.run_id, pending=pending, retry_s=60)
    last.log_metrics({"eval/return_mean": 5.0, "sac/alpha": 0.1}, 300)
    actor = Actor(4, 1, 32, 2, torch.Generator().manual_seed(7))
    assert last.log_policy(actor, -2 * torch.ones(1), 2 * torch.ones(1), "kept-policy") is None
    assert "the final policy is not logged there yet; it is kept in" in caplog.text
    last.finish()
    assert f"send them with `mbpo sync {run_url}`" in caplog.text
    assert client.get_run(first.run_id).info.status == "RUNNING"
    assert sum(k.endswith("-policy.pt") for k in pending.list()) == 1  # its weights, kept
    # ... and `mbpo sync` sends the rest, to the server given (the records name the dead one)
    assert main(["sync", run_url, "--tracking-uri", info.mlflow_uri]) == 0
    assert "sent 3 tracking records" in capsys.readouterr().out  # metrics, policy, run end
    assert _history(client, first.run_id)[-1] == (300, 5.0)
    assert len(_history(client, first.run_id, "sac/alpha")) == 4
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert pending.list() == []
    # the kept policy is logged and registered, and acts like the actor it was kept from
    [version] = client.search_model_versions("name = 'kept-policy'")
    assert version.run_id == first.run_id
    mlflow.set_tracking_uri(info.mlflow_uri)
    model = mlflow.pyfunc.load_model(f"models:/kept-policy/{version.version}")
    obs = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    expected = 2.0 * torch.tanh(actor.dist_params(torch.from_numpy(obs))[0]).detach().numpy()
    assert np.allclose(np.asarray(model.predict(obs)), expected, atol=1e-5)
    assert main(["sync", run_url]) == 0              # nothing left: a no-op
    assert "nothing pending" in capsys.readouterr().out


def test_mlflow_down_across_real_pipeline_steps_then_mbpo_sync_sends_everything(
        tmp_path, live_stack, monkeypatch):
    """`mbpo run` with each step its own process: the server dies mid-run and stays down, every
    later step keeps its records in the run's S3 store, the run still finishes, says here how to
    send them, and `mbpo sync` gives MLflow exactly the curve of summary.json and the policy."""
    import mlflow
    import numpy as np
    import torch

    from mbpo_core.tracking import PENDING_DIR

    directory, info = live_stack
    out, name = tmp_path / "run", "mlflow-down-steps"
    cmd = [sys.executable, "-m", "pipelines.cli", "run", "--env", ENV, "--total-steps", "400",
           "--seed", "3", "--out", str(out), "--no-progress", "--stack", str(directory),
           "--run-name", name, "--experiment", "steps-faults",
           "--registered-model", "steps-faults-policy", "--set", *TINY]
    log_file = tmp_path / "run.log"
    proc, client, run_id = _started_tracked(cmd, log_file, info.mlflow_uri, "steps-faults")
    os.killpg(info.mlflow_pid, signal.SIGKILL)  # the tracking server dies and stays down
    proc.wait(timeout=600)
    err = log_file.read_text()
    assert proc.returncode == 0, err[-3000:]          # training does not wait for MLflow
    run_url = f"{info.env()['MBPO_STORE']}/runs/{name}"
    for k, v in info.env().items():
        monkeypatch.setenv(k, v)
    pending = open_store(f"{run_url}/{PENDING_DIR}")
    kept = [k for k in pending.list() if k.endswith(".jsonl")]
    assert kept, "the steps after the loss kept their records in the run's store"
    assert f"send them with `mbpo sync {run_url}`" in err, err[-3000:]  # said here, not in a log
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["curve"]) == 7
    assert client_down(info.mlflow_uri)
    stack.restart_mlflow(directory)
    assert client.get_run(run_id).info.status == "RUNNING"   # its end is among the kept records
    assert _history(client, run_id) != [(int(st), m) for st, m, _ in summary["curve"]]
    assert main(["sync", run_url]) == 0
    assert _history(client, run_id) == [(int(st), m) for st, m, _ in summary["curve"]]
    assert len(_history(client, run_id, "sac/critic_loss")) == 7
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [k for k in pending.list()] == []
    [version] = client.search_model_versions("name = 'steps-faults-policy'")
    assert version.run_id == run_id
    mlflow.set_tracking_uri(info.mlflow_uri)
    model = mlflow.pyfunc.load_model(f"models:/steps-faults-policy/{version.version}")
    weights = torch.load(out / "policy.pt", weights_only=True)
    obs = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    from mbpo_core.sac import Actor

    actor = Actor(4, 1, 32, 2, torch.Generator())
    actor.load_state_dict(weights)
    expected = 3.0 * torch.tanh(actor.dist_params(torch.from_numpy(obs))[0]).detach().numpy()
    assert np.allclose(np.asarray(model.predict(obs)), expected, atol=1e-5)


def client_down(uri: str) -> bool:
    from mbpo_core.tracking import check_reachable

    try:
        check_reachable(uri, timeout_s=2)
    except Exception:
        return True
    return False


_WRITER = """
import os, sys
from mbpo_core.storage import open_store
data = os.urandom(int(sys.argv[2]) * 2**20)
print("ready", flush=True)
open_store(sys.argv[1]).put("big.npz", data)
"""


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_writer_killed_mid_write_leaves_no_visible_object(kind, tmp_path, s3_env):
    """Readers see a whole object or none: local writes go to a hidden temporary file that is
    renamed, S3 uploads appear only when complete (multipart: at CompleteMultipartUpload)."""
    url = str(tmp_path / "store") if kind == "local" else f"s3://{s3_env}/store"
    store = open_store(url)
    if kind == "s3":
        client, bucket = store.client, s3_env

        def writing() -> bool:
            return bool(client.list_multipart_uploads(Bucket=bucket).get("Uploads"))
    else:
        def writing() -> bool:
            return any(p.name.endswith(".part") for p in (tmp_path / "store").rglob("*"))
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, url, "256"], stdout=subprocess.PIPE,
                            text=True, env=os.environ | {"PYTHONPATH": os.getcwd()})
    assert proc.stdout.readline().strip() == "ready"
    _wait(writing, "the write to start", proc, timeout_s=60)
    proc.kill()                                    # SIGKILL in the middle of the write
    proc.wait()
    assert not store.exists("big.npz")
    assert store.list() == [], "no partial object is visible to readers"
