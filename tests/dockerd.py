"""A real Docker engine for the test session: the one that answers already, or one started here.

Started here means Debian's dockerd as root with loopback-only networking (no iptables, no
bridge: containers use the host network) on its own socket, with the default data root so that
image layers are cached between sessions; it is stopped when the session ends.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from pipelines.s3server import process_alive, stop_process_group


class EngineUnavailable(RuntimeError):
    """No engine answers and none can be started here; the message says why."""


def answers(env: dict[str, str] | None = None) -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30,
                              env=env).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


def _install_docker_io() -> None:
    for cmd in (["apt-get", "install", "-y", "-q", "docker.io"], ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "docker.io"]):
        if subprocess.run(cmd, capture_output=True).returncode == 0 and shutil.which("dockerd"):
            return


class Dockerd:
    def __init__(self, proc: subprocess.Popen | None, host: str, run_dir: Path | None) -> None:
        self.proc, self.host, self.run_dir = proc, host, run_dir

    @classmethod
    def start(cls, timeout_s: float = 60) -> Dockerd:
        """The engine DOCKER_HOST (or the default socket) names if it answers, else a new one."""
        if answers():
            return cls(None, os.environ.get("DOCKER_HOST", ""), None)
        if os.getuid() != 0:
            raise EngineUnavailable("no Docker engine answers, and starting dockerd needs root")
        if not shutil.which("dockerd"):
            _install_docker_io()
            if not shutil.which("dockerd"):
                raise EngineUnavailable("no Docker engine answers, and Debian's docker.io "
                                        "(dockerd) could not be installed")
        if not shutil.which("docker"):
            raise EngineUnavailable("no docker client on PATH")
        run_dir = Path(tempfile.mkdtemp(prefix="mbpo-dockerd-"))  # short: a socket path
        host = f"unix://{run_dir}/docker.sock"
        log = open(run_dir / "dockerd.log", "ab")
        proc = subprocess.Popen(
            ["dockerd", "--iptables=false", "--ip-forward=false", "--bridge=none",
             "--storage-driver=overlay2", f"--host={host}", f"--pidfile={run_dir}/dockerd.pid",
             f"--exec-root={run_dir}/exec"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        engine = cls(proc, host, run_dir)
        deadline = time.monotonic() + timeout_s
        while not answers(os.environ | {"DOCKER_HOST": host}):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (run_dir / "dockerd.log").read_text(errors="replace")[-2000:]
                engine.stop()
                raise EngineUnavailable(f"dockerd did not start:\n{tail}")
            time.sleep(0.5)
        return engine

    def stop(self) -> None:
        if self.proc is None:
            return
        if process_alive(self.proc.pid):
            stop_process_group(self.proc.pid, grace_s=20)
        self.proc.wait()
        # dockerd bind-mounts the host's network namespace under its exec root and may leave it
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1] for line in f if line.split()[1].startswith(str(self.run_dir))]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)
