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
def shard_cache(tmp_path_factory):
    """A shard cache of this session's own: content-addressed, seeded shards from an earlier run
    of the suite in ~/.cache must not stand in for reads from the store under test."""
    old = os.environ.get("MBPO_CACHE_DIR")
    os.environ["MBPO_CACHE_DIR"] = str(tmp_path_factory.mktemp("shard-cache"))
    yield os.environ["MBPO_CACHE_DIR"]
    if old is None:
        os.environ.pop("MBPO_CACHE_DIR", None)
    else:
        os.environ["MBPO_CACHE_DIR"] = old


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


@pytest.fixture(scope="session")
def docker_engine():
    """A real Docker engine (tests/dockerd.py) for the session, as ``DOCKER_HOST``. Where none
    can run, the tests that need it skip, saying why; ``MBPO_REQUIRE_DOCKER=1`` (set by
    .ci/run) makes that a failure instead."""
    from tests.dockerd import Dockerd, EngineUnavailable

    try:
        engine = Dockerd.start()
    except EngineUnavailable as e:
        if os.environ.get("MBPO_REQUIRE_DOCKER") == "1":
            pytest.fail(f"MBPO_REQUIRE_DOCKER=1 but {e}")
        pytest.skip(f"no Docker engine: {e}")
    old = os.environ.get("DOCKER_HOST")
    if engine.host:
        os.environ["DOCKER_HOST"] = engine.host
    yield engine
    if old is None:
        os.environ.pop("DOCKER_HOST", None)
    else:
        os.environ["DOCKER_HOST"] = old
    engine.stop()


@pytest.fixture(scope="session")
def mbpo_image(docker_engine, tmp_path_factory):
    """The component image, built from docker/Dockerfile by `make image`'s script (a warm layer
    cache is reused); the build's log is kept as test-artifacts/image-build.log."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    ref = "mbpo-test:latest"
    log = root / "test-artifacts" / "image-build.log"
    log.parent.mkdir(exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        res = subprocess.run([str(root / "scripts" / "build-image.sh"), ref], cwd=root, stdout=f,
                             stderr=subprocess.STDOUT, env=os.environ | {
                                 "PIP": f"{sys.executable} -m pip"} | SECRETS_AT_BUILD)
    text = log.read_text(errors="replace")
    assert res.returncode == 0, text[-4000:]
    print(f"\nimage {ref} built in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return ref


# Present in the environment of the image build, so that the image tests can show they are in
# no layer, history entry or setting of it.
SECRETS_AT_BUILD = {"AWS_SECRET_ACCESS_KEY": "build-env-secret-never-in-image",
                    "MLFLOW_TRACKING_PASSWORD": "build-env-password-never-in-image"}
