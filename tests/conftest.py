import os

import pytest
import torch

# Deterministic, comparable numbers: the same thread count everywhere in the suite.
torch.set_num_threads(int(os.environ.get("MBPO_TEST_THREADS", "2")))

TINY = [
    "init_steps=100", "steps_per_round=50", "epoch_length=50", "eval_episodes=1",
    "ensemble.ensemble_size=3", "ensemble.num_elites=2", "ensemble.hidden_size=32",
    "ensemble.num_hidden_layers=2", "ensemble.weight_decay=[1e-5, 1e-5, 1e-5]",
    "ensemble.max_epochs=5", "rollout.batch_size=256", "rollout.schedule=[0, 2, 1, 3]",
    "sac.hidden_size=32", "sac.updates_per_step=1", "sac.batch_size=64",
]


@pytest.fixture
def tiny_overrides() -> list[str]:
    """A configuration small enough for a round in well under a second."""
    return list(TINY)
