"""Bad data and bad input: non-finite model predictions, diverging SAC, random configurations."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mbpo_core.buffer import ReplayBuffer
from mbpo_core.config import ConfigError, MBPOConfig, available_presets, make_config
from mbpo_core.steps import (
    Agent,
    Collector,
    DivergenceError,
    Dynamics,
    collect,
    fit_ensemble,
    imagine,
    imagine_metrics,
    update_sac,
)
from tests.conftest import TINY


def _real(cfg, n=200):
    collector = Collector(cfg)
    res = collect(collector, None, n)
    buf = ReplayBuffer(cfg.real_buffer_size, collector.obs.shape[0], res.rows.shape[1] - 2 *
                       collector.obs.shape[0] - 2)
    buf.add_rows(res.rows)
    return buf


def _dream(nan_rows, inf_rows=slice(0, 0)):
    """Rollouts of a fitted model whose predictions are NaN for ``nan_rows`` of every batch
    and whose rewards are inf for ``inf_rows``."""
    cfg = make_config("Hopper-v5", TINY, seed=0)
    real = _real(cfg)
    dyn = Dynamics(cfg)
    fit_ensemble(dyn, real)
    honest = dyn.model.sample_next

    def diverged(obs, act, generator):
        rew, nxt = honest(obs, act, generator)
        nxt, rew = nxt.clone(), rew.clone()
        nxt[nan_rows(nxt.shape[0]), 0] = float("nan")
        rew[inf_rows] = float("inf")
        return rew, nxt

    dyn.model.sample_next = diverged
    return cfg, imagine(cfg, dyn, Agent(cfg).actor, real, 3, torch.Generator().manual_seed(0))


def test_nonfinite_model_predictions_are_dropped_and_counted():
    cfg, dream = _dream(lambda n: slice(None, None, 8), slice(1, None, 11))
    assert torch.isfinite(dream.rows).all()
    assert cfg.rollout.batch_size // 6 < dream.nonfinite <= cfg.rollout.batch_size // 2
    assert imagine_metrics(dream, 0)["rollout/nonfinite_dropped"] == dream.nonfinite
    # dropped samples end their rollouts: later steps start only from finite states
    assert dream.rows.shape[0] < 3 * cfg.rollout.batch_size - dream.nonfinite


def test_mostly_nonfinite_rollouts_stop_the_run_as_a_diverged_model():
    with pytest.raises(DivergenceError, match=r"dynamics model diverged: \d+ of 256 rollouts"):
        _dream(lambda n: torch.arange(n) % 3 != 0)  # NaN for two samples in three


def test_a_model_fit_that_blows_up_stops_the_run_as_a_diverged_model():
    """An overflowing reward in the real data makes every member's loss non-finite."""
    cfg = make_config("Hopper-v5", TINY, seed=0)
    real = _real(cfg)
    rows = real.rows().clone()
    rows[:, real.split(rows).obs.shape[1] + 3] = 3e38  # the reward column: its square overflows
    poisoned = ReplayBuffer(cfg.real_buffer_size, 11, 3)
    poisoned.add_rows(rows)
    with pytest.raises(DivergenceError, match="dynamics model diverged: training loss"):
        fit_ensemble(Dynamics(cfg), poisoned)


def test_diverging_sac_stops_with_a_clear_error():
    cfg = make_config("Hopper-v5", TINY + ["sac.updates_per_step=5"], seed=0)
    real = _real(cfg)
    rows = real.rows().clone()
    rows[:, 11 + 3] = 3e38  # rewards (after 11 obs + 3 act) at float32's edge: the loss overflows
    poisoned = ReplayBuffer(real.capacity, 11, 3)
    poisoned.add_rows(rows)
    with pytest.raises(DivergenceError, match=r"SAC diverged .*critic_loss"):
        update_sac(cfg, Agent(cfg), poisoned, ReplayBuffer(10, 11, 3), 20)
    # the same agent on the honest data trains without complaint
    assert math.isfinite(update_sac(cfg, Agent(cfg), real, ReplayBuffer(10, 11, 3), 20)["critic_loss"])


# -- random configurations: the only failures are the documented ConfigErrors -----------------
_FIELDS = sorted(MBPOConfig().flat())
_values = st.one_of(
    st.integers(-10**12, 10**12).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["true", "false", "", "[1, 2]", "[0, 150, 1, 15]", "[1e-5, 1e-5]", "abc",
                     "[]", "{}", "None", "-0", "1e400", "[1, 'x']", "[[1]]"]),
    st.text(max_size=12))
_keys = st.one_of(st.sampled_from(_FIELDS), st.text(min_size=1, max_size=15),
                  st.sampled_from(["sac.nope", "ensemble", "rollout.", "a.b.c", "seed", "env"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(env=st.sampled_from(available_presets()),
       pairs=st.lists(st.tuples(_keys, _values), max_size=4),
       raw=st.lists(st.text(max_size=20), max_size=2))
def test_random_configurations_fail_only_with_documented_errors(env, pairs, raw):
    overrides = [f"{k}={v}" for k, v in pairs] + raw
    try:
        cfg = make_config(env, overrides)
    except ConfigError as e:
        assert str(e), "a configuration error must say what is wrong"
        return
    # accepted: then it is a consistent, usable configuration
    assert cfg.env == env
    assert 0.0 <= cfg.sac.real_ratio <= 1.0
    assert cfg.ensemble.num_elites <= cfg.ensemble.ensemble_size
    e0, e1, k0, k1 = cfg.rollout.schedule
    assert e0 <= e1 and min(k0, k1) >= 1
    for value in cfg.flat().values():
        if isinstance(value, float):
            assert math.isfinite(value)
    assert MBPOConfig.from_dict(cfg.to_dict()) == cfg


def test_corrupt_or_truncated_checkpoint_fails_its_checksum(tmp_path):
    from mbpo_core.state import StateError, load_state, save_state

    cfg = make_config("Hopper-v5", TINY, seed=0)
    path = tmp_path / "agent.pt"
    save_state(Agent(cfg).state_dict(), path)
    good = path.read_bytes()
    assert load_state(path)["sac"]["updates"] == 0
    path.write_bytes(good[:-100])  # truncated
    with pytest.raises(StateError, match=r"agent\.pt.*fails its checksum"):
        load_state(path)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01  # one bit somewhere in the weights
    path.write_bytes(bytes(flipped))
    with pytest.raises(StateError, match="corrupt or truncated"):
        load_state(path)
