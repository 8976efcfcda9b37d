"""The in-process MBPO loop (``mbpo train``): one round = collect, fit, imagine, update, evaluate.

It keeps the states in memory and calls the same step functions the pipeline runs in separate
processes; ``state_dict`` / ``from_state_dict`` capture everything, so a run split at any round
boundary equals an unsplit one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from .buffer import ReplayBuffer
from .config import MBPOConfig
from .envs import ENV_SPECS
from .sac import Actor, cpu_actor
from .steps import (
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

log = logging.getLogger(__name__)

STATE_FORMAT = 1
MetricsSink = Callable[[dict[str, float], int], None]


class MBPOTrainer:
    def __init__(self, cfg: MBPOConfig, device: str | torch.device = "cpu",
                 state: dict[str, Any] | None = None) -> None:
        """A fresh run, or with ``state`` (from ``state_dict``) the continuation of one."""
        spec = ENV_SPECS[cfg.env]
        self.cfg, self.device = cfg, torch.device(device)
        if state is None:
            self.collector = Collector(cfg, device)
            self.real = ReplayBuffer(cfg.real_buffer_size, spec.obs_dim, spec.act_dim, device)
            self.model_data = ReplayBuffer(cfg.model_buffer_capacity(cfg.rollout_length(0)),
                                           spec.obs_dim, spec.act_dim, device)
            self.dynamics = Dynamics(cfg, device)
            self.agent = Agent(cfg, device)
            self.rollout_generator = make_generator(stream_seeds(cfg.seed)["rollout"], device)
            self.env_steps, self.round = 0, 0
            self.curve: list[list[float]] = []
            return
        self.collector = Collector.from_state_dict(cfg, state["collector"], device)
        self.real = ReplayBuffer.from_state_dict(state["real"], device)
        self.model_data = ReplayBuffer.from_state_dict(state["model_data"], device)
        self.dynamics = Dynamics.from_state_dict(cfg, state["dynamics"], device)
        self.agent = Agent.from_state_dict(cfg, state["agent"], device)
        self.rollout_generator = generator_from_state(state["rollout_generator"], device)
        self.env_steps, self.round = int(state["env_steps"]), int(state["round"])
        self.curve = [list(p) for p in state["curve"]]

    # -- one round -------------------------------------------------------------------------
    def run_round(self, max_env_steps: int | None = None) -> dict[str, float]:
        cfg, timings, metrics = self.cfg, {}, {}

        t = time.perf_counter()
        res = collect_round(cfg, self.collector, self.agent.actor, self.env_steps, max_env_steps)
        self.real.add_rows(res.rows.to(self.device))
        self.env_steps += res.rows.shape[0]
        metrics |= collect_metrics(res, len(self.real))
        timings["collect"] = time.perf_counter() - t

        t = time.perf_counter()
        metrics |= fit_metrics(fit_ensemble(self.dynamics, self.real))
        timings["fit_ensemble"] = time.perf_counter() - t

        t = time.perf_counter()
        dream = imagine_round(cfg, self.dynamics, self.agent.actor, self.real, self.env_steps,
                              self.rollout_generator)
        self.model_data.resize(cfg.model_buffer_capacity(dream.rollout_length))
        self.model_data.add_rows(dream.rows)
        metrics |= imagine_metrics(dream, len(self.model_data))
        timings["imagine"] = time.perf_counter() - t

        t = time.perf_counter()
        metrics |= sac_metrics(update_sac(cfg, self.agent, self.real, self.model_data,
                                          sac_updates_per_round(cfg)))
        timings["update_sac"] = time.perf_counter() - t

        t = time.perf_counter()
        mean, std, _ = evaluate(cfg, self.agent.actor, self.env_steps, self.device)
        metrics |= eval_metrics(mean, std)
        timings["evaluate"] = time.perf_counter() - t
        self.curve.append([self.env_steps, mean, std])
        self.round += 1
        return metrics | {f"time/{name}_s": value for name, value in timings.items()}

    def train(self, total_steps: int, sink: MetricsSink | None = None,
              progress: bool = True) -> list[list[float]]:
        """Rounds until ``total_steps`` env steps; returns the eval curve [[steps, mean, std]]."""
        from tqdm.auto import tqdm

        if total_steps < 1:
            raise ValueError(f"total_steps = {total_steps} must be >= 1")
        with tqdm(total=total_steps, initial=min(self.env_steps, total_steps), unit="step",
                  desc=self.cfg.env, disable=not progress, dynamic_ncols=True) as bar:
            while self.env_steps < total_steps:
                before = self.env_steps
                metrics = self.run_round(total_steps)
                bar.update(self.env_steps - before)
                bar.set_postfix(ret=f"{metrics['eval/return_mean']:.1f}",
                                k=int(metrics["rollout/length"]))
                log.info("round %d env_steps %d eval %.1f +- %.1f", self.round, self.env_steps,
                         metrics["eval/return_mean"], metrics["eval/return_std"])
                if sink is not None:
                    sink(metrics, self.env_steps)
        return self.curve

    # -- the trained policy -------------------------------------------------------------------
    def policy(self) -> Actor:
        """A CPU copy of the actor in eval mode, sharing no storage with it: what is saved,
        logged, registered or rendered at the end of a run, whatever device trained it."""
        return cpu_actor(self.agent.actor)

    def save_policy(self, path: str | os.PathLike[str]) -> Actor:
        """Write ``path`` (policy.pt: the actor's state dict as CPU tensors, loadable with
        ``torch.load(path, weights_only=True)`` on any machine) and return the CPU copy it was
        taken from, so that the logged model and the video use the very same weights."""
        policy = self.policy()
        torch.save(policy.state_dict(), path)
        return policy

    # -- exact state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "config": self.cfg.to_dict(),
            "env_steps": self.env_steps,
            "round": self.round,
            "curve": [list(p) for p in self.curve],
            "collector": self.collector.state_dict(),
            "real": self.real.state_dict(),
            "model_data": self.model_data.state_dict(),
            "dynamics": self.dynamics.state_dict(),
            "agent": self.agent.state_dict(),
            "rollout_generator": self.rollout_generator.get_state(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: str | torch.device = "cpu"
                        ) -> MBPOTrainer:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"state format {state.get('format')!r} is not supported; "
                             f"this code reads format {STATE_FORMAT}")
        return cls(MBPOConfig.from_dict(state["config"]), device, state)
