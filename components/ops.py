"""What each pipeline step does between its artifacts and ``mbpo_core``: load, call, save, record.

The KFP component definitions (``components.definitions``) only forward their arguments here, so
this module is plain Python (no kfp import) and runs the same in a ``kfp.local`` subprocess, in a
cluster pod, or in a test. Artifacts are duck-typed: anything with ``.path`` and ``.uri`` (and
``.log_metric`` for metrics) works.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from mbpo_core.config import ConfigError, MBPOConfig, make_config
from mbpo_core.envs import ENV_SPECS
from mbpo_core.runstore import RunStore
from mbpo_core.runtime import tune_allocator
from mbpo_core.sac import Actor, cpu_actor, host_actor
from mbpo_core.shards import ShardCache, ShardManifest, write_shard
from mbpo_core.state import load_state, save_state
from mbpo_core.steps import (
    Agent,
    Collector,
    Dynamics,
    collect_metrics,
    collect_round,
    eval_metrics,
    evaluate,
    fit_ensemble,
    fit_metrics,
    generator_from_state,
    imagine_metrics,
    imagine_round,
    make_generator,
    sac_metrics,
    sac_updates_per_round,
    stream_seeds,
    update_sac,
)

log = logging.getLogger("mbpo.components")


class ArtifactLike(Protocol):
    path: str
    uri: str


class MetricsLike(ArtifactLike, Protocol):
    def log_metric(self, metric: str, value: float) -> None: ...


def _setup() -> float:
    """Per-process settings every step applies first; returns the start time."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=os.environ.get("MBPO_LOG_LEVEL", "INFO"),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tune_allocator()
    threads = os.environ.get("MBPO_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    return time.perf_counter()


def _config(config: ArtifactLike) -> MBPOConfig:
    return MBPOConfig.from_dict(json.loads(Path(config.path).read_text()))


def _save(state: dict[str, Any], artifact: ArtifactLike) -> None:
    save_state(state, artifact.path)


def _manifest(artifact: ArtifactLike) -> ShardManifest:
    return ShardManifest.load(artifact.path)


def _actor(cfg: MBPOConfig, policy: ArtifactLike, device: str = "cpu") -> Actor:
    spec = ENV_SPECS[cfg.env]
    # in the training precision, as `mbpo train` acts with its training actor: same results
    actor = Actor(spec.obs_dim, spec.act_dim, cfg.sac.hidden_size, cfg.sac.num_hidden_layers,
                  torch.Generator(), cfg.sac.precision)
    actor.load_state_dict(load_state(policy.path, device))
    return actor.to(device)


def _tracker(run: RunStore, info: dict[str, Any] | None = None):  # noqa: ANN202 (Tracker | None)
    """The training run's MLflow run, if it is tracked (run.json says where)."""
    info = info if info is not None else run.read_info()
    tracking = (info or {}).get("tracking") or {}
    if not tracking.get("run_id"):
        return None
    from mbpo_core.tracking import PENDING_DIR, Tracker

    # kept in the run's store while MLflow is down: the next step (or `mbpo sync`) sends them
    return Tracker(tracking["uri"], tracking["run_id"], pending=run.store.child(PENDING_DIR),
                   strict=True)


def _finish(run: RunStore, step: str, round_index: int, env_steps: int, metrics: dict[str, float],
            started: float, artifacts: dict[str, ArtifactLike], out: MetricsLike) -> None:
    """Report a step: its timing, KFP metrics, MLflow, and the run record naming its outputs."""
    metrics = metrics | {f"time/{step}_s": time.perf_counter() - started}
    for name, value in metrics.items():
        if math.isfinite(value):
            out.log_metric(name, float(value))
    tracker = _tracker(run)
    if tracker is not None and run.has_record(round_index, step):
        # a step redone after a failure: its first attempt sent (or kept) these metrics before
        # writing its record, and the values are the same; MLflow gets each point once
        log.info("round %d %s: metrics already in MLflow from an earlier attempt", round_index,
                 step)
    elif tracker is not None:
        tracker.log_metrics(metrics, env_steps)
    run.write_record(round_index, step, env_steps, metrics, {k: a.uri for k, a in artifacts.items()})
    log.info("round %d %s done in %.1f s (env_steps %d)", round_index, step,
             metrics[f"time/{step}_s"], env_steps)


# --------------------------------------------------------------------------------------------
def init_run(env: str, seed: int, overrides: list[str], run_url: str, total_steps: int,
             config: ArtifactLike, tracking_uri: str = "", experiment: str = "mbpo",
             tags: dict[str, str] | None = None, parent_run_id: str = "",
             registered_model: str = "") -> None:
    """Validate everything before any step runs; create (or check) the run's storage prefix;
    create the training run's MLflow run, or reopen it when continuing. The registry name is
    kept with the run, so that a resume registers the policy where the run began."""
    _setup()
    cfg = make_config(env, overrides, seed=seed)
    if total_steps < 1:
        raise ConfigError(f"total_steps = {total_steps} must be >= 1")
    if tracking_uri:
        from mbpo_core.tracking import check_reachable, check_tracking_uri

        check_tracking_uri(tracking_uri)
        check_reachable(tracking_uri)
    run = RunStore(run_url)
    run.store.check()
    info = run.read_info()
    if info is None:
        run.write_info(cfg, total_steps, overrides)
        info = run.read_info()
    elif MBPOConfig.from_dict(info["config"]) != cfg:  # fields added since: their defaults
        stored = MBPOConfig.from_dict(info["config"]).flat()
        diff = {k: (stored.get(k), v) for k, v in cfg.flat().items() if stored.get(k) != v}
        raise ConfigError(f"{run_url} holds a run with another configuration; differing fields "
                          f"(stored, given): {diff}")
    Path(config.path).parent.mkdir(parents=True, exist_ok=True)
    Path(config.path).write_text(cfg.to_json())
    tags = {k: v for k, v in (tags or {}).items() if v}
    tracker = _tracker(run, info)
    if tracker is not None:
        tracker.reopen()
        tracker.set_tags(tags)
    elif tracking_uri:
        from mbpo_core.tracking import Tracker

        name = run_url.rstrip("/").rsplit("/", 1)[-1]
        tracker = Tracker.create(tracking_uri, cfg, experiment=experiment, run_name=name,
                                 tags=tags | {"mbpo.run_url": run_url},
                                 parent_run_id=parent_run_id or None)
        run.update_info(tracking={"uri": tracking_uri, "run_id": tracker.run_id,
                                  "experiment": experiment, "registered_model": registered_model})
    log.info("run %s: %s seed %d, %d env steps", run_url, cfg.env, cfg.seed, total_steps)


def init_states(config: ArtifactLike, collector: ArtifactLike, dynamics: ArtifactLike,
                agent: ArtifactLike, policy: ArtifactLike, rollout: ArtifactLike,
                real_manifest: ArtifactLike, model_manifest: ArtifactLike) -> None:
    """The states of a fresh run, built exactly as the in-process trainer builds them."""
    _setup()
    cfg = _config(config)
    spec = ENV_SPECS[cfg.env]
    fresh_agent = Agent(cfg)
    _save(Collector(cfg).state_dict(), collector)
    _save(Dynamics(cfg).state_dict(), dynamics)
    _save(fresh_agent.state_dict(), agent)
    _save(cpu_actor(fresh_agent.actor).state_dict(), policy)
    _save({"generator": make_generator(stream_seeds(cfg.seed)["rollout"]).get_state()}, rollout)
    ShardManifest(spec.obs_dim, spec.act_dim, cfg.real_buffer_size).save(real_manifest.path)
    ShardManifest(spec.obs_dim, spec.act_dim,
                  cfg.model_buffer_capacity(cfg.rollout_length(0))).save(model_manifest.path)


def collect(config: ArtifactLike, collector_in: ArtifactLike, policy: ArtifactLike,
            real_manifest_in: ArtifactLike, run_url: str, total_steps: int, env_steps: int,
            prev_round: int, collector_out: ArtifactLike, real_manifest_out: ArtifactLike,
            metrics: MetricsLike) -> tuple[int, int]:
    """Real env steps with the current policy; the new rows become one shard."""
    started = _setup()
    cfg, run, round_index = _config(config), RunStore(run_url), prev_round + 1
    collector = Collector.from_state_dict(cfg, load_state(collector_in.path))
    res = collect_round(cfg, collector, _actor(cfg, policy), env_steps, total_steps)
    manifest = _manifest(real_manifest_in)
    manifest.add(write_shard(run.store, "real", round_index, res.rows))
    env_steps += res.rows.shape[0]
    _save(collector.state_dict(), collector_out)
    manifest.save(real_manifest_out.path)
    _finish(run, "collect", round_index, env_steps, collect_metrics(res, manifest.size), started,
            {"collector": collector_out, "real_manifest": real_manifest_out}, metrics)
    return env_steps, round_index


def fit_ensemble_step(config: ArtifactLike, dynamics_in: ArtifactLike, real_manifest: ArtifactLike,
                      run_url: str, round_index: int, env_steps: int, device: str,
                      dynamics_out: ArtifactLike, metrics: MetricsLike) -> None:
    """Refit the dynamics ensemble on all real data, warm-started from the last fit."""
    started = _setup()
    cfg = _config(config)
    dynamics = Dynamics.from_state_dict(cfg, load_state(dynamics_in.path, device), device)
    real = _manifest(real_manifest).to_buffer(device, ShardCache())
    fit = fit_ensemble(dynamics, real)
    _save(dynamics.state_dict(), dynamics_out)
    _finish(RunStore(run_url), "fit_ensemble", round_index, env_steps, fit_metrics(fit), started,
            {"dynamics": dynamics_out}, metrics)


def imagine_step(config: ArtifactLike, dynamics: ArtifactLike, policy: ArtifactLike,
                 real_manifest: ArtifactLike, model_manifest_in: ArtifactLike,
                 rollout_in: ArtifactLike, run_url: str, round_index: int, env_steps: int,
                 device: str, model_manifest_out: ArtifactLike, rollout_out: ArtifactLike,
                 metrics: MetricsLike) -> None:
    """Branched model rollouts from real start states; the imagined rows become one shard."""
    started = _setup()
    cfg, run = _config(config), RunStore(run_url)
    dyn = Dynamics.from_state_dict(cfg, load_state(dynamics.path, device), device)
    real = _manifest(real_manifest).to_buffer(device, ShardCache())
    generator = generator_from_state(load_state(rollout_in.path)["generator"], device)
    dream = imagine_round(cfg, dyn, _actor(cfg, policy, device), real, env_steps, generator)
    manifest = _manifest(model_manifest_in)
    manifest.resize(cfg.model_buffer_capacity(dream.rollout_length))
    manifest.add(write_shard(run.store, "model", round_index, dream.rows))
    manifest.save(model_manifest_out.path)
    _save({"generator": generator.get_state()}, rollout_out)
    _finish(run, "imagine", round_index, env_steps, imagine_metrics(dream, manifest.size), started,
            {"model_manifest": model_manifest_out, "rollout": rollout_out}, metrics)


def update_sac_step(config: ArtifactLike, agent_in: ArtifactLike, real_manifest: ArtifactLike,
                    model_manifest: ArtifactLike, run_url: str, round_index: int, env_steps: int,
                    device: str, agent_out: ArtifactLike, policy_out: ArtifactLike,
                    metrics: MetricsLike) -> None:
    """SAC updates on mixed real/imagined batches."""
    started = _setup()
    cfg, cache = _config(config), ShardCache()
    agent = Agent.from_state_dict(cfg, load_state(agent_in.path, device), device)
    real = _manifest(real_manifest).to_buffer(device, cache)
    model_data = _manifest(model_manifest).to_buffer(device, cache)
    stats = update_sac(cfg, agent, real, model_data, sac_updates_per_round(cfg))
    _save(agent.state_dict(), agent_out)
    _save(cpu_actor(agent.actor).state_dict(), policy_out)  # CPU tensors, whatever the device
    _finish(RunStore(run_url), "update_sac", round_index, env_steps, sac_metrics(stats), started,
            {"agent": agent_out, "policy": policy_out}, metrics)


def evaluate_step(config: ArtifactLike, policy: ArtifactLike, run_url: str, round_index: int,
                  env_steps: int, metrics: MetricsLike) -> float:
    """Deterministic-policy returns; its record marks the round complete."""
    started = _setup()
    cfg = _config(config)
    mean, std, _ = evaluate(cfg, _actor(cfg, policy), env_steps)
    run = RunStore(run_url)
    _finish(run, "evaluate", round_index, env_steps, eval_metrics(mean, std), started, {}, metrics)
    tracker = _tracker(run)
    if tracker is not None:
        tracker.log_curve(run.curve(round_index), f"{cfg.env}, seed {cfg.seed}")
    return mean


def finalize(config: ArtifactLike, policy: ArtifactLike, run_url: str, round_index: int,
             env_steps: int, final_policy: ArtifactLike, summary: ArtifactLike,
             total_steps: int = 0, registered_model: str = "") -> None:
    """Publish the policy and a summary of the run so far under the run's prefix; when training
    is complete, log the policy as an MLflow model, register it and end the MLflow run."""
    _setup()
    cfg, run = _config(config), RunStore(run_url)
    curve = run.curve(round_index)
    data = {"env": cfg.env, "seed": cfg.seed, "env_steps": env_steps, "round": round_index,
            "eval_return": curve[-1][1] if curve else None, "curve": curve,
            "policy_uri": run.store.uri("policy.pt")}
    Path(final_policy.path).parent.mkdir(parents=True, exist_ok=True)
    # published as a plain state dict, loadable with torch.load(weights_only=True) like
    # `mbpo train`'s policy.pt (inside the pipeline it travels checksummed)
    torch.save(load_state(policy.path), final_policy.path)
    run.store.put("policy.pt", Path(final_policy.path).read_bytes())
    Path(summary.path).write_text(json.dumps(data, indent=1))
    run.store.put("summary.json", json.dumps(data, indent=1).encode())
    log.info("run %s: published policy after %d env steps (eval return %s)", run_url, env_steps,
             data["eval_return"])
    tracker = _tracker(run)
    if tracker is not None and env_steps >= total_steps:
        log_final_policy(tracker, cfg, _actor(cfg, policy), registered_model)
        tracker.finish()


def log_final_policy(tracker: Any, cfg: MBPOConfig, actor: Actor, registered_model: str) -> None:
    """The policy as an MLflow model with the env's action bounds, registered by name, and its
    evaluation video: both from one CPU copy of ``actor`` (which may be a live CUDA actor)."""
    from mbpo_core.envs import make_env

    actor = host_actor(actor)

    env = make_env(cfg.env, 0, cfg.max_episode_steps)
    low, high = (torch.as_tensor(b, dtype=torch.float32) for b in
                 (env.action_space.low, env.action_space.high))
    env.close()
    uri = tracker.log_policy(actor, low, high, registered_model or None)
    if uri is not None:
        log.info("logged the policy to MLflow as %s%s", uri,
                 f", registered as {registered_model!r}" if registered_model else "")
    import tempfile

    from mbpo_core.video import record_episode

    with tempfile.TemporaryDirectory() as tmp:
        video = record_episode(cfg, actor, Path(tmp) / "evaluation.gif")
        if video is not None:
            tracker.log_file(video)
            log.info("logged an evaluation video (evaluation.gif)")
