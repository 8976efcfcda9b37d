"""Termination functions agree with the v5 envs' own ``terminated`` on real trajectories."""

import numpy as np
import pytest
import torch

from mbpo_core.envs import ENV_SPECS, SUPPORTED_ENVS, make_env
from mbpo_core.termination import termination_fn

# Enough random-policy steps for many terminations (Ant terminates rarely: more steps).
STEPS = {"Ant-v5": 6000, "HalfCheetah-v5": 1500}


def _trajectories(env_id: str, steps: int, seed: int = 0):
    env = make_env(env_id, seed)
    obs, _ = env.reset()
    rows, terms = [], []
    for _ in range(steps):
        act = env.action_space.sample()
        next_obs, _, terminated, truncated, _ = env.step(act)
        rows.append((obs, act, next_obs))
        terms.append(terminated)
        obs = next_obs
        if terminated or truncated:
            obs, _ = env.reset()
    o, a, n = (torch.as_tensor(np.array(x)) for x in zip(*rows))
    return o, a, n, np.array(terms)


@pytest.mark.parametrize("env_id", SUPPORTED_ENVS)
def test_termination_matches_env(env_id):
    obs, act, next_obs, terminated = _trajectories(env_id, STEPS.get(env_id, 3000))
    assert obs.shape[1] == ENV_SPECS[env_id].obs_dim
    predicted = termination_fn(env_id)(obs, act, next_obs).numpy()
    assert predicted.dtype == bool and predicted.shape == terminated.shape
    if env_id == "HalfCheetah-v5":
        assert not terminated.any() and not predicted.any()
        return
    assert terminated.sum() >= 5, "the trajectories must contain terminations to test"
    mismatches = int((predicted != terminated).sum())
    if env_id == "InvertedDoublePendulum-v5":
        # The env reads the tip height from MuJoCo's last RK4 stage, which the observation
        # cannot reproduce exactly (|error| ~1e-6 typical): allow a rare flip at the boundary.
        assert mismatches <= len(terminated) // 1000
    else:
        assert mismatches == 0


def test_termination_float32_model_outputs():
    """Rollouts run in float32; the functions accept it and treat non-finite states as done."""
    obs = torch.zeros(3, 27)
    nxt = torch.tensor([[0.5] + [0.0] * 26, [0.1] + [0.0] * 26, [0.5, float("nan")] + [0.0] * 25])
    done = termination_fn("Ant-v5")(obs, torch.zeros(3, 8), nxt)
    assert done.tolist() == [False, True, True]


def test_unknown_env_is_refused():
    with pytest.raises(ValueError, match="Pendulum-v1"):
        termination_fn("Pendulum-v1")


def test_the_time_limit_is_never_stored_as_done():
    """An episode cut by the time limit is truncated, not terminated: its last transition keeps
    done = 0, so its value is bootstrapped (HalfCheetah never terminates on its own)."""
    from mbpo_core.config import make_config
    from mbpo_core.steps import Collector, collect

    cfg = make_config("HalfCheetah-v5", ["max_episode_steps=20"], seed=0)
    collector = Collector(cfg)
    res = collect(collector, None, 100)
    assert [length for _, length in res.episodes] == [20] * 5  # five episodes, each cut at 20
    obs_dim = collector.obs.shape[0]
    done = res.rows[:, -1]
    assert torch.count_nonzero(done) == 0
    # ... and the next episode starts afresh: after each cut, obs is not the last next_obs
    obs, next_obs = res.rows[:, :obs_dim], res.rows[:, -1 - obs_dim:-1]
    for cut in (19, 39, 59, 79):
        assert not torch.equal(obs[cut + 1], next_obs[cut])
        assert torch.equal(obs[cut], next_obs[cut - 1])
