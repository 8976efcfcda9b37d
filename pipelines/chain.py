"""Chaining pipeline runs into one training run: where it stands and what the next run gets.

The run's object store is the single source of truth: the last complete round (see
:mod:`mbpo_core.runstore`) says how far training got and which artifacts to import, so a chain
continues the same way after a planned pipeline-run boundary, a crash, or a stop by hand.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mbpo_core.config import ConfigError, MBPOConfig, make_config
from mbpo_core.runstore import RunStore
from mbpo_core.steps import round_env_steps
from mbpo_core.storage import StorageError, open_store

log = logging.getLogger(__name__)

# 10 rounds = 52 tasks and about 200 KB of compiled spec (about 19.5 KB per round, measured);
# the Argo Workflow object is about 2.85x that, far inside etcd's 1.5 MiB object limit.
DEFAULT_ROUNDS_PER_RUN = 10
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class TrainingRun:
    """One training run: a configuration, a step budget and a home in object storage."""

    env: str
    seed: int
    overrides: list[str]
    total_steps: int
    run_url: str
    device: str = "cpu"
    tracking_uri: str = ""          # MLflow; empty = not tracked
    mlflow_experiment: str = "mbpo"
    registered_model: str = ""      # Model Registry name for the final policy; empty = none
    parent_run_id: str = ""         # MLflow parent run (a multi-seed group); empty = none
    config: MBPOConfig = field(init=False)

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ConfigError(f"--total-steps {self.total_steps} must be >= 1")
        self.config = make_config(self.env, self.overrides, seed=self.seed)

    @property
    def store(self) -> RunStore:
        return RunStore(self.run_url)

    def base_arguments(self) -> dict[str, Any]:
        return {"env": self.env, "seed": self.seed, "overrides": list(self.overrides),
                "run_url": self.run_url, "total_steps": self.total_steps, "device": self.device,
                "tracking_uri": self.tracking_uri, "mlflow_experiment": self.mlflow_experiment,
                "registered_model": self.registered_model, "parent_run_id": self.parent_run_id}


def default_run_name(env: str, seed: int) -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    return f"{env.lower()}-s{seed}-{stamp}"


RUN_NAME_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"


def check_run_name(name: str) -> str:
    """A run name is one safe object-key and path component: no '/', '..', spaces or newlines."""
    if not _NAME.fullmatch(name):
        raise ConfigError(f"--run-name {name!r}: allowed {RUN_NAME_RULE}")
    return name


def new_run(env: str, seed: int, overrides: list[str], total_steps: int, store_url: str,
            run_name: str | None = None, device: str = "cpu") -> TrainingRun:
    """A fresh training run under ``<store>/runs/<name>``; refuses to reuse a started run."""
    name = check_run_name(run_name or default_run_name(env, seed))
    run = TrainingRun(env, seed, list(overrides), total_steps,
                      open_store(store_url).uri(f"runs/{name}"), device)
    if run.store.store.exists("run.json"):
        raise ConfigError(f"a run named {name!r} already exists at {run.run_url}; continue it with "
                          f"--resume-from {run.run_url} or pick another --run-name")
    return run


def resolve_run_url(ref: str | Path) -> str:
    """A run URL, or a local output folder whose run.json names one."""
    pointer = Path(ref) / "run.json"
    if pointer.is_file():
        data = json.loads(pointer.read_text())
        if "run_url" in data:  # an output folder of `mbpo run`, not the run's own store
            return data["run_url"]
    return str(ref)


def existing_run(ref: str | Path, total_steps: int | None = None, device: str = "cpu"
                 ) -> TrainingRun:
    """The stored run at ``ref``, to continue (optionally with a new step budget)."""
    url = resolve_run_url(ref)
    info = RunStore(url).read_info()
    if info is None:
        raise StorageError(f"--resume-from {url}: no run there (run.json is missing)")
    return TrainingRun(info["env"], int(info["seed"]), list(info.get("overrides", [])),
                       total_steps or int(info["total_steps"]), url, device)


def rounds_left(cfg: MBPOConfig, env_steps: int, total_steps: int) -> int:
    n = 0
    while env_steps < total_steps:
        env_steps += round_env_steps(cfg, env_steps, total_steps)
        n += 1
    return n


@dataclass(frozen=True)
class NextRun:
    rounds: int
    resume: bool
    arguments: dict[str, Any]


def next_run(run: TrainingRun, max_rounds: int) -> NextRun | None:
    """The next pipeline run of a chain, or None when training is done."""
    ckpt = run.store.checkpoint()
    env_steps = ckpt.env_steps if ckpt else 0
    left = rounds_left(run.config, env_steps, run.total_steps)
    if left == 0:
        return None
    args = run.base_arguments()
    if ckpt is not None:
        args |= {"start_env_steps": ckpt.env_steps, "last_round": ckpt.round,
                 **{f"{name}_uri": uri for name, uri in ckpt.artifacts.items()}}
        log.info("continuing %s from round %d (%d env steps)", run.run_url, ckpt.round,
                 ckpt.env_steps)
    return NextRun(min(left, max_rounds), ckpt is not None, args)


def summary(run: TrainingRun, wall_s: float | None = None) -> dict[str, Any]:
    """The same summary ``mbpo train`` writes, read from the run's records."""
    store = run.store
    ckpt = store.checkpoint()
    curve = store.curve()
    return {"env": run.env, "seed": run.seed, "env_steps": ckpt.env_steps if ckpt else 0,
            "eval_return": curve[-1][1] if curve else None, "curve": curve, "wall_s": wall_s,
            "run_url": run.run_url}
