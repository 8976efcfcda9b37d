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


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory):
    """Runs in the suite track to a throwaway MLflow store, never ./mlflow.db in the checkout."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on loopback for the whole session, credentials required."""
    from pipelines.s3server import S3Server

    server = S3Server.start(tmp_path_factory.mktemp("seaweedfs"), "mbpo-test-key",
                            "mbpo-test-secret-0123456789")
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This process (and its children) talk to the test S3 server; returns a fresh bucket."""
    import uuid

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    return bucket


@pytest.fixture(scope="session")
def mbpo_stack(tmp_path_factory):
    """One `mbpo stack` (SeaweedFS + mlflow server) shared by the tracking and fault tests."""
    from pipelines import stack

    directory = tmp_path_factory.mktemp("stack")
    stack.up(directory)
    yield directory
    stack.down(directory)


@pytest.fixture
def live_stack(mbpo_stack):
    """The shared stack with its MLflow server running (a fault test may have killed it):
    ``(directory, StackInfo)``."""
    from pipelines import stack

    if not stack.status(mbpo_stack)["mlflow"]:
        stack.restart_mlflow(mbpo_stack)
    return mbpo_stack, stack.load(mbpo_stack)
