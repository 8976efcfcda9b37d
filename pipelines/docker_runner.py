"""``mbpo run --runner docker``: every step in a container of the project image, under kfp.local.

kfp.local's DockerRunner alone cannot run this pipeline: it passes no environment (so no S3 or
MLflow settings), puts containers on Docker's default network (so a store or tracking server on
this machine's loopback is out of reach), mounts only the pipeline root, and the image's user
(uid 10001) cannot write folders this machine's user made. This module checks the engine, the
image and what the containers must reach before the first task, and configures the runner:

- host networking, so loopback servers (the local stack) are reachable as from here;
- the S3 and MLflow settings and credentials through the containers' environment only: never
  pipeline parameters, never logged;
- a local store's run folder mounted at its own path;
- the pipeline root and that run folder writable by the containers' user: the image's
  user when this process is root (the folders are handed to it), otherwise this user's own uid,
  so that the files stay the user's to read and delete;
- a step's true exit status: kfp.local 2.17 removes a container as it exits and counts one it
  can no longer find as a success, so a step killed mid-way (``docker kill``, the OOM killer)
  passed as done; here the container is kept until its status is read, then removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

# What the steps read from their environment (storage.py, tracking.py, ops.py), and nothing else.
FORWARDED_ENV = (
    "MBPO_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_MAX_ATTEMPTS",
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_S3_ENDPOINT_URL", "MBPO_LOG_LEVEL", "MBPO_THREADS",
    "MBPO_TRACKING_RETRY_S", "MBPO_GIT_COMMIT",
)
PACKAGES = ("mbpo_core", "components", "pipelines")
CONTAINER_HOME = "/tmp"  # writable whatever uid the container runs as
RUN_LABEL = "mbpo.run"   # on every step container: the training run's URL

# Run both here and in the image: the same digest means the same package code.
_FINGERPRINT = '''
def fingerprint(roots):
    import hashlib, pathlib
    h = hashlib.sha256()
    for root in roots:
        root = pathlib.Path(root)
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.suffix in (".py", ".toml", ".csv") and "__pycache__" not in p.parts:
                h.update(str(p.relative_to(root.parent)).encode() + b"\\0" + p.read_bytes())
    return h.hexdigest()
'''

# The probe a container runs: can it import this package, which code is it, what does it reach?
_PROBE = _FINGERPRINT + '''
import json, os, socket, sys, uuid
request = json.loads(sys.argv[1])
out = {"uid": os.getuid(), "unreachable": [], "unwritable": []}
try:
    import importlib
    mods = [importlib.import_module(m) for m in request["packages"]]
    out["code"] = fingerprint([os.path.dirname(m.__file__) for m in mods])
except ImportError as e:
    out["missing"] = str(e)
for host, port in request["endpoints"]:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        out["unreachable"].append([host, port, str(e)])
for folder in request["writable"]:
    probe = os.path.join(folder, ".mbpo-probe-" + uuid.uuid4().hex)
    try:
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        out["unwritable"].append([folder, str(e)])
print(json.dumps(out))
'''


class DockerSetupError(RuntimeError):
    """The containers could not run this pipeline; says why and what to do, before any task."""


def _client():  # -> docker.DockerClient
    try:
        import docker
    except ImportError:
        raise DockerSetupError("--runner docker needs the Docker SDK for Python "
                               "(pip install docker)") from None
    try:
        client = docker.from_env()
        client.ping()
    except Exception as e:
        raise DockerSetupError(f"--runner docker: no Docker engine is reachable ({e}); start the "
                               "Docker daemon (or set DOCKER_HOST), or use the default subprocess "
                               "runner") from None
    return client


def local_code_fingerprint() -> str:
    import components
    import mbpo_core
    import pipelines

    scope: dict[str, Any] = {}
    exec(_FINGERPRINT, scope)  # the one definition the probe runs in the image too
    return scope["fingerprint"]([Path(m.__file__).parent for m in (mbpo_core, components, pipelines)])


def _endpoints(urls: Iterable[str]) -> list[tuple[str, int]]:
    found = []
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme in ("http", "https") and parts.hostname:
            found.append((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)))
    return found


def _local_path(uri: str) -> Path | None:
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    return None if "://" in uri else Path(uri)


class DockerSetup:
    """What a container of ``image`` needs to run this training run's steps, checked."""

    def __init__(self, image: str, run_url: str, tracking_uri: str, pipeline_root: Path) -> None:
        if tracking_uri and not tracking_uri.startswith(("http://", "https://", "databricks")):
            raise DockerSetupError(
                f"--runner docker: the tracking store {tracking_uri!r} is a file on this machine; "
                "containers log to an MLflow server: use --stack (after `mbpo stack up`), "
                "--tracking-uri http://HOST:PORT, or --no-tracking")
        self.image, self.run_url, self.tracking_uri = image, run_url, tracking_uri
        self.pipeline_root = pipeline_root.resolve()
        run_dir = _local_path(run_url)  # a local store: the run's own folder is shared
        self.run_dir = run_dir.resolve() if run_dir else None
        self.client = _client()
        self.image_user = self._image_user()
        self.user = self.image_user if os.getuid() == 0 else f"{os.getuid()}:{os.getgid()}"
        self.environment = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ} | {
            "HOME": CONTAINER_HOME}

    def _image_user(self) -> str:
        import docker

        try:
            attrs = self.client.images.get(self.image).attrs
        except docker.errors.ImageNotFound:
            raise DockerSetupError(
                f"--image {self.image}: not present in the local Docker engine; build it with "
                f"`make image IMAGE={self.image.rsplit(':', 1)[0]}` or `docker pull {self.image}`"
            ) from None
        return attrs.get("Config", {}).get("User") or "0"

    def _mounts(self) -> list:
        from docker.types import Mount

        return [Mount(str(self.run_dir), str(self.run_dir), type="bind")] if self.run_dir else []

    def _shared_folders(self) -> list[Path]:
        return [self.pipeline_root] + ([self.run_dir] if self.run_dir else [])

    def prepare_folders(self) -> None:
        """Make the pipeline root and the run's store folder writable by the containers' user.
        As root, hand them to the image's user (root keeps every right); otherwise the
        containers run as this user and the folders are already theirs."""
        for folder in self._shared_folders():
            folder.mkdir(parents=True, exist_ok=True)
        if os.getuid() != 0:
            return
        uid, _, gid = self.image_user.partition(":")
        if not uid.isdigit():
            raise DockerSetupError(f"--image {self.image}: runs as user {uid!r}; a numeric uid "
                                   "is needed to share folders with its containers")
        owner = (int(uid), int(gid) if gid.isdigit() else int(uid))
        for folder in self._shared_folders():
            _chown_tree(folder, owner)

    def check(self, dry_run: bool = False) -> None:
        """Run the probe in one container of the image: the package is there, it is this
        checkout's code, the store and tracking server answer, the shared folders are writable
        (not with ``dry_run``, which writes nothing)."""
        import docker

        if not dry_run:
            self.prepare_folders()
        endpoints = _endpoints([self.tracking_uri] + ([os.environ.get(k, "") for k in (
            "MBPO_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")]
            if self.run_url.startswith("s3://") else []))
        request = {"packages": list(PACKAGES), "endpoints": endpoints,
                   "writable": [] if dry_run else [str(f) for f in self._shared_folders()]}
        try:
            raw = self.client.containers.run(
                self.image, ["python", "-c", _PROBE, json.dumps(request)], remove=True,
                stdout=True, stderr=True, **self._probe_args(dry_run))
        except docker.errors.ContainerError as e:
            raise DockerSetupError(f"--image {self.image}: the image cannot run Python "
                                   f"({e.stderr.decode(errors='replace').strip()[-300:]})") from None
        result = json.loads(raw.decode().strip().splitlines()[-1])
        if "missing" in result:
            raise DockerSetupError(f"--image {self.image}: does not hold the mbpo package "
                                   f"({result['missing']}); build it with `make image`")
        if result["unreachable"]:
            host, port, why = result["unreachable"][0]
            raise DockerSetupError(f"--runner docker: {host}:{port} cannot be reached from a "
                                   f"container of {self.image} ({why}); the store and tracking "
                                   "server must be reachable from the containers (host network)")
        if result["unwritable"]:
            folder, why = result["unwritable"][0]
            raise DockerSetupError(f"--runner docker: {folder} is not writable by the containers' "
                                   f"user {self.user} ({why})")
        if result["code"] != local_code_fingerprint():
            log.warning("--image %s holds other mbpo code than this checkout (built from another "
                        "commit?); its results may differ from `mbpo train` here. Rebuild it with "
                        "`make image`.", self.image)

    def run_args(self) -> dict[str, Any]:
        """docker ``containers.run`` arguments for every step (kfp.local mounts the pipeline
        root itself)."""
        return {"network_mode": "host", "environment": dict(self.environment), "user": self.user,
                "mounts": self._mounts(), "labels": {RUN_LABEL: self.run_url}}

    def _probe_args(self, dry_run: bool) -> dict[str, Any]:
        """A step's arguments, with the pipeline root mounted as kfp.local would (a dry run
        shares nothing: the folders need not exist yet)."""
        if dry_run:
            return self.run_args() | {"mounts": []}
        return self.run_args() | {"volumes": {str(self.pipeline_root): {
            "bind": str(self.pipeline_root), "mode": "rw"}}}

    def runner(self):  # -> kfp.local.DockerRunner
        from kfp import local

        return local.DockerRunner(**self.run_args())


def _chown_tree(root: Path, owner: tuple[int, int]) -> None:
    os.chown(root, *owner)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), *owner, follow_symlinks=False)


def run_step_container(client, image: str, command: list[str], volumes: dict[str, Any],
                       **run_args: Any) -> int:
    """kfp.local's ``run_docker_container``, but the exit status is always the container's own."""
    container = client.containers.run(image=image, command=command, detach=True, stdout=True,
                                      stderr=True, volumes=volumes, **run_args)
    print(f"step container {container.short_id} of {image}")
    try:
        for line in container.logs(stream=True):
            print(line.decode(errors="replace"), end="")
        return int(container.wait()["StatusCode"])
    finally:
        with contextlib.suppress(Exception):
            container.remove(force=True)


@contextlib.contextmanager
def exit_status_kept() -> Iterator[None]:
    """While a run lasts, kfp.local starts step containers with :func:`run_step_container`."""
    from kfp.local import docker_task_handler

    original = docker_task_handler.run_docker_container
    docker_task_handler.run_docker_container = run_step_container
    try:
        yield
    finally:
        docker_task_handler.run_docker_container = original
