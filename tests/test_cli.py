"""The ``mbpo`` command: a tiny end-to-end train run, resume, and early config errors."""

import json

import torch

from mbpo_core.sac import Actor
from pipelines.cli import main
from tests.conftest import TINY


def test_train_writes_summary_and_policy(tmp_path):
    out = tmp_path / "run"
    rc = main(["train", "--env", "InvertedPendulum-v5", "--total-steps", "200", "--seed", "1",
               "--out", str(out), "--no-progress", "--save-state", "--set", *TINY])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["env"] == "InvertedPendulum-v5" and summary["seed"] == 1
    assert summary["env_steps"] == 200
    assert [p[0] for p in summary["curve"]] == [100, 150, 200]
    assert summary["eval_return"] == summary["curve"][-1][1]
    actor = Actor(4, 1, 32, 2, torch.Generator())
    actor.load_state_dict(torch.load(out / "policy.pt", weights_only=True))

    # resuming from the saved state continues the same run
    rc = main(["train", "--env", "InvertedPendulum-v5", "--total-steps", "250", "--out",
               str(tmp_path / "more"), "--no-progress", "--resume-from", str(out / "state.pt")])
    assert rc == 0
    more = json.loads((tmp_path / "more" / "summary.json").read_text())
    assert more["curve"][:3] == summary["curve"] and more["env_steps"] == 250


def test_bad_override_fails_before_running(tmp_path, capsys):
    rc = main(["train", "--env", "Hopper-v5", "--total-steps", "10", "--out", str(tmp_path / "x"),
               "--set", "sac.real_ratio=1.5"])
    assert rc == 2
    assert "sac.real_ratio = 1.5 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
