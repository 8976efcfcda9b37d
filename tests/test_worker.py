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
