"""Warm step workers: run a step in a fork of a process that has already imported torch.

A pipeline task is a fresh Python process, and importing torch, gymnasium and MuJoCo costs about
3 s of a 2-core machine per task. ``mbpo run`` therefore starts one *step server* that imports
them once; each task's process (which imports only this stdlib module and kfp) hands its step to
the server over a private Unix socket, and the server forks a child to run it. The child gets
the task's environment and its stdout/stderr (passed as file descriptors), so logs, results and
failures look exactly as if the step had run in the task's own process.

Without ``MBPO_STEP_SERVER`` in the environment (every cluster pod) a step runs in-process. The
server parent never runs torch code itself, so every child starts from the same clean state.

A step of a local run dies with its run: the task process ends when the driver (``mbpo run``,
named by ``MBPO_DRIVER_PID``) is gone, and the forked child ends when its task process is. So a
killed run leaves no step behind that would go on writing the run's records and shards while a
resumed run redoes the same step (the fault campaign found such orphans).
"""

import importlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

SERVER_ENV = "MBPO_STEP_SERVER"
DRIVER_ENV = "MBPO_DRIVER_PID"
_ARTIFACT = "__artifact__"
_METRICS = "__metrics__"


class StepFailed(RuntimeError):
    """The step raised in the worker; its traceback is already in the task's log."""


# -- wire format: 4-byte length + JSON ---------------------------------------------------------
def _send(sock: socket.socket, obj: Any, fds: list[int] | None = None) -> None:
    data = json.dumps(obj).encode()
    header = struct.pack("!I", len(data))
    if fds:
        socket.send_fds(sock, [header], fds)
        sock.sendall(data)
    else:
        sock.sendall(header + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the step worker closed the connection")
        buf += chunk
    return buf


def _recv(sock: socket.socket, with_fds: int = 0) -> tuple[Any, list[int]]:
    fds: list[int] = []
    if with_fds:
        header, fds, _, _ = socket.recv_fds(sock, 4, with_fds)
        header += _recv_exact(sock, 4 - len(header))
    else:
        header = _recv_exact(sock, 4)
    (n,) = struct.unpack("!I", header)
    return json.loads(_recv_exact(sock, n)), fds


# -- client side (the KFP task process) ----------------------------------------------------------
def _encode(value: Any) -> Any:
    if hasattr(value, "log_metric"):
        return {_METRICS: True, "path": value.path, "uri": value.uri}
    if hasattr(value, "path") and hasattr(value, "uri"):
        return {_ARTIFACT: True, "path": value.path, "uri": value.uri}
    return value


def _exit_with_driver(poll_s: float = 0.5) -> None:
    """End this task process as soon as the local run's driver is gone (killed)."""
    pid = int(os.environ.get(DRIVER_ENV) or 0)
    if pid <= 0:
        return

    def watch() -> None:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(137)
            except PermissionError:  # alive, another user's: cannot be ours, stop watching
                return
            time.sleep(poll_s)
    threading.Thread(target=watch, name="driver-watch", daemon=True).start()


def _exit_with_client(conn: socket.socket) -> None:
    """In a forked child: end it when its task process closes the connection (killed)."""
    def watch() -> None:
        try:
            while conn.recv(1):  # the task sends nothing after its request: b"" is its end
                pass
        except OSError:
            pass
        os._exit(137)
    threading.Thread(target=watch, name="client-watch", daemon=True).start()


def run_step(op: str, **kwargs: Any) -> Any:
    """Run ``components.ops.<op>(**kwargs)``: on the warm server if one is set, else here."""
    _exit_with_driver()
    address = os.environ.get(SERVER_ENV)
    if not address:
        return getattr(importlib.import_module("components.ops"), op)(**kwargs)
    metrics = {k: v for k, v in kwargs.items() if hasattr(v, "log_metric")}
    request = {"op": op, "kwargs": {k: _encode(v) for k, v in kwargs.items()},
               "env": dict(os.environ), "cwd": os.getcwd()}
    sys.stdout.flush()
    sys.stderr.flush()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(address)
        _send(sock, request, [sys.stdout.fileno(), sys.stderr.fileno()])
        try:
            reply, _ = _recv(sock)
        except ConnectionError:
            raise StepFailed(f"step {op}: the worker process died (killed or crashed)") from None
    if not reply["ok"]:
        raise StepFailed(f"step {op} failed: {reply['error']}")
    for name, logged in reply["metrics"].items():  # KFP reads metrics from this process
        for metric, value in logged:
            metrics[name].log_metric(metric, value)
    result = reply["result"]
    return tuple(result) if isinstance(result, list) else result


# -- server side ---------------------------------------------------------------------------------
class _Recorder(SimpleNamespace):
    def log_metric(self, metric: str, value: float) -> None:
        self.logged.append((metric, value))


def _decode(value: Any, recorders: dict[str, _Recorder], name: str) -> Any:
    if isinstance(value, dict) and value.get(_METRICS):
        recorders[name] = _Recorder(path=value["path"], uri=value["uri"], logged=[])
        return recorders[name]
    if isinstance(value, dict) and value.get(_ARTIFACT):
        return SimpleNamespace(path=value["path"], uri=value["uri"])
    return value


def _serve_one(conn: socket.socket) -> None:
    """In the forked child: adopt the task's stdio and environment, run the step, reply."""
    request, fds = _recv(conn, with_fds=2)
    _exit_with_client(conn)
    for fd, target in zip(fds, (1, 2)):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.pop(SERVER_ENV, None)
    os.chdir(request["cwd"])
    recorders: dict[str, _Recorder] = {}
    kwargs = {k: _decode(v, recorders, k) for k, v in request["kwargs"].items()}
    try:
        ops = importlib.import_module("components.ops")
        result = getattr(ops, request["op"])(**kwargs)
        reply = {"ok": True, "result": result,
                 "metrics": {k: r.logged for k, r in recorders.items()}}
    except BaseException as e:  # report everything, the task decides
        traceback.print_exc()
        reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    sys.stdout.flush()
    sys.stderr.flush()
    _send(conn, reply)


def serve(address: str) -> None:
    """Import the heavy modules once, then fork a child per step request."""
    importlib.import_module("components.ops")
    try:  # steps of tracked runs log to MLflow: import it once here too
        importlib.import_module("mbpo_core.tracking")
        importlib.import_module("mlflow.tracking")
    except ImportError:
        pass
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically
    parent = os.getppid()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(address + ".tmp")
        os.replace(address + ".tmp", address)  # appears only once it is listening
        listener.listen(8)
        listener.settimeout(1.0)
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                if os.getppid() != parent:  # the driver is gone (even if killed): stop too
                    return
                continue
            conn.settimeout(None)
            if os.fork() == 0:
                code = 0
                try:
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    listener.close()
                    _serve_one(conn)
                except BaseException:
                    traceback.print_exc()
                    code = 1
                finally:
                    os._exit(code)
            conn.close()


class StepServer:
    """The warm server as a context manager: sets ``MBPO_STEP_SERVER`` for task processes."""

    def __init__(self, timeout_s: float = 120.0) -> None:
        self.timeout_s = timeout_s
        self.dir = Path(tempfile.mkdtemp(prefix="mbpo-steps-"))  # mode 0700: only this user
        self.address = str(self.dir / "steps.sock")
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "StepServer":
        # Same process group as the driver: a Ctrl-C or a kill of the group stops it too.
        self.process = subprocess.Popen([sys.executable, "-m", "components.worker", self.address])
        deadline = time.monotonic() + self.timeout_s
        while not os.path.exists(self.address):
            if self.process.poll() is not None:
                raise RuntimeError(f"the step server exited with code {self.process.returncode}")
            if time.monotonic() > deadline:
                self.__exit__()
                raise TimeoutError(f"the step server did not start in {self.timeout_s:.0f} s")
            time.sleep(0.05)
        os.environ[SERVER_ENV] = self.address
        return self

    def __exit__(self, *exc: object) -> None:
        os.environ.pop(SERVER_ENV, None)
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait()
        for p in self.dir.glob("*"):
            p.unlink(missing_ok=True)
        self.dir.rmdir()


if __name__ == "__main__":
    serve(sys.argv[1])
