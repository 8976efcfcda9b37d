"""`mbpo stack`: the cluster's storage and tracking services on one machine, on loopback.

``up`` starts a SeaweedFS S3 server (credentials required, generated per stack) and an
``mlflow server`` (SQLite backend store, artifacts proxied to a bucket on that S3 server), waits
until both answer, and records what it started in ``<dir>/stack.json`` (mode 0600: it holds the
generated S3 secret). ``down`` stops exactly those processes. ``env`` gives the variables a client
needs; only the tracking server holds S3 credentials for MLflow's artifacts, as on a cluster.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from .s3server import STOP_GRACE_S, S3Server, free_port, process_alive, stop_process_group

STORE_BUCKET = "mbpo"            # replay shards and run records: s3://mbpo/store
ARTIFACT_BUCKET = "mlflow"       # MLflow artifacts (models, plots), written by the server
MLFLOW_STOP_GRACE_S = 10.0       # time for the server to finish requests in flight


class StackError(RuntimeError):
    """The stack could not be started, found, or stopped."""


@dataclass
class StackInfo:
    dir: str
    s3_endpoint: str
    access_key: str
    secret_key: str
    mlflow_uri: str
    s3_pid: int
    mlflow_pid: int

    def env(self) -> dict[str, str]:
        """What a client (mbpo run/train, a notebook) exports to use this stack."""
        return {"MBPO_S3_ENDPOINT_URL": self.s3_endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1",
                "MLFLOW_TRACKING_URI": self.mlflow_uri, "MBPO_STORE": f"s3://{STORE_BUCKET}/store"}


def _state_file(directory: Path) -> Path:
    return directory / "stack.json"


def load(directory: str | os.PathLike[str]) -> StackInfo | None:
    path = _state_file(Path(directory))
    if not path.is_file():
        return None
    return StackInfo(**json.loads(path.read_text()))


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"the MLflow server exited with code {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise StackError(f"the MLflow server did not answer at {url} in {timeout_s:.0f} s; see {log}")


def start_mlflow(directory: Path, s3_endpoint: str, access_key: str, secret_key: str,
                 port: int | None = None, timeout_s: float = 90.0) -> tuple[str, subprocess.Popen]:
    """An ``mlflow server`` with a SQLite store and artifacts proxied to the S3 server."""
    port = port or free_port()
    log = directory / "mlflow.log"
    env = os.environ | {"MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": access_key,
                        "AWS_SECRET_ACCESS_KEY": secret_key, "AWS_DEFAULT_REGION": "us-east-1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
           "--artifacts-destination", f"s3://{ARTIFACT_BUCKET}/artifacts", "--workers", "1"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, cwd=directory)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{uri}/health", proc, timeout_s, log)
    except StackError:
        stop_process_group(proc.pid, MLFLOW_STOP_GRACE_S)
        raise
    return uri, proc


def up(directory: str | os.PathLike[str]) -> StackInfo:
    directory = Path(directory).resolve()
    existing = load(directory)
    if existing and process_alive(existing.s3_pid) and process_alive(existing.mlflow_pid):
        return existing
    directory.mkdir(parents=True, exist_ok=True)
    s3 = S3Server.start(directory / "s3", access_key=f"mbpo-{secrets.token_hex(4)}",
                        secret_key=secrets.token_urlsafe(24))
    try:
        s3.client().create_bucket(Bucket=STORE_BUCKET)
        s3.client().create_bucket(Bucket=ARTIFACT_BUCKET)
        mlflow_uri, mlflow_proc = start_mlflow(directory, s3.endpoint_url, s3.access_key,
                                               s3.secret_key)
    except BaseException:
        s3.stop()
        raise
    info = StackInfo(str(directory), s3.endpoint_url, s3.access_key, s3.secret_key, mlflow_uri,
                     s3.process.pid, mlflow_proc.pid)
    state = _state_file(directory)
    state.touch(mode=0o600)
    state.write_text(json.dumps(asdict(info), indent=1))
    return info


def restart_mlflow(directory: str | os.PathLike[str]) -> StackInfo:
    """Start the stack's MLflow server again, on the same port and store (after it died)."""
    info = load(directory)
    if info is None:
        raise StackError(f"no stack recorded in {directory}")
    if process_alive(info.mlflow_pid):
        stop_process_group(info.mlflow_pid, MLFLOW_STOP_GRACE_S)
    port = int(info.mlflow_uri.rsplit(":", 1)[1])
    _, proc = start_mlflow(Path(info.dir), info.s3_endpoint, info.access_key, info.secret_key,
                           port=port)
    info.mlflow_pid = proc.pid
    _state_file(Path(info.dir)).write_text(json.dumps(asdict(info), indent=1))
    return info


def down(directory: str | os.PathLike[str]) -> bool:
    """Stop what ``up`` started in ``directory``; False if nothing was recorded there."""
    info = load(directory)
    if info is None:
        return False
    stop_process_group(info.mlflow_pid, MLFLOW_STOP_GRACE_S)
    stop_process_group(info.s3_pid, STOP_GRACE_S)
    _state_file(Path(directory)).unlink()
    return True


def status(directory: str | os.PathLike[str]) -> dict[str, bool] | None:
    info = load(directory)
    if info is None:
        return None
    mlflow_ok = False
    try:
        with urllib.request.urlopen(f"{info.mlflow_uri}/health", timeout=2) as r:
            mlflow_ok = r.status == 200
    except OSError:
        pass
    return {"s3": process_alive(info.s3_pid), "mlflow": mlflow_ok}
