"""The warm step server runs a step exactly as the task's own process would, failures included."""

import json
from types import SimpleNamespace

import pytest

from components.worker import SERVER_ENV, StepFailed, StepServer, run_step


def _artifact(path):
    return SimpleNamespace(path=str(path), uri=str(path))


def test_step_server_runs_steps_and_reports_failures(tmp_path, monkeypatch):
    monkeypatch.delenv(SERVER_ENV, raising=False)
    args = dict(env="Hopper-v5", seed=4, overrides=["sac.hidden_size=64"], total_steps=1000)
    run_step("init_run", run_url=str(tmp_path / "here"), config=_artifact(tmp_path / "a"), **args)
    with StepServer() as server:
        import os
        assert os.environ[SERVER_ENV] == server.address
        run_step("init_run", run_url=str(tmp_path / "there"), config=_artifact(tmp_path / "b"),
                 **args)
        with pytest.raises(StepFailed, match=r"sac.gamma = 2.0 is out of range"):
            run_step("init_run", run_url=str(tmp_path / "bad"), config=_artifact(tmp_path / "c"),
                     **(args | {"overrides": ["sac.gamma=2"]}))
        # the server survives a failed step
        run_step("init_run", run_url=str(tmp_path / "again"), config=_artifact(tmp_path / "d"),
                 **args)
    assert SERVER_ENV not in os.environ
    here = json.loads((tmp_path / "a").read_text())
    assert json.loads((tmp_path / "b").read_text()) == here == json.loads((tmp_path / "d").read_text())
    assert here["seed"] == 4 and here["sac"]["hidden_size"] == 64
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
@pytest.mark.parametrize("warm", [True, False])
def test_a_killed_driver_leaves_no_step_running(tmp_path, warm):
    """SIGKILL of `mbpo run` alone (as the OOM killer does): its task process, and the warm
    worker's child running the step, end within seconds instead of writing on into the store
    while a resumed run redoes the same step."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from benchmarks.faults import session_members as _session
    from mbpo_core.runstore import RunStore
    from tests.conftest import TINY

    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "pipelines.cli", "run", "--env", "InvertedPendulum-v5",
           "--total-steps", "200", "--out", str(tmp_path / "out"), "--store", str(store),
           "--run-name", "orphans", "--no-progress", "--no-tracking", "--set", *TINY,
           "sac.updates_per_step=400"] + ([] if warm else ["--no-warm-workers"])
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True, env=os.environ | {"PYTHONPATH": os.getcwd()})
    run = RunStore(f"file://{store}/runs/orphans")
    deadline = time.monotonic() + 300
    while not run.store.exists("rounds/000000/imagine.json"):  # a long update_sac is next
        assert driver.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    assert len(_session(driver.pid)) > 1, "a step should be running beside the driver"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 4  # the step itself would run for tens of seconds more
    while (left := _session(driver.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, [open(f"/proc/{p}/cmdline").read().replace("\0", " ")[:120] for p in left]
