"""MLflow tracking: one MLflow run per training run (the only module that imports mlflow).

A training run may span many processes (pipeline steps, chained pipeline runs, resumes), so
everything goes through ``MlflowClient`` by run id rather than mlflow's process-global active run:
``init_run`` (or ``mbpo train``) creates the run once and stores its id with the training run, and
every later step logs into it. Where KFP's MLflow integration already gives a process an
``MLFLOW_RUN_ID``, ``mbpo train`` logs into that run instead of creating one.

Tracking is best effort: if the tracking server cannot be reached, training goes on. The failure
is logged once, loudly; metrics, the final policy and the run's end are kept in a *pending*
folder (a local folder, or the run's object store, so that every step process of a pipeline
shares it) and sent as soon as the server answers again, checked at most every
``MBPO_TRACKING_RETRY_S`` seconds (default 30) with a quick /health probe, never with minutes of
client retries. What is still pending when training ends is sent later with ``mbpo sync``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import __version__
from .config import MBPOConfig
from .storage import ObjectStore

if TYPE_CHECKING:
    from .sac import Actor

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "mbpo"
# mlflow's client retries a dead server for minutes by default; tracking must not stall training
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
METRIC_NAMES = (
    "eval/return_mean", "eval/return_std", "model/train_loss", "model/holdout_mse",
    "model/elite_holdout_mse", "rollout/length", "rollout/model_buffer_size", "sac/critic_loss",
    "sac/actor_loss", "sac/alpha", "sac/entropy", "sac/q_mean",
)


def default_tracking_uri(workdir: str | os.PathLike[str] = ".") -> str:
    """``$MLFLOW_TRACKING_URI``, else the embedded default: a SQLite store in ``workdir``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


PENDING_DIR = "tracking-pending"  # under a train --out folder or a pipeline run's store URL
MAX_METRICS_PER_BATCH = 1000      # MLflow's log_batch limit


class TrackingError(RuntimeError):
    """The MLflow tracking server cannot be reached (found before any training starts)."""


def _probe(uri: str, timeout_s: float) -> None:
    """Raise OSError unless an HTTP tracking server answers /health (other stores: no probe)."""
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as r:
        if r.status != 200:
            raise OSError(f"HTTP {r.status}")


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """An HTTP tracking server must answer /health now, not after minutes of client retries."""
    try:
        _probe(uri, timeout_s)
    except OSError as e:
        raise TrackingError(f"the MLflow tracking server at {redact_uri(uri)} does not answer "
                            f"({e}); start it (e.g. `mbpo stack up`), fix --tracking-uri / "
                            "MLFLOW_TRACKING_URI, or pass --no-tracking") from None


TRACKING_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "databricks")
TRACKING_FORMS = ("http(s)://HOST[:PORT], sqlite:///FILE, file:///DIR, postgresql://, mysql://, "
                  "databricks or a local folder")


def check_tracking_uri(uri: str) -> str:
    """A usable tracking URI, else ConfigError naming it (credentials masked) and what is
    allowed. URIs with credentials are refused: they would land in parameters, logs and run
    records; servers that need auth get MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN from the
    environment instead."""
    from urllib.parse import urlsplit

    from .config import ConfigError

    shown = redact_uri(uri)
    if any(unicodedata.category(c) == "Cc" for c in uri):
        raise ConfigError(f"tracking URI {shown!r} has control characters; allowed "
                          f"{TRACKING_FORMS}")
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError as e:
        raise ConfigError(f"tracking URI {shown!r} is not a valid URI ({e}); allowed "
                          f"{TRACKING_FORMS}") from None
    if parts.password or parts.username:
        raise ConfigError(f"tracking URI {shown!r} has credentials in it; set "
                          "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or "
                          "MLFLOW_TRACKING_TOKEN) in the environment instead")
    if parts.scheme and parts.scheme not in TRACKING_SCHEMES:
        raise ConfigError(f"tracking URI {uri!r}: scheme {parts.scheme!r} is not supported; "
                          f"allowed {TRACKING_FORMS}")
    if parts.scheme in ("http", "https") and not parts.hostname:
        raise ConfigError(f"tracking URI {uri!r} has no host; allowed {TRACKING_FORMS}")
    return uri


def code_version() -> str:
    sha = os.environ.get("MBPO_GIT_COMMIT")
    if not sha:
        try:
            sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            sha = ""
    return f"{__version__}+{sha}" if sha else __version__


class DeterministicPolicy(nn.Module):
    """The actor's mean action, scaled to the env's bounds: what a deployed policy computes."""

    def __init__(self, actor: nn.Module, low: torch.Tensor, high: torch.Tensor) -> None:
        super().__init__()
        self.actor = actor
        self.register_buffer("low", low.float())
        self.register_buffer("high", high.float())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        mean, _ = self.actor.dist_params(obs)
        return self.low + (torch.tanh(mean) + 1.0) * 0.5 * (self.high - self.low)


class Tracker:
    """Logs into one MLflow run by id; every call is best effort (see the module docstring).

    ``pending``: where metrics wait while the server is down (``None``: they are lost, and the
    log says so). ``strict``: a record that can be neither sent nor kept raises, instead of being
    logged as lost: a pipeline step then fails before its record is written, and its redo sends
    the metrics again (the fault campaign found a SeaweedFS restarting during a `stack down`/`up`
    refusing the keep while the step's own writes, a moment later, succeeded).
    """

    def __init__(self, tracking_uri: str, run_id: str, pending: ObjectStore | None = None,
                 retry_s: float | None = None, strict: bool = False) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri, self.run_id, self.pending = tracking_uri, run_id, pending
        self.strict = strict
        self.client = MlflowClient(tracking_uri)
        self.retry_s = float(os.environ.get("MBPO_TRACKING_RETRY_S", "30")) if retry_s is None \
            else retry_s
        self._down_since: float | None = None  # monotonic time of the failure, while down
        self._last_probe = 0.0
        self._reported = False                  # the failure has been logged (once per process)
        self._pending_checked = False           # earlier processes' pending records looked for

    # -- creating or reopening ------------------------------------------------------------------
    @classmethod
    def create(cls, tracking_uri: str, cfg: MBPOConfig, *, experiment: str = DEFAULT_EXPERIMENT,
               run_name: str | None = None, tags: dict[str, str] | None = None,
               parent_run_id: str | None = None, artifact_location: str | None = None,
               pending: ObjectStore | None = None) -> Tracker:
        """A new MLflow run with the full resolved configuration as params."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(
            experiment, artifact_location=artifact_location)
        all_tags = {"task": cfg.env, "seed": str(cfg.seed), "code_version": code_version(),
                    "mlflow.source.name": "mbpo"} | (tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
        tracker = cls(tracking_uri, run.info.run_id, pending)
        tracker.log_config(cfg)
        log.info("MLflow run %s in experiment %r at %s", run.info.run_id, experiment,
                 redact_uri(tracking_uri))
        return tracker

    def reopen(self) -> None:
        """Mark a continued training run as running again."""
        self._guard("reopen the run", lambda: self.client.update_run(self.run_id, status="RUNNING"))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._guard("set tags", lambda: [self.client.set_tag(self.run_id, k, v)
                                         for k, v in tags.items()])

    # -- availability ---------------------------------------------------------------------------
    @property
    def down(self) -> bool:
        return self._down_since is not None

    def _available(self) -> bool:
        """Up, or down but answering a /health probe again (tried at most every retry_s)."""
        if self._down_since is None:
            return True
        now = time.monotonic()
        if now - self._last_probe < self.retry_s:
            return False
        self._last_probe = now
        try:
            _probe(self.tracking_uri, timeout_s=2.0)
        except OSError:
            return False
        log.warning("the MLflow tracking server at %s answers again after %.0f s",
                    redact_uri(self.tracking_uri), now - self._down_since)
        self._down_since, self._pending_checked = None, False
        return True

    def _fail(self, what: str, error: Exception) -> None:
        if not self._reported:
            kept = (f"metrics are kept in {self.pending.url} and sent when it answers again "
                    f"(or with `mbpo sync`)" if self.pending is not None else
                    "metrics from now on are not recorded in MLflow")
            log.error("MLflow tracking failed (%s at %s): %s; training continues, and %s", what,
                      redact_uri(self.tracking_uri), error, kept)
            self._reported = True
        self._down_since = self._last_probe = time.monotonic()

    def _guard(self, what: str, fn: Callable[[], Any]) -> Any:
        if not self._available():  # down: no call until a probe says it is back
            return None
        try:
            return fn()
        except Exception as e:
            self._fail(what, e)
            return None

    # -- pending records ------------------------------------------------------------------------
    def _keep(self, records: list[dict[str, Any]]) -> None:
        if self.pending is None or not records:
            return
        body = "".join(json.dumps(r) + "\n" for r in records).encode()
        try:
            self.pending.put(f"{time.time_ns():020d}-{os.getpid()}.jsonl", body)
        except Exception as e:  # in-process training goes on; a pipeline step fails (strict)
            if self.strict:
                raise
            log.error("could not keep %d tracking records in %s: %s", len(records),
                      self.pending.url, e)

    def _send_pending(self) -> int:
        """Send what this or an earlier process kept while the server was down; records count."""
        if self.pending is None or self._pending_checked:
            return 0
        keys = self.pending.list()
        if keys:  # an earlier step found the server down: a quick probe, not the client's retries
            _probe(self.tracking_uri, timeout_s=2.0)
        sent = send_pending(self.pending, self.client, self.run_id, self.tracking_uri, keys=keys)
        self._pending_checked = True
        if sent:
            log.info("sent %d tracking records kept while MLflow was down", sent)
        return sent

    def _record(self, record: Callable[[], dict[str, Any]], what: str,
                send: Callable[[], Any]) -> Any:
        """Send (pending records first) and return what ``send`` returns; or keep ``record()``
        for later and return None."""
        if self._available():
            try:
                self._send_pending()
                return send()
            except Exception as e:
                self._fail(what, e)
        self._keep([record() | {"run_id": self.run_id, "uri": self.tracking_uri}])
        return None

    def log_config(self, cfg: MBPOConfig) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in sorted(cfg.flat().items())]

        def log_params() -> None:
            for i in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[i:i + 100])
            self.client.log_text(self.run_id, cfg.to_json(), "config.json")
        self._guard("log the configuration", log_params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import math

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        finite = {k: float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and math.isfinite(v)}
        batch = [Metric(k, v, now, step) for k, v in finite.items()]
        self._record(lambda: {"step": int(step), "timestamp": now, "metrics": finite},
                     "log metrics", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def log_curve(self, curve: list[list[float]], title: str) -> None:
        """The learning curve as learning_curve.png (replaced every round)."""
        if not curve:
            return
        self._guard("log the learning curve", lambda: self.client.log_image(
            self.run_id, curve_png(curve, title), artifact_file="learning_curve.png"))

    def log_policy(self, actor: Actor, low: torch.Tensor, high: torch.Tensor,
                   registered_name: str | None) -> str | None:
        """The deterministic policy as an MLflow model (see :func:`_log_policy_model`); while the
        server is down, its weights are kept with the pending records and it is logged when they
        are sent. Returns the model URI if it was logged now. A non-CPU ``actor`` is logged
        from its CPU copy (:func:`mbpo_core.sac.cpu_actor`)."""
        from .sac import host_actor

        actor = host_actor(actor)

        def keep() -> dict[str, Any]:
            lost = "MLflow is down: the final policy is not logged there (it is in the run's " \
                   "outputs: policy.pt)"
            if self.pending is None:
                log.error(lost)
                return {}
            key = f"{time.time_ns():020d}-{os.getpid()}-policy.pt"
            buf = io.BytesIO()
            torch.save(actor.state_dict(), buf)
            try:
                self.pending.put(key, buf.getvalue())
            except Exception as e:  # the store failing too must not stop the run's end either
                log.error("%s; keeping it in %s failed: %s", lost, self.pending.url, e)
                return {}
            log.error("MLflow is down: the final policy is not logged there yet; it is kept in "
                      "%s and logged when the pending records are sent", self.pending.url)
            return {"policy": {"state": key, "arch": actor.arch, "low": low.tolist(),
                               "high": high.tolist(), "registered_name": registered_name}}
        return self._record(keep, "log the policy model", lambda: _log_policy_model(
            self.tracking_uri, self.run_id, actor, low, high, registered_name))

    def log_file(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self._guard(f"log {Path(path).name}",
                    lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def finish(self, status: str = "FINISHED") -> None:
        """End the run; while the server is down the end is kept with the pending metrics."""
        self._record(lambda: {"status": status}, "end the run",
                     lambda: self.client.set_terminated(self.run_id, status))
        if self.down and self.pending is not None:
            log.error("the MLflow server at %s is still down: this run's remaining metrics and "
                      "its end are kept in %s; send them with `mbpo sync %s`",
                      redact_uri(self.tracking_uri), self.pending.url,
                      self.pending.url.rsplit("/", 1)[0])


def _log_policy_model(tracking_uri: str, run_id: str, actor: Actor, low: torch.Tensor,
                      high: torch.Tensor, registered_name: str | None) -> str:
    """Log the deterministic policy in torch.export format (loading it runs no pickle), with
    signature and input example, registered under ``registered_name``; returns its model URI."""
    import mlflow
    import numpy as np

    from .sac import host_actor

    # all on the CPU: the input example and the bounds are CPU tensors, and the logged weights
    # must load on a machine without CUDA
    policy = DeterministicPolicy(host_actor(actor), low.cpu(), high.cpu()).eval()
    # batch of 2: torch.export keeps a size-1 dimension static, and the batch must not be
    example = np.zeros((2, actor.arch["obs_dim"]), dtype=np.float32)
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            policy, name="policy", input_example=example, serialization_format="pt2",
            registered_model_name=registered_name or None,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    return info.model_uri


def _kept_actor(pending: ObjectStore, kept: dict[str, Any]) -> Actor:
    from .sac import Actor

    actor = Actor(**kept["arch"], generator=torch.Generator())
    state = torch.load(io.BytesIO(pending.get(kept["state"])), weights_only=True, map_location="cpu")
    actor.load_state_dict(state)
    return actor


def send_pending(pending: ObjectStore, client: Any = None, run_id: str | None = None,
                 tracking_uri: str | None = None, keys: list[str] | None = None) -> int:
    """Send kept records (oldest first) and delete each object once sent. ``run_id`` limits it
    to one run; ``client`` (else one for ``tracking_uri``, else for each record's own URI) is
    where they go; ``keys``: the pending objects if already listed. Raises the client's error if
    the server fails again (the rest stays kept)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    clients: dict[str, Any] = {}
    sent = 0
    for key in pending.list() if keys is None else keys:
        if not key.endswith(".jsonl"):  # kept policy weights go with the record naming them
            continue
        records = [json.loads(line) for line in pending.get(key).decode().splitlines()
                   if line.strip()]
        if run_id is not None and any(r["run_id"] != run_id for r in records):
            continue
        for r in records:
            uri = tracking_uri or r["uri"]
            if client is None and uri not in clients:
                clients[uri] = MlflowClient(uri)
            c = client or clients[uri]
            if "metrics" in r:
                batch = [Metric(k, v, r["timestamp"], r["step"]) for k, v in r["metrics"].items()]
                for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
                    c.log_batch(r["run_id"], metrics=batch[i:i + MAX_METRICS_PER_BATCH])
            if "policy" in r:
                p = r["policy"]
                model_uri = _log_policy_model(uri, r["run_id"], _kept_actor(pending, p),
                                              torch.tensor(p["low"]), torch.tensor(p["high"]),
                                              p["registered_name"])
                log.info("logged the kept policy to MLflow as %s", model_uri)
            if "status" in r:
                c.set_terminated(r["run_id"], r["status"])
        pending.delete(key)  # the record first: a kept policy is never deleted before it is sent
        for r in records:
            if "policy" in r:
                pending.delete(r["policy"]["state"])
        sent += len(records)
    return sent


def curve_png(curve: list[list[float]], title: str) -> Any:
    """A PIL image of eval return (mean +- std) against env steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    data = np.asarray(curve, dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    ax.plot(data[:, 0], data[:, 1], marker="o", ms=3)
    ax.fill_between(data[:, 0], data[:, 1] - data[:, 2], data[:, 1] + data[:, 2], alpha=0.2)
    ax.set_xlabel("env steps")
    ax.set_ylabel("eval return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def redact_uri(uri: str) -> str:
    """``uri`` as it may be printed or logged: any user:password@ part masked (a regex, not a
    URL parser, so that malformed URIs are masked too)."""
    return re.sub(r"(//)[^/?#]*@", r"\1***@", uri)



# -- reading runs back (mbpo runs / mbpo compare) ---------------------------------------------
def list_runs(tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT) -> list[dict[str, Any]]:
    """One row per MLflow run of ``experiment``: task, seed, steps, last and best return, wall."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    rows = []
    for run in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"],
                                  max_results=1000):
        history = client.get_metric_history(run.info.run_id, "eval/return_mean")
        history.sort(key=lambda m: m.step)
        end = run.info.end_time or int(time.time() * 1000)
        rows.append({
            "run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
            "task": run.data.tags.get("task", ""), "seed": run.data.tags.get("seed", ""),
            "steps": history[-1].step if history else 0,
            "last_return": history[-1].value if history else None,
            "best_return": max(m.value for m in history) if history else None,
            "wall_s": (end - run.info.start_time) / 1000.0,
        })
    return rows


def eval_curve(tracking_uri: str, run_ref: str, experiment: str = DEFAULT_EXPERIMENT
               ) -> tuple[str, list[tuple[int, float]]]:
    """(label, [(env steps, eval return)]) of a run given by id or by name."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run = None
    try:
        run = client.get_run(run_ref)
    except Exception:  # not an id: look it up by name
        exp = client.get_experiment_by_name(experiment)
        found = client.search_runs([exp.experiment_id], f"attributes.run_name = '{run_ref}'",
                                   max_results=1) if exp else []
        run = found[0] if found else None
    if run is None:
        from .config import ConfigError

        raise ConfigError(f"no MLflow run with id or name {run_ref!r} in experiment {experiment!r}")
    history = sorted(client.get_metric_history(run.info.run_id, "eval/return_mean"),
                     key=lambda m: m.step)
    label = f"{run.info.run_name} ({run.data.tags.get('task', '?')}, seed {run.data.tags.get('seed', '?')})"
    return label, [(m.step, m.value) for m in history]
