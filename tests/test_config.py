"""Configuration: presets as data, overrides, and the documented errors for bad values."""

import pytest

from mbpo_core.config import ConfigError, MBPOConfig, available_presets, make_config
from mbpo_core.envs import SUPPORTED_ENVS


def test_every_supported_env_has_a_preset_with_paper_values():
    assert set(available_presets()) == set(SUPPORTED_ENVS)
    hopper = make_config("Hopper-v5")
    assert hopper.sac.updates_per_step == 20 and hopper.rollout.schedule == (20, 150, 1, 15)
    assert hopper.sac.target_entropy == -1.0 and hopper.sac.real_ratio == 0.05
    assert hopper.ensemble.ensemble_size == 7 and hopper.ensemble.num_elites == 5
    humanoid = make_config("Humanoid-v5")
    assert humanoid.ensemble.hidden_size == 400 and humanoid.steps_per_round == 1000
    assert humanoid.rollout.retain_epochs == 5
    pend = make_config("InvertedPendulum-v5")
    assert pend.init_steps == 500 and pend.epoch_length == 250 and pend.sac.updates_per_step == 10


def test_overrides_are_typed():
    cfg = make_config("Hopper-v5", ["sac.hidden_size=512", "rollout.schedule=[1, 2, 3, 4]",
                                    "sac.real_ratio=0.1", "sac.sequential=true", "seed=7"])
    assert cfg.sac.hidden_size == 512 and cfg.rollout.schedule == (1, 2, 3, 4)
    assert cfg.sac.real_ratio == 0.1 and cfg.sac.sequential is True and cfg.seed == 7


def test_rollout_schedule_and_pool_size():
    cfg = make_config("Hopper-v5")
    assert cfg.rollout_length(0) == 1
    assert cfg.rollout_length(5000 + 20_000) == 1
    assert cfg.rollout_length(5000 + 85_000) == 8
    assert cfg.rollout_length(5000 + 150_000) == 15 == cfg.rollout_length(10**7)
    assert cfg.rollout_length(34_750) == 1  # epoch 29 (not 29.75): the original's k
    # paper: retain_epochs x k x rollouts per epoch (100k start states, 4 fits per epoch)
    assert cfg.model_buffer_capacity(15) == 15 * 400_000


@pytest.mark.parametrize("override, fragment", [
    (["sac.real_ratio=1.5"], "sac.real_ratio = 1.5 is out of range; allowed [0.0, 1.0]"),
    (["sac.real_ratio=-0.1"], "sac.real_ratio = -0.1 is out of range"),
    (["init_steps=-5"], "init_steps = -5 is out of range"),
    (["rollout.schedule=[150, 20, 1, 15]"], "rollout.schedule = [150, 20, 1, 15] is out of order"),
    (["rollout.schedule=[1, 2, 3]"], "must be [epoch_start, epoch_end, length_start, length_end]"),
    (["ensemble.num_elites=9"], "ensemble.num_elites = 9 must be <= ensemble.ensemble_size = 7"),
    (["sac.hidden=3"], "unknown key sac.hidden; allowed:"),
    (["bogus=3"], "unknown key bogus"),
    (["nosection.x=1"], "unknown key nosection.x"),
    (["sac.hidden_size=2.5"], "sac.hidden_size = '2.5' is not a valid int"),
    (["sac.lr=0"], "sac.lr = 0.0 is out of range; allowed (0.0, 1.0]"),
    (["sac.gamma=nan"], "sac.gamma = nan must be a finite number"),
    (["ensemble.weight_decay=[1e-5]"], "ensemble.weight_decay = [1e-05] must have"),
    (["sac.batch_size"], "must look like key=value"),
])
def test_bad_values_raise_documented_error(override, fragment):
    with pytest.raises(ConfigError) as err:
        make_config("Hopper-v5", override)
    assert fragment in str(err.value)


def test_unknown_env():
    with pytest.raises(ConfigError, match="env = 'Pendulum-v1' has no preset; allowed: "):
        make_config("Pendulum-v1")
    with pytest.raises(ConfigError, match="env = 'CartPole-v1' is not supported"):
        MBPOConfig(env="CartPole-v1")


def test_dataclass_construction_is_validated_too():
    with pytest.raises(ConfigError, match="seed = -1 is out of range"):
        MBPOConfig(seed=-1)


def test_config_round_trips_through_dict():
    cfg = make_config("Ant-v5", ["sac.hidden_size=64"])
    assert MBPOConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.flat()["sac.hidden_size"] == 64


def _original_rollout_length(schedule, epoch: int) -> int:
    """jannerm/mbpo's ``MBPO._set_rollout_length``, written out, for the integer ``self._epoch``."""
    min_epoch, max_epoch, min_length, max_length = schedule
    if epoch <= min_epoch:
        y = min_length
    else:
        dx = (epoch - min_epoch) / (max_epoch - min_epoch)
        dx = min(dx, 1)
        y = dx * (max_length - min_length) + min_length
    return int(y)


@pytest.mark.parametrize("env", ["Hopper-v5", "Ant-v5", "Humanoid-v5"])
def test_rollout_schedule_equals_the_original_at_every_fit_of_a_125k_step_run(env):
    """The original fits the model every ``model_train_freq`` steps after its initial
    exploration; its epoch counter (``self._epoch``) is the number of whole epochs done."""
    cfg = make_config(env)
    fits = range(cfg.init_steps, 125_000 + 1, cfg.steps_per_round)
    ours = [cfg.rollout_length(t) for t in fits]
    original = [_original_rollout_length(cfg.rollout.schedule,
                                         (t - cfg.init_steps) // cfg.epoch_length) for t in fits]
    assert ours == original
    assert len(set(ours)) > 1  # the schedule does move within 125k steps on these tasks
