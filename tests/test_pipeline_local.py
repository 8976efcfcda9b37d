"""The pipeline end to end under kfp.local: same numbers as `mbpo train`, S3 storage, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mbpo_core.runstore import RunStore
from mbpo_core.shards import ShardManifest
from mbpo_core.storage import open_store, split_uri
from pipelines.cli import main
from pipelines.compare import local_curve
from tests.conftest import TINY

pytestmark = pytest.mark.slow
ENV = "InvertedPendulum-v5"


def _train(tmp_path: Path, steps: int, seed: int, extra: tuple[str, ...] = ()) -> dict:
    out = tmp_path / "train"
    assert main(["train", "--env", ENV, "--total-steps", str(steps), "--seed", str(seed), "--out",
                 str(out), "--no-progress", "--set", *TINY, *extra]) == 0
    return json.loads((out / "summary.json").read_text()) | {"out": out}


def _assert_same_run(pipeline_out: Path, train: dict) -> None:
    summary = json.loads((pipeline_out / "summary.json").read_text())
    assert summary["curve"] == train["curve"]
    assert summary["env_steps"] == train["env_steps"]
    a = torch.load(pipeline_out / "policy.pt", weights_only=True)
    b = torch.load(train["out"] / "policy.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _final_real_manifest(run_url: str) -> ShardManifest:
    run = RunStore(run_url)
    ckpt = run.checkpoint()
    store, key = split_uri(ckpt.artifacts["real_manifest"])
    return ShardManifest.from_json(store.get(key).decode())


def test_pipeline_on_s3_equals_in_process_training(tmp_path, s3_env):
    """Two rounds as a chain of two pipeline runs (1 + 1 rounds), replay data on SeaweedFS, every
    step in its own cold process as in a cluster pod (longer chains run on warm workers in the
    resume and divergence tests: the results are the same either way)."""
    out = tmp_path / "pipeline"
    store_url = f"s3://{s3_env}/mbpo"
    rc = main(["run", "--env", ENV, "--total-steps", "150", "--seed", "1", "--out", str(out),
               "--store", store_url, "--run-name", "eq", "--rounds-per-run", "1", "--no-warm-workers",
               "--set", *TINY])
    assert rc == 0
    _assert_same_run(out, _train(tmp_path, 150, 1))

    run_url = f"{store_url}/runs/eq"
    assert all(s.uri.startswith(f"{run_url}/real/") for s in _final_real_manifest(run_url).shards)
    assert_every_shard_once(run_url, [100, 50])
    assert RunStore(run_url).complete_rounds() == [0, 1]
    assert open_store(run_url).exists("policy.pt")
    # the first pipeline run's artifacts were pruned once the second had taken over
    assert len([p for p in (out / "kfp-root").iterdir() if not p.name.startswith(".")]) == 1


def test_pipeline_in_bf16_equals_in_process_training_in_bf16(tmp_path):
    """The precision setting changes the numbers, never the agreement of `run` and `train`."""
    bf16 = ("sac.precision=bf16", "ensemble.precision=bf16")
    out = tmp_path / "pipeline"
    assert main(["run", "--env", ENV, "--total-steps", "200", "--seed", "2", "--out", str(out),
                 "--store", str(tmp_path / "store"), "--rounds-per-run", "2", "--no-progress",
                 "--no-tracking", "--set", *TINY, *bf16]) == 0
    train = _train(tmp_path, 200, 2, bf16)
    _assert_same_run(out, train)
    fp32 = torch.load(_train(tmp_path / "fp32", 200, 2)["out"] / "policy.pt", weights_only=True)
    low = torch.load(train["out"] / "policy.pt", weights_only=True)
    from mbpo_core.precision import bf16_matmul_supported

    if bf16_matmul_supported("cpu"):  # else bf16 falls back to fp32, and the runs are equal
        assert any(not torch.equal(fp32[k], low[k]) for k in fp32), "bf16 changed nothing"


def test_resume_after_a_killed_run_loses_and_duplicates_nothing(tmp_path):
    out, store = tmp_path / "pipeline", tmp_path / "store"
    cmd = [sys.executable, "-m", "pipelines.cli", "run", "--env", ENV, "--total-steps", "250",
           "--seed", "2", "--out", str(out), "--store", str(store), "--run-name", "r",
           "--set", *TINY]
    run_url = open_store(store).uri("runs/r")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=os.environ | {"PYTHONPATH": os.getcwd()})
    done_marker = store / "runs" / "r" / "rounds" / "000001" / "evaluate.json"
    deadline = time.monotonic() + 300
    while not done_marker.exists():
        assert proc.poll() is None, "the run ended before it could be stopped"
        assert time.monotonic() < deadline, "round 1 did not complete in time"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and whatever step is running
    proc.wait()
    assert RunStore(run_url).complete_rounds() in ([0, 1], [0, 1, 2])
    assert not (out / "summary.json").exists()
    # `mbpo compare` draws a stopped run from its --out folder: the rounds it has done
    label, partial = local_curve(out)
    assert label == f"pipeline ({ENV}, seed 2)"
    assert partial == [(int(s), m) for s, m, _ in RunStore(run_url).curve()] and len(partial) >= 2
    assert main(["compare", str(out), "-o", str(tmp_path / "partial.png")]) == 0
    assert (tmp_path / "partial.png").stat().st_size > 0

    assert main(["run", "--resume-from", str(out), "--out", str(out)]) == 0
    train = _train(tmp_path, 250, 2)
    _assert_same_run(out, train)
    assert_every_shard_once(run_url, [100, 50, 50, 50])
    assert local_curve(out)[1] == local_curve(train["out"])[1]
    assert local_curve(out)[1][:len(partial)] == partial


def assert_every_shard_once(run_url: str, rows: list[int]) -> None:
    """Each round's data stored once, however often a round was rerun: the bucket holds exactly
    the final manifest's real shards (``rows`` transitions each), and one model shard per round
    (keys are content-addressed: <round>-<sha>.npz)."""
    manifest = _final_real_manifest(run_url)
    assert [s.rows for s in manifest.shards] == rows
    store = open_store(run_url)
    assert sorted(f"{run_url}/{k}" for k in store.list("real/")) == sorted(s.uri for s in manifest.shards)
    rounds = sorted(k.split("/")[-1].split("-")[0] for k in store.list("model/"))
    assert rounds == [f"{r:06d}" for r in range(len(rows))]


def test_run_refuses_to_overwrite_a_started_run(tmp_path, capsys):
    store = tmp_path / "store"
    RunStore(open_store(store).uri("runs/x")).store.put("run.json", b"{}")
    rc = main(["run", "--env", ENV, "--total-steps", "200", "--out", str(tmp_path / "o"),
               "--store", str(store), "--run-name", "x"])
    assert rc == 2
    assert "already exists" in capsys.readouterr().err
