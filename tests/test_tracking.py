"""MLflow tracking against real servers: `mbpo stack` (SeaweedFS + mlflow server) started here."""

import json
import os

import numpy as np
import pytest
import torch

from mbpo_core.config import make_config
from mbpo_core.sac import Actor
from mbpo_core.tracking import METRIC_NAMES
from pipelines import stack
from pipelines.cli import main
from tests.conftest import TINY

pytestmark = pytest.mark.slow
ENV = "InvertedPendulum-v5"
STEP_NAMES = ("collect", "fit_ensemble", "imagine", "update_sac", "evaluate")


@pytest.fixture
def stack_env(live_stack, monkeypatch):
    """Tests read back with plain clients; the CLI itself is pointed at the stack by --stack."""
    directory, info = live_stack
    for key in info.env():  # set-then-delete so that monkeypatch restores them afterwards
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    return directory, info


@pytest.fixture(scope="module")
def tracked(mbpo_stack, tmp_path_factory):
    """One tracked pipeline run on the stack (two chained pipeline runs), which the tests below
    read, in any order or alone."""
    from mlflow.tracking import MlflowClient

    from pipelines import stack as stack_mod

    if not stack_mod.status(mbpo_stack)["mlflow"]:  # a fault test may have killed it
        stack_mod.restart_mlflow(mbpo_stack)
    info = stack_mod.load(mbpo_stack)
    out = tmp_path_factory.mktemp("tracked") / "run"
    saved = {k: os.environ.get(k) for k in info.env()}  # --stack sets them in this process
    try:
        rc = main(["run", "--env", ENV, "--total-steps", "200", "--seed", "3", "--out", str(out),
                   "--stack", str(mbpo_stack), "--run-name", "tracked", "--rounds-per-run", "2",
                   "--experiment", "mbpo-test", "--no-progress", "--set", *TINY])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert rc == 0
    client = MlflowClient(info.mlflow_uri)
    exp = client.get_experiment_by_name("mbpo-test")
    return {"out": out, "experiment_id": exp.experiment_id,
            "runs": client.search_runs([exp.experiment_id])}


def test_pipeline_run_is_tracked_in_mlflow_with_artifacts_on_s3(tmp_path, stack_env, tracked):
    import mlflow
    from mlflow.tracking import MlflowClient

    directory, info = stack_env
    out = tracked["out"]
    client = MlflowClient(info.mlflow_uri)
    runs = tracked["runs"]
    assert len(runs) == 1, "two chained pipeline runs must share one MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    # every metric name, with step = env steps
    names = set(run.data.metrics)
    assert set(METRIC_NAMES) <= names, set(METRIC_NAMES) - names
    assert {f"time/{s}_s" for s in STEP_NAMES} <= names
    history = client.get_metric_history(run.info.run_id, "eval/return_mean")
    assert sorted(m.step for m in history) == [100, 150, 200]
    summary = json.loads((out / "summary.json").read_text())
    assert [[m.step, m.value] for m in sorted(history, key=lambda m: m.step)] == \
        [[s, r] for s, r, _ in summary["curve"]]
    # the full resolved config as params, and the tags
    assert run.data.params["sac.hidden_size"] == "32" and run.data.params["env"] == ENV
    flat = make_config(ENV, TINY, seed=3).flat()
    assert run.data.params == {k: str(v) for k, v in flat.items()}
    tags = run.data.tags
    assert tags["task"] == ENV and tags["seed"] == "3" and tags["code_version"]
    # the S3 secret the steps ran with is in no log, param or tag
    assert info.secret_key not in (out / "pipeline.log").read_text()
    assert info.secret_key not in json.dumps(run.data.params) + json.dumps(tags)
    assert tags["kfp.pipeline_run_id"] and tags["image"]
    # artifacts, stored by the tracking server in the SeaweedFS bucket
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.json",
                                                                        "learning_curve.png"}
    import boto3

    keys = [o["Key"] for o in boto3.client(
        "s3", endpoint_url=info.s3_endpoint, aws_access_key_id=info.access_key,
        aws_secret_access_key=info.secret_key, region_name="us-east-1"
    ).list_objects_v2(Bucket=stack.ARTIFACT_BUCKET)["Contents"]]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/learning_curve.png") for k in keys)
    assert any(k.endswith("data/model.pt2") for k in keys)

    # the registered model loads back (no pickle: torch.export format) and acts like policy.pt
    [version] = [v for v in client.search_model_versions(f"name = 'mbpo-{ENV}'")
                 if v.run_id == run.info.run_id]  # the session's stack may hold other versions
    mlflow.set_tracking_uri(info.mlflow_uri)
    model = mlflow.pyfunc.load_model(f"models:/mbpo-{ENV}/{version.version}")
    obs = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    actions = np.asarray(model.predict(obs))
    actor = Actor(4, 1, 32, 2, torch.Generator())
    actor.load_state_dict(torch.load(out / "policy.pt", weights_only=True))
    expected = 3.0 * torch.tanh(actor.dist_params(torch.from_numpy(obs))[0]).detach().numpy()
    assert actions.shape == (8, 1)
    assert np.allclose(actions, expected, atol=1e-5)
    assert np.all(np.abs(actions) <= 3.0)

    # mbpo runs / mbpo compare read it back
    assert main(["runs", "--stack", str(directory), "--experiment", "mbpo-test"]) == 0
    png = tmp_path / "curves.png"
    assert main(["compare", "tracked", "--stack", str(directory), "--experiment", "mbpo-test",
                 "-o", str(png)]) == 0
    assert png.stat().st_size > 10_000


def test_wrong_s3_credentials_fail_clearly_and_early(tmp_path, stack_env, monkeypatch, capsys):
    directory, info = stack_env
    monkeypatch.setenv("MBPO_S3_ENDPOINT_URL", info.s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", info.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    rc = main(["run", "--env", ENV, "--total-steps", "200", "--out", str(tmp_path / "o"),
               "--store", f"s3://{stack.STORE_BUCKET}/store", "--no-tracking", "--set", *TINY])
    assert rc == 3
    assert "refused the credentials" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_stack_status_and_env(stack_env, capsys):
    directory, info = stack_env
    assert main(["stack", "status", "--dir", str(directory)]) == 0
    assert main(["stack", "env", "--dir", str(directory)]) == 0
    out = capsys.readouterr().out
    assert f"export MLFLOW_TRACKING_URI={info.mlflow_uri}" in out
    assert (directory / "stack.json").stat().st_mode & 0o077 == 0, "the stack file holds a secret"


def test_mlflow_ui_shows_the_run_and_its_metric_chart(stack_env, tracked):
    """Headless Chromium renders the run's metrics page; the screenshot is kept as an artifact."""
    import shutil
    import subprocess
    from pathlib import Path

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is needed: `make test` installs it (scripts/test-deps.sh)"
    _, info = stack_env
    url = (f"{info.mlflow_uri}/#/experiments/{tracked['experiment_id']}/runs/"
           f"{tracked['runs'][0].info.run_id}/model-metrics")
    flags = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--window-size=1400,1000",
             "--run-all-compositor-stages-before-draw", "--virtual-time-budget=60000"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=180).stdout
    assert "tracked" in dom, "the run's name is not on its page"
    assert "return_mean" in dom, "the eval/return_mean chart is not on the metrics page"
    assert "js-plotly-plot" in dom, "no rendered chart on the metrics page"
    out = Path(os.environ.get("MBPO_TEST_ARTIFACTS", "test-artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    shot = out / "mlflow-ui-run-metrics.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=180)
    assert shot.is_file() and shot.stat().st_size > 20_000


def test_seeds_run_as_children_of_one_parent_run(tmp_path, stack_env):
    from mlflow.tracking import MlflowClient

    directory, info = stack_env
    out = tmp_path / "seeds"
    rc = main(["run", "--env", ENV, "--total-steps", "150", "--seeds", "4", "5", "--parallel", "2",
               "--out", str(out), "--stack", str(directory), "--run-name", "group",
               "--experiment", "mbpo-seeds", "--registered-model", "", "--set", *TINY])
    assert rc == 0
    client = MlflowClient(info.mlflow_uri)
    exp = client.get_experiment_by_name("mbpo-seeds")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"group", "group-s4", "group-s5"}
    parent = runs["group"]
    for name in ("group-s4", "group-s5"):
        assert runs[name].data.tags["mlflow.parentRunId"] == parent.info.run_id
    summary = json.loads((out / "summary.json").read_text())
    finals = [s["curve"][-1][1] for s in summary["runs"]]
    assert summary["curve"][-1][1] == pytest.approx(sum(finals) / 2)
    assert parent.data.metrics["eval/return_mean"] == pytest.approx(sum(finals) / 2)
    assert {runs["group-s4"].data.tags["seed"], runs["group-s5"].data.tags["seed"]} == {"4", "5"}


def test_unreachable_tracking_server_fails_before_training(tmp_path, capsys):
    from pipelines.s3server import free_port

    out = tmp_path / "o"
    rc = main(["train", "--env", ENV, "--total-steps", "150", "--out", str(out), "--no-progress",
               "--tracking-uri", f"http://127.0.0.1:{free_port()}", "--set", *TINY])
    assert rc == 1
    assert "does not answer" in capsys.readouterr().err
    assert not (out / "summary.json").exists()
