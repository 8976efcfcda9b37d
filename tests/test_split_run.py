"""A run split across save/load (a pipeline step boundary) equals an unsplit run, bit for bit."""

import pytest
import torch

from mbpo_core.config import make_config
from mbpo_core.state import load_state, save_state
from mbpo_core.trainer import MBPOTrainer


def _policy_equal(a: MBPOTrainer, b: MBPOTrainer) -> bool:
    sa, sb = a.agent.actor.state_dict(), b.agent.actor.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_split_run_equals_unsplit(tmp_path, tiny_overrides, precision):
    cfg = make_config("Hopper-v5", tiny_overrides + [f"sac.precision={precision}",
                                                     f"ensemble.precision={precision}"], seed=3)
    whole = MBPOTrainer(cfg)
    whole.train(200, progress=False)  # 100 random + 2 rounds of 50

    first = MBPOTrainer(cfg)
    first.train(150, progress=False)
    save_state(first.state_dict(), tmp_path / "state.pt")
    del first
    second = MBPOTrainer.from_state_dict(load_state(tmp_path / "state.pt"))
    second.train(200, progress=False)

    assert second.env_steps == whole.env_steps == 200
    assert second.curve == whole.curve
    assert _policy_equal(second, whole)
    w, s = whole.state_dict(), second.state_dict()
    assert torch.equal(w["real"]["rows"], s["real"]["rows"])
    assert torch.equal(w["model_data"]["rows"], s["model_data"]["rows"])
    assert torch.equal(w["collector"]["obs"], s["collector"]["obs"])
    for k, v in w["dynamics"]["model"].items():
        assert torch.equal(v, s["dynamics"]["model"][k]), k


def test_different_seeds_differ(tiny_overrides):
    a = MBPOTrainer(make_config("Hopper-v5", tiny_overrides, seed=0))
    b = MBPOTrainer(make_config("Hopper-v5", tiny_overrides, seed=1))
    a.train(150, progress=False)
    b.train(150, progress=False)
    assert not _policy_equal(a, b)
