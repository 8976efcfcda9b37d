"""Gymnasium MuJoCo v5 environments as MBPO uses them, and exact capture/restore of their state.

The env state (MuJoCo integration state incl. solver warm-start, time-limit counter, reset RNG)
is what lets a pipeline step stop mid-episode and the next step continue it bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np
import torch


@dataclass(frozen=True)
class EnvSpec:
    obs_dim: int
    act_dim: int
    kwargs: dict[str, Any]


# The observation layouts the termination functions rely on. Ant and Humanoid use the truncated
# observations of the MBPO paper (27-d and 45-d), selected through the v5 constructor flags.
ENV_SPECS: dict[str, EnvSpec] = {
    "InvertedPendulum-v5": EnvSpec(4, 1, {}),
    "InvertedDoublePendulum-v5": EnvSpec(9, 1, {}),
    "Hopper-v5": EnvSpec(11, 3, {}),
    "Walker2d-v5": EnvSpec(17, 6, {}),
    "HalfCheetah-v5": EnvSpec(17, 6, {}),
    "Ant-v5": EnvSpec(27, 8, {"include_cfrc_ext_in_observation": False}),
    "Humanoid-v5": EnvSpec(45, 17, {
        "include_cinert_in_observation": False,
        "include_cvel_in_observation": False,
        "include_qfrc_actuator_in_observation": False,
        "include_cfrc_ext_in_observation": False,
    }),
}
SUPPORTED_ENVS: tuple[str, ...] = tuple(ENV_SPECS)

_MJ_STATE = mujoco.mjtState.mjSTATE_INTEGRATION


def make_env(env_id: str, seed: int, max_episode_steps: int = 1000) -> gym.Env:
    """A seeded env; the seed fixes the reset noise, so ``reset()`` without a seed continues it."""
    if env_id not in ENV_SPECS:
        raise ValueError(f"env {env_id!r} is not supported; allowed: {', '.join(SUPPORTED_ENVS)}")
    env = gym.make(env_id, max_episode_steps=max_episode_steps, disable_env_checker=True,
                   **ENV_SPECS[env_id].kwargs)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    return env


def to_env_action(env: gym.Env, action: np.ndarray) -> np.ndarray:
    """Policies act in [-1, 1]; map to the env's bounds (InvertedPendulum's are [-3, 3])."""
    low = env.action_space.low.astype(np.float64)
    high = env.action_space.high.astype(np.float64)
    return low + (np.asarray(action, dtype=np.float64) + 1.0) * 0.5 * (high - low)


def _time_limit(env: gym.Env) -> gym.wrappers.TimeLimit:
    w = env
    while not isinstance(w, gym.wrappers.TimeLimit):
        if not hasattr(w, "env"):
            raise TypeError("env has no TimeLimit wrapper; build it with make_env")
        w = w.env
    return w


def get_env_state(env: gym.Env) -> dict[str, Any]:
    """Everything that determines the env's future given future actions, as tensors/ints."""
    base = env.unwrapped
    n = mujoco.mj_stateSize(base.model, _MJ_STATE)
    physics = np.empty(n, dtype=np.float64)
    mujoco.mj_getState(base.model, base.data, physics, _MJ_STATE)
    return {
        "physics": torch.from_numpy(physics),
        "elapsed_steps": int(_time_limit(env)._elapsed_steps or 0),
        "reset_rng": base.np_random.bit_generator.state,
    }


def set_env_state(env: gym.Env, state: dict[str, Any]) -> None:
    base = env.unwrapped
    physics = state["physics"].cpu().numpy().astype(np.float64, copy=True)
    expected = mujoco.mj_stateSize(base.model, _MJ_STATE)
    if physics.shape != (expected,):
        raise ValueError(f"env state has {physics.shape[0]} physics values, this env needs {expected}")
    mujoco.mj_setState(base.model, base.data, physics, _MJ_STATE)
    _time_limit(env)._elapsed_steps = int(state["elapsed_steps"])
    base.np_random.bit_generator.state = state["reset_rng"]
