"""The image, built in a real Docker engine, and the pipeline's steps run in its containers
(`mbpo run --runner docker`): equal to `mbpo train` bit for bit, on SeaweedFS and on a local
store, after a container killed mid-step, and tracked into one MLflow run on the local stack."""

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mbpo_core.runstore import RunStore
from mbpo_core.storage import open_store
from pipelines.cli import main
from pipelines.docker_runner import RUN_LABEL, local_code_fingerprint
from tests.conftest import SECRETS_AT_BUILD, TINY
from tests.test_pipeline_local import _assert_same_run, _train, assert_every_shard_once

pytestmark = pytest.mark.slow
ENV = "InvertedPendulum-v5"
MAX_IMAGE_BYTES = 2.0e9


def _docker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=300)


def _run_docker(image: str, out: Path, *args: str) -> int:
    return main(["run", "--runner", "docker", "--image", image, "--env", ENV, "--out", str(out),
                 "--no-progress", *args, "--set", *TINY])


def test_image_runs_as_non_root_holds_no_credential_and_this_checkout(mbpo_image, s3_server):
    inspect = _docker("image", "inspect", mbpo_image)
    assert inspect.returncode == 0, inspect.stderr
    attrs = json.loads(inspect.stdout)[0]
    assert attrs["Config"]["User"] == "10001"
    assert _docker("run", "--rm", mbpo_image, "id", "-u").stdout.strip() == "10001"
    # no secret of the build's environment (or of the test servers) in any layer's history or
    # in the image's settings, and no credential variable at all
    history = _docker("history", "--no-trunc", mbpo_image).stdout
    everything = history + inspect.stdout
    for value in [*SECRETS_AT_BUILD.values(), s3_server.secret_key, s3_server.access_key]:
        assert value not in everything
    env_names = {e.split("=", 1)[0] for e in attrs["Config"]["Env"]}
    assert not env_names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD",
                            "MLFLOW_TRACKING_TOKEN", "KFP_TOKEN"}
    check = _docker("run", "--rm", mbpo_image, "pip", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    size = attrs["Size"]
    print(f"\nimage size {size / 1e9:.2f} GB", file=sys.stderr)
    assert size <= MAX_IMAGE_BYTES, f"{size / 1e9:.2f} GB > {MAX_IMAGE_BYTES / 1e9:.1f} GB"
    # the image holds exactly this checkout's package code
    probe = _docker("run", "--rm", mbpo_image, "python", "-c",
                    "from pipelines.docker_runner import RUN_LABEL, local_code_fingerprint as f; print(f())")
    assert probe.stdout.strip() == local_code_fingerprint(), probe.stderr
    # MuJoCo renders off-screen in it (the evaluation video)
    render = _docker("run", "--rm", mbpo_image, "python", "-c", (
        "import gymnasium as gym; env = gym.make('InvertedPendulum-v5', render_mode='rgb_array', "
        "width=64, height=48); env.reset(seed=0); f = env.render(); "
        "print(f.shape, float(f.std()) > 0)"))
    assert render.stdout.strip() == "(48, 64, 3) True", render.stderr


def test_docker_run_on_the_stack_equals_train_and_logs_one_mlflow_run(
        mbpo_image, live_stack, tmp_path, monkeypatch):
    """SeaweedFS store and MLflow server of `mbpo stack`, on loopback, reached from containers
    through the host network; credentials only in the containers' environment."""
    from mlflow.tracking import MlflowClient

    directory, info = live_stack
    for key in info.env():  # --stack sets them in this process: restore them afterwards
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    out = tmp_path / "docker"
    rc = _run_docker(mbpo_image, out, "--total-steps", "150", "--seed", "5", "--stack",
                     str(directory), "--run-name", "docker-stack", "--rounds-per-run", "1",
                     "--experiment", "mbpo-docker")
    assert rc == 0, (out / "pipeline.log").read_text()[-3000:]
    _assert_same_run(out, _train(tmp_path, 150, 5))
    run_url = f"{info.env()['MBPO_STORE']}/runs/docker-stack"
    assert RunStore(run_url).complete_rounds() == [0, 1]
    assert_every_shard_once(run_url, [100, 50])

    client = MlflowClient(info.mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("mbpo-docker").experiment_id])
    assert len(runs) == 1, "the containers of two chained pipeline runs share one MLflow run"
    history = client.get_metric_history(runs[0].info.run_id, "eval/return_mean")
    summary = json.loads((out / "summary.json").read_text())
    assert sorted([m.step, m.value] for m in history) == [[s, r] for s, r, _ in summary["curve"]]
    assert runs[0].info.status == "FINISHED"
    log_text = (out / "pipeline.log").read_text()
    assert log_text.count("step container ") >= 2 * 5  # every step of both rounds ran in one
    assert info.secret_key not in log_text
    assert info.secret_key not in json.dumps(runs[0].data.params | runs[0].data.tags)


def test_docker_run_on_a_local_store_equals_train(mbpo_image, tmp_path):
    out, store = tmp_path / "docker", tmp_path / "store"
    rc = _run_docker(mbpo_image, out, "--total-steps", "150", "--seed", "6", "--store", str(store),
                     "--run-name", "local", "--no-tracking")
    assert rc == 0, (out / "pipeline.log").read_text()[-3000:]
    _assert_same_run(out, _train(tmp_path, 150, 6))
    assert_every_shard_once(open_store(store).uri("runs/local"), [100, 50])


def test_container_killed_mid_step_then_resume_equals_train(mbpo_image, s3_env, tmp_path):
    out = tmp_path / "docker"
    store_url = f"s3://{s3_env}/mbpo"
    run_url = f"{store_url}/runs/killed"
    cmd = [sys.executable, "-m", "pipelines.cli", "run", "--runner", "docker", "--image",
           mbpo_image, "--env", ENV, "--total-steps", "200", "--seed", "7", "--out", str(out),
           "--store", store_url, "--run-name", "killed", "--no-tracking", "--no-progress",
           "--set", *TINY]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONPATH": os.getcwd()})
    import docker

    client = docker.from_env()
    deadline = time.monotonic() + 300
    killed = None
    while killed is None:  # a SAC update after round 0, in its container's first second
        assert proc.poll() is None, f"the run ended before a step could be killed:\n{proc.stderr.read()}"
        assert time.monotonic() < deadline, "no update_sac after round 0 started in time"
        if RunStore(run_url).complete_rounds():
            for c in client.containers.list(filters={"label": f"{RUN_LABEL}={run_url}"}):
                if "/update-sac" in " ".join(c.attrs["Config"]["Cmd"]):
                    time.sleep(0.3)
                    with contextlib.suppress(docker.errors.NotFound):  # ended already: the next
                        c.kill()
                        killed = c.name
        time.sleep(0.05)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 1, "a run whose step was killed must not end as done"
    assert "update-sac" in err and "--resume-from" in err, err[-2000:]
    assert RunStore(run_url).complete_rounds() in ([0], [0, 1])
    assert not (out / "summary.json").exists()

    assert main(["run", "--resume-from", str(out), "--out", str(out), "--runner", "docker",
                 "--image", mbpo_image, "--no-progress", "--no-tracking"]) == 0
    _assert_same_run(out, _train(tmp_path, 200, 7))
    assert_every_shard_once(run_url, [100, 50, 50])


def test_docker_runner_fails_early_and_clearly(mbpo_image, s3_server, tmp_path, capsys, monkeypatch):
    def run(*args: str) -> str:
        out = tmp_path / "o"
        rc = main(["run", "--runner", "docker", "--env", ENV, "--total-steps", "150", "--out",
                   str(out), "--store", str(tmp_path / "store"), *args])
        assert rc == 1
        assert not (out / "summary.json").exists()
        return capsys.readouterr().err

    assert "not present in the local Docker engine" in run("--image", "mbpo-absent:0.0",
                                                           "--no-tracking")
    # an image without this package: the base the project image was built on
    base = next(ref for ref in ("python:3.11.7-slim-bookworm", "mbpo-base:bookworm-py3.11")
                if _docker("image", "inspect", ref).returncode == 0)
    assert "does not hold the mbpo package" in run("--image", base, "--no-tracking")
    # a file tracking store cannot be shared with containers
    err = run("--image", mbpo_image, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db")
    assert "containers log to an MLflow server" in err


def test_docker_probe_finds_a_server_the_containers_cannot_reach(mbpo_image, tmp_path):
    """The check a container makes before the first task (here no server listens on the port;
    with host networking, that is the one way a loopback server is out of a container's reach)."""
    from pipelines.docker_runner import DockerSetup, DockerSetupError
    from pipelines.s3server import free_port

    port = free_port()
    setup = DockerSetup(mbpo_image, str(tmp_path / "store" / "runs" / "x"),
                        f"http://127.0.0.1:{port}", tmp_path / "kfp-root")
    with pytest.raises(DockerSetupError, match=f"127.0.0.1:{port} cannot be reached from a container"):
        setup.check()
