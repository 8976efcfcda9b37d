"""`mbpo stack`: the cluster's storage and tracking services on one machine, on loopback.

``up`` starts a SeaweedFS S3 server (credentials required, generated once per stack folder) and
an ``mlflow server`` (SQLite backend store, artifacts proxied to a bucket on that S3 server),
waits until both answer, and records them in ``<dir>/stack.json`` (mode 0600: it holds the
generated S3 secret). ``up`` is idempotent and recovers: it starts only the members that are
down, on the folder's data, buckets, credentials and (while free) ports, so a stack stopped in
the evening comes back in the morning with its MLflow runs and stored shards, and a member that
died is started again. ``down`` stops exactly the processes ``up`` started and keeps the record
(without process ids) for the next ``up``. ``env`` gives the variables a client needs; only the
tracking server holds S3 credentials for MLflow's artifacts, as on a cluster.
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
    s3_pid: int       # 0: not running (after `down`)
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


def _running(pid: int) -> bool:
    return pid > 0 and process_alive(pid)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:  # as the servers bind: connections of a killed one in
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT do not count
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _save(info: StackInfo) -> None:
    state = _state_file(Path(info.dir))
    state.touch(mode=0o600)
    state.write_text(json.dumps(asdict(info), indent=1))


def _ensure_buckets(s3: S3Server, timeout_s: float = 30.0) -> None:
    """Create the stack's buckets where missing. A SeaweedFS that has just restarted may still be
    loading its bucket list: a create can then be refused as "already exists" (by it) while a
    HEAD does not see the bucket yet, so both are retried until they agree."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = s3.client()
    deadline = time.monotonic() + timeout_s
    for bucket in (STORE_BUCKET, ARTIFACT_BUCKET):
        last: Exception | None = None
        while True:
            try:
                client.head_bucket(Bucket=bucket)
                break  # the folder's earlier stack made it: its objects are still there
            except (ClientError, BotoCoreError):
                pass
            try:
                client.create_bucket(Bucket=bucket)
                break
            except (client.exceptions.BucketAlreadyOwnedByYou,
                    client.exceptions.BucketAlreadyExists) as e:
                last = e  # it exists, but is not listed yet: HEAD it again
            except (ClientError, BotoCoreError) as e:
                last = e
            if time.monotonic() > deadline:
                raise StackError(f"the stack's S3 server at {s3.endpoint_url} did not make or show "
                                 f"bucket {bucket!r} within {timeout_s:.0f} s"
                                 f"{f': {last}' if last else ''}; see {s3.data_dir / 'weed.log'}")
            time.sleep(0.5)


def _reusable_port(url: str) -> int | None:
    """The port ``url`` was on, if nothing else has taken it meanwhile."""
    port = _port(url) if url else None
    return port if port and _port_free(port) else None


def _start_stack_mlflow(info: StackInfo) -> None:
    """(Re)start the stack's MLflow server on its recorded port and store; updates ``info``."""
    if _running(info.mlflow_pid):  # alive but not answering, or pointed at an old S3 endpoint
        stop_process_group(info.mlflow_pid, MLFLOW_STOP_GRACE_S)
    info.mlflow_uri, proc = start_mlflow(Path(info.dir), info.s3_endpoint, info.access_key,
                                         info.secret_key, port=_reusable_port(info.mlflow_uri))
    info.mlflow_pid = proc.pid


def up(directory: str | os.PathLike[str]) -> StackInfo:
    """Start whatever of the stack in ``directory`` is not running; reuse its data, buckets,
    credentials and ports (a port taken by another process meanwhile is replaced)."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    info = load(directory)
    if info is None:
        info = StackInfo(str(directory), "", f"mbpo-{secrets.token_hex(4)}",
                         secrets.token_urlsafe(24), "", 0, 0)
    info.dir = str(directory)
    started_s3, old_endpoint = None, info.s3_endpoint
    if not _running(info.s3_pid):
        started_s3 = S3Server.start(directory / "s3", access_key=info.access_key,
                                    secret_key=info.secret_key,
                                    port=_reusable_port(info.s3_endpoint))
        info.s3_endpoint, info.s3_pid = started_s3.endpoint_url, started_s3.process.pid
        _save(info)  # from here on `down` can stop it, whatever happens next
    try:
        if started_s3 is not None:
            _ensure_buckets(started_s3)
        if not (_running(info.mlflow_pid) and _health(info.mlflow_uri)
                and info.s3_endpoint == old_endpoint):
            _start_stack_mlflow(info)
    except BaseException:
        if started_s3 is not None:
            started_s3.stop()
            info.s3_pid = 0
        _save(info)
        raise
    _save(info)
    return info


def restart_mlflow(directory: str | os.PathLike[str]) -> StackInfo:
    """Start the stack's MLflow server again, on the same port and store (after it died)."""
    info = load(directory)
    if info is None:
        raise StackError(f"no stack recorded in {directory}")
    _start_stack_mlflow(info)
    _save(info)
    return info


def down(directory: str | os.PathLike[str]) -> bool:
    """Stop what ``up`` started in ``directory`` (nothing else); False if nothing was running.
    The record stays, without process ids: the next ``up`` reuses the data and credentials."""
    info = load(directory)
    if info is None:
        return False
    was_running = _running(info.mlflow_pid) or _running(info.s3_pid)
    if _running(info.mlflow_pid):
        stop_process_group(info.mlflow_pid, MLFLOW_STOP_GRACE_S)
    if _running(info.s3_pid):
        stop_process_group(info.s3_pid, STOP_GRACE_S)
    info.mlflow_pid = info.s3_pid = 0
    _save(info)
    return was_running


def _health(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def status(directory: str | os.PathLike[str]) -> dict[str, bool] | None:
    """Which members answer; None if no stack was ever started in ``directory``."""
    info = load(directory)
    if info is None:
        return None
    return {"s3": _running(info.s3_pid), "mlflow": _running(info.mlflow_pid) and
            _health(info.mlflow_uri)}
