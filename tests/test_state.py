"""Exact save/load of every state a step hands on; only safe loaders are used."""

import pickle

import numpy as np
import pytest
import torch

from mbpo_core.buffer import ReplayBuffer
from mbpo_core.config import make_config
from mbpo_core.envs import get_env_state, make_env, set_env_state
from mbpo_core.state import StateError, load_state, save_state
from mbpo_core.steps import Agent, Collector, Dynamics, collect, fit_ensemble, update_sac


def _round_trip(state, tmp_path, name="s.pt"):
    save_state(state, tmp_path / name)
    return load_state(tmp_path / name)


def _play(env, actions):
    """Outcomes of ``actions``, resetting on episode ends (so reset noise is compared too)."""
    out = []
    for a in actions:
        obs, r, term, trunc, _ = env.step(a)
        out.append((obs.tolist(), r, term, trunc))
        if term or trunc:
            out.append(env.reset()[0].tolist())
    return out


def test_env_state_continues_episode_exactly(tmp_path):
    env = make_env("Hopper-v5", 0)
    env.reset()
    for _ in range(7):
        env.step(env.action_space.sample())
    saved = _round_trip(get_env_state(env), tmp_path)
    actions = [env.action_space.sample() for _ in range(30)]
    expected = _play(env, actions)
    other = make_env("Hopper-v5", 123)  # different seed: everything must come from the state
    set_env_state(other, saved)
    got = _play(other, actions)
    assert any(len(e) != 4 for e in expected), "the actions must end an episode"
    assert got == expected


def test_time_limit_counter_is_restored(tmp_path):
    env = make_env("InvertedPendulum-v5", 0, max_episode_steps=10)
    env.reset()
    for _ in range(6):
        env.step(np.zeros(1))
    other = make_env("InvertedPendulum-v5", 0, max_episode_steps=10)
    set_env_state(other, _round_trip(get_env_state(env), tmp_path))
    truncs = [other.step(np.zeros(1))[3] for _ in range(4)]
    assert truncs == [False, False, False, True]


def test_collector_dynamics_agent_round_trip(tmp_path, tiny_overrides):
    cfg = make_config("Hopper-v5", tiny_overrides, seed=5)
    col, dyn, agent = Collector(cfg), Dynamics(cfg), Agent(cfg)
    real = ReplayBuffer(1000, 11, 3)
    real.add_rows(collect(col, None, 120).rows)
    fit_ensemble(dyn, real)
    model_data = ReplayBuffer(500, 11, 3)
    update_sac(cfg, agent, real, model_data, 3)

    col2 = Collector.from_state_dict(cfg, _round_trip(col.state_dict(), tmp_path, "c.pt"))
    dyn2 = Dynamics.from_state_dict(cfg, _round_trip(dyn.state_dict(), tmp_path, "d.pt"))
    agent2 = Agent.from_state_dict(cfg, _round_trip(agent.state_dict(), tmp_path, "a.pt"))
    real2 = ReplayBuffer.from_state_dict(_round_trip(real.state_dict(), tmp_path, "r.pt"))

    # the same future: collected rows, fit results, SAC stats and weights
    assert torch.equal(collect(col, agent.actor, 40).rows, collect(col2, agent2.actor, 40).rows)
    assert fit_ensemble(dyn, real) == fit_ensemble(dyn2, real2)
    assert update_sac(cfg, agent, real, model_data, 3) == update_sac(cfg, agent2, real2,
                                                                      model_data, 3)
    for k, v in agent.sac.state_dict().items():
        assert torch.equal(v, agent2.sac.state_dict()[k]), k


def test_buffer_round_trip_after_wraparound(tmp_path):
    buf = ReplayBuffer(10, 1, 1)
    buf.add_rows(torch.arange(14 * 5, dtype=torch.float32).reshape(14, 5))
    rebuilt = ReplayBuffer.from_state_dict(_round_trip(buf.state_dict(), tmp_path))
    assert torch.equal(rebuilt.rows(), buf.rows())
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(buf.sample_rows(50, g1), rebuilt.sample_rows(50, g2))


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_payload_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "payload": _Evil()}, path)
    with pytest.raises(StateError, match="could not be loaded safely"):
        load_state(path)
    path.write_bytes(pickle.dumps({"x": _Evil()}))
    with pytest.raises(StateError, match="evil.pt"):
        load_state(path)


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(StateError, match="does not exist"):
        load_state(tmp_path / "nope.pt")
    save_state({"a": torch.ones(1000)}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(StateError, match="cut.pt"):
        load_state(tmp_path / "cut.pt")
