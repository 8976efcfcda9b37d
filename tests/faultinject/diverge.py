"""A diverging SAC update, injected for fault tests.

Once the real buffer holds ``at_rows`` transitions, the real rows SAC sees carry rewards at
float32's edge (3e38): the critic's TD loss overflows and the genuine ``update_sac`` check raises
``DivergenceError``. Nothing else is changed, so the run up to that round is the honest run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mbpo_core.buffer import ReplayBuffer


def diverging(update_sac: Callable[..., dict[str, float]], at_rows: int) -> Callable[..., Any]:
    def update(cfg, agent, real: ReplayBuffer, model_data: ReplayBuffer, n_updates: int):  # noqa: ANN001,ANN202
        if len(real) >= at_rows:
            rows = real.rows().clone()
            rows[:, real.obs_dim + real.act_dim] = 3e38  # the reward column
            poisoned = ReplayBuffer(real.capacity, real.obs_dim, real.act_dim, rows.device)
            poisoned.add_rows(rows)
            real = poisoned
        return update_sac(cfg, agent, real, model_data, n_updates)
    return update
