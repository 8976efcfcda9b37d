"""MLflow tracking: one MLflow run per training run (the only module that imports mlflow).

A training run may span many processes (pipeline steps, chained pipeline runs, resumes), so
everything goes through ``MlflowClient`` by run id rather than mlflow's process-global active run:
``init_run`` (or ``mbpo train``) creates the run once and stores its id with the training run, and
every later step logs into it. Where KFP's MLflow integration already gives a process an
``MLFLOW_RUN_ID``, ``mbpo train`` logs into that run instead of creating one.

Tracking is best effort: if the tracking server cannot be reached, training goes on and the
failure is logged once per process, loudly, with what was not recorded.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .config import MBPOConfig

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


class TrackingError(RuntimeError):
    """The MLflow tracking server cannot be reached (found before any training starts)."""


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """An HTTP tracking server must answer /health now, not after minutes of client retries."""
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as r:
            if r.status == 200:
                return
            raise OSError(f"HTTP {r.status}")
    except OSError as e:
        raise TrackingError(f"the MLflow tracking server at {_redact(uri)} does not answer "
                            f"({e}); start it (e.g. `mbpo stack up`), fix --tracking-uri / "
                            "MLFLOW_TRACKING_URI, or pass --no-tracking") from None


def check_tracking_uri(uri: str) -> str:
    """Refuse URIs with embedded credentials: they would land in parameters, logs and run
    records. Servers that need auth get MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN from the
    environment instead."""
    from urllib.parse import urlsplit

    from .config import ConfigError

    parts = urlsplit(uri)
    if parts.password or parts.username:
        raise ConfigError(f"tracking URI {_redact(uri)!r} has credentials in it; set "
                          "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or "
                          "MLFLOW_TRACKING_TOKEN) in the environment instead")
    if parts.scheme not in ("http", "https", "sqlite", "file", "postgresql", "mysql",
                            "databricks", ""):
        raise ConfigError(f"tracking URI {uri!r}: scheme {parts.scheme!r} is not supported")
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
    """Logs into one MLflow run by id; every call is best effort (see the module docstring)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.client = MlflowClient(tracking_uri)
        self._failed = False

    # -- creating or reopening ------------------------------------------------------------------
    @classmethod
    def create(cls, tracking_uri: str, cfg: MBPOConfig, *, experiment: str = DEFAULT_EXPERIMENT,
               run_name: str | None = None, tags: dict[str, str] | None = None,
               parent_run_id: str | None = None, artifact_location: str | None = None) -> Tracker:
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
        tracker = cls(tracking_uri, run.info.run_id)
        tracker.log_config(cfg)
        log.info("MLflow run %s in experiment %r at %s", run.info.run_id, experiment,
                 _redact(tracking_uri))
        return tracker

    def reopen(self) -> None:
        """Mark a continued training run as running again."""
        self._guard("reopen the run", lambda: self.client.update_run(self.run_id, status="RUNNING"))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._guard("set tags", lambda: [self.client.set_tag(self.run_id, k, v)
                                         for k, v in tags.items()])

    # -- logging ------------------------------------------------------------------------------
    def _guard(self, what: str, fn: Callable[[], Any]) -> Any:
        if self._failed:  # one failure: stop trying, so a dead server cannot stall training
            return None
        try:
            return fn()
        except Exception as e:
            if not self._failed:
                log.error("MLflow tracking failed (%s at %s): %s; training continues, and this "
                          "process records nothing more in MLflow", what,
                          _redact(self.tracking_uri), e)
            self._failed = True
            return None

    def log_config(self, cfg: MBPOConfig) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in sorted(cfg.flat().items())]

        def log() -> None:
            for i in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[i:i + 100])
            self.client.log_text(self.run_id, cfg.to_json(), "config.json")
        self._guard("log the configuration", log)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import math

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(v)]
        self._guard("log metrics", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def log_curve(self, curve: list[list[float]], title: str) -> None:
        """The learning curve as learning_curve.png (replaced every round)."""
        if not curve:
            return
        self._guard("log the learning curve", lambda: self.client.log_image(
            self.run_id, curve_png(curve, title), artifact_file="learning_curve.png"))

    def log_policy(self, actor: nn.Module, obs_dim: int, low: torch.Tensor, high: torch.Tensor,
                   registered_name: str | None) -> str | None:
        """The deterministic policy as an MLflow model (torch.export format: loading it runs no
        pickle), with signature and input example; registered under ``registered_name``."""
        import mlflow
        import numpy as np

        policy = DeterministicPolicy(actor, low, high).eval()
        # batch of 2: torch.export keeps a size-1 dimension static, and the batch must not be
        example = np.zeros((2, obs_dim), dtype=np.float32)

        def log() -> str:
            mlflow.set_tracking_uri(self.tracking_uri)
            with mlflow.start_run(run_id=self.run_id):
                info = mlflow.pytorch.log_model(
                    policy, name="policy", input_example=example, serialization_format="pt2",
                    registered_model_name=registered_name or None,
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
            return info.model_uri
        return self._guard("log the policy model", log)

    def log_file(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self._guard(f"log {Path(path).name}",
                    lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def finish(self, status: str = "FINISHED") -> None:
        self._guard("end the run", lambda: self.client.set_terminated(self.run_id, status))


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


def _redact(uri: str) -> str:
    """A tracking URI without any user:password part, for logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return uri



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
