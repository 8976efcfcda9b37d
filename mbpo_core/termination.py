"""Batched termination functions for model rollouts, mirroring the v5 envs' own ``terminated``.

Each takes torch tensors ``(obs [N, o], act [N, a], next_obs [N, o])`` and returns a bool [N].
They read the observation layouts of ``envs.ENV_SPECS`` (x position excluded).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

TerminationFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x).all(dim=-1)


def hopper(obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
    # healthy: all of obs[1:] in (-100, 100), z > 0.7, |angle| < 0.2 (open intervals, as v5).
    z, angle, rest = next_obs[:, 0], next_obs[:, 1], next_obs[:, 1:]
    healthy = ((rest > -100) & (rest < 100)).all(dim=-1) & (z > 0.7) & (angle > -0.2) & (angle < 0.2)
    return ~healthy


def walker2d(obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
    z, angle = next_obs[:, 0], next_obs[:, 1]
    healthy = (z > 0.8) & (z < 2.0) & (angle > -1.0) & (angle < 1.0)
    return ~healthy


def ant(obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
    z = next_obs[:, 0]
    healthy = _finite(next_obs) & (z >= 0.2) & (z <= 1.0)
    return ~healthy


def humanoid(obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
    z = next_obs[:, 0]
    return ~((z > 1.0) & (z < 2.0))


def inverted_pendulum(obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
    return ~_finite(next_obs) | (next_obs[:, 1].abs() > 0.2)


def inverted_double_pendulum(obs: torch.Tensor, act: torch.Tensor,
                             next_obs: torch.Tensor) -> torch.Tensor:
    # The env tests the tip's height y <= 1 with y = 0.6 (cos t1 + cos(t1 + t2)) from MuJoCo's
    # kinematics; obs[1:3] are sin t1, sin t2 and obs[3:5] cos t1, cos t2.
    s1, s2, c1, c2 = next_obs[:, 1], next_obs[:, 2], next_obs[:, 3], next_obs[:, 4]
    y = 0.6 * c1 + 0.6 * (c1 * c2 - s1 * s2)
    return y <= 1.0


def half_cheetah(obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
    return torch.zeros(next_obs.shape[0], dtype=torch.bool, device=next_obs.device)


_TERMINATION: dict[str, TerminationFn] = {
    "Hopper-v5": hopper,
    "Walker2d-v5": walker2d,
    "Ant-v5": ant,
    "Humanoid-v5": humanoid,
    "InvertedPendulum-v5": inverted_pendulum,
    "InvertedDoublePendulum-v5": inverted_double_pendulum,
    "HalfCheetah-v5": half_cheetah,
}


def termination_fn(env_id: str) -> TerminationFn:
    try:
        return _TERMINATION[env_id]
    except KeyError:
        raise ValueError(f"no termination function for {env_id!r}; allowed: "
                         f"{', '.join(_TERMINATION)}") from None
