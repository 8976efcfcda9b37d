"""The five MBPO steps as plain functions over explicit state objects.

``collect -> fit_ensemble -> imagine -> update_sac -> evaluate`` make one round. The in-process
trainer and the pipeline components call these same functions; every object they hand on has
an exact ``state_dict`` / ``from_state_dict`` so a round can run in another process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import ensemble as ens
from .buffer import ReplayBuffer, mixed_batch
from .config import MBPOConfig
from .envs import ENV_SPECS, get_env_state, make_env, set_env_state, to_env_action
from .sac import SAC, Actor
from .termination import termination_fn

log = logging.getLogger(__name__)

class DivergenceError(RuntimeError):
    """Training produced non-finite losses (SAC), a non-finite dynamics model, or mostly
    non-finite imagined rollouts; continuing would only spread NaNs."""


# Independent random streams of one run, derived from its seed (order is part of the format).
STREAMS = ("env", "collect", "dynamics", "rollout", "agent")


def stream_seeds(seed: int) -> dict[str, int]:
    children = np.random.SeedSequence(seed).spawn(len(STREAMS))
    return {name: int(c.generate_state(1, np.uint32)[0]) for name, c in zip(STREAMS, children)}


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def generator_from_state(state: torch.Tensor, device: str | torch.device) -> torch.Generator:
    """Restore a generator; a state saved on another device type (a CPU step handing over to a
    GPU step) cannot be restored, so it seeds a new stream derived from that state instead."""
    g = torch.Generator(device=device)
    state = state.cpu()  # generator states are CPU byte tensors; a state loaded onto a GPU is not
    if state.numel() == g.get_state().numel():
        g.set_state(state)
    else:
        import hashlib

        digest = hashlib.sha256(state.numpy().tobytes()).digest()
        g.manual_seed(int.from_bytes(digest[:8], "little") % (2**63 - 1))
    return g


# --------------------------------------------------------------------------------------------
# collect
# --------------------------------------------------------------------------------------------
class Collector:
    """A real env with an episode in progress; it survives between rounds through its state."""

    def __init__(self, cfg: MBPOConfig, device: str | torch.device = "cpu") -> None:
        seeds = stream_seeds(cfg.seed)
        self.cfg, self.device = cfg, torch.device(device)
        self.env = make_env(cfg.env, seeds["env"], cfg.max_episode_steps)
        self.obs, _ = self.env.reset()
        self.generator = make_generator(seeds["collect"], device)
        self.episode_return, self.episode_length = 0.0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"env": get_env_state(self.env), "obs": torch.from_numpy(self.obs.copy()),
                "generator": self.generator.get_state(), "episode_return": self.episode_return,
                "episode_length": self.episode_length}

    @classmethod
    def from_state_dict(cls, cfg: MBPOConfig, state: dict[str, Any],
                        device: str | torch.device = "cpu") -> Collector:
        c = cls(cfg, device)
        set_env_state(c.env, state["env"])
        c.obs = state["obs"].cpu().numpy().copy()
        c.generator = generator_from_state(state["generator"], device)
        c.episode_return = float(state["episode_return"])
        c.episode_length = int(state["episode_length"])
        return c


@dataclass
class CollectResult:
    rows: torch.Tensor                      # [n, 2*obs+act+2] real transitions
    episodes: list[tuple[float, int]] = field(default_factory=list)  # finished (return, length)


def collect(collector: Collector, actor: Actor | None, n_steps: int) -> CollectResult:
    """``n_steps`` env steps: uniform random actions when ``actor`` is None, else the stochastic
    policy. A finished episode resets; an unfinished one continues in the next call."""
    act_dim = collector.env.action_space.shape[0]
    rows = np.empty((n_steps, 2 * collector.obs.shape[0] + act_dim + 2))
    episodes: list[tuple[float, int]] = []
    for i in range(n_steps):
        obs = collector.obs
        if actor is None:
            a = torch.rand(act_dim, generator=collector.generator, device=collector.device) * 2 - 1
        else:
            obs_t = torch.as_tensor(obs, dtype=torch.float32, device=collector.device)[None]
            a = actor.act(obs_t, collector.generator)[0]
        a = a.cpu().numpy()
        next_obs, reward, terminated, truncated, _ = collector.env.step(to_env_action(collector.env, a))
        rows[i] = np.concatenate([obs, a, [reward], next_obs, [float(terminated)]])
        collector.episode_return += float(reward)
        collector.episode_length += 1
        if terminated or truncated:
            episodes.append((collector.episode_return, collector.episode_length))
            collector.episode_return, collector.episode_length = 0.0, 0
            next_obs, _ = collector.env.reset()
        collector.obs = next_obs
    return CollectResult(torch.as_tensor(rows, dtype=torch.float32), episodes)


# --------------------------------------------------------------------------------------------
# fit_ensemble
# --------------------------------------------------------------------------------------------
class Dynamics:
    """The ensemble with what its training carries over: optimizer moments and RNG."""

    def __init__(self, cfg: MBPOConfig, device: str | torch.device = "cpu") -> None:
        spec = ENV_SPECS[cfg.env]
        self.generator = make_generator(stream_seeds(cfg.seed)["dynamics"], device)
        init_gen = make_generator(stream_seeds(cfg.seed)["dynamics"] + 1)
        self.model = ens.GaussianEnsemble(spec.obs_dim, spec.act_dim, cfg.ensemble, init_gen)
        self.model.to(device)
        self.optimizer = ens.make_optimizer(self.model)
        self.device = torch.device(device)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state()}

    @classmethod
    def from_state_dict(cls, cfg: MBPOConfig, state: dict[str, Any],
                        device: str | torch.device = "cpu") -> Dynamics:
        d = cls(cfg, device)
        d.model.load_state_dict(state["model"])
        ens.load_optimizer_state(d.optimizer, d.model, state["optimizer"])
        d.generator = generator_from_state(state["generator"], device)
        return d


def fit_ensemble(dynamics: Dynamics, real: ReplayBuffer) -> ens.FitResult:
    """Fit on every real transition (training split + holdout), warm-starting from the last fit."""
    batch = real.split(real.rows())
    inputs, targets = ens.make_training_data(batch.obs, batch.act, batch.rew, batch.next_obs)
    res = ens.fit(dynamics.model, dynamics.optimizer, inputs, targets, dynamics.generator)
    if res.diverged:
        raise DivergenceError(
            f"the dynamics model diverged: training loss {res.train_loss}, holdout errors "
            f"{res.holdout_mse}; nothing of this round is kept: the last good state is the "
            "previous round's. Lower ensemble.lr or raise ensemble.weight_decay, then resume from it")
    return res


# --------------------------------------------------------------------------------------------
# imagine
# --------------------------------------------------------------------------------------------
@dataclass
class ImagineResult:
    rows: torch.Tensor
    rollout_length: int
    mean_steps: float   # average imagined steps per start state (termination shortens rollouts)
    nonfinite: int = 0  # imagined transitions dropped because the model predicted NaN or inf


@torch.no_grad()
def imagine(cfg: MBPOConfig, dynamics: Dynamics, actor: Actor, real: ReplayBuffer,
            rollout_length: int, generator: torch.Generator) -> ImagineResult:
    """Branched rollouts of ``rollout_length`` steps from ``rollout.batch_size`` real states."""
    term = termination_fn(cfg.env)
    start = real.sample_rows(cfg.rollout.batch_size, generator)
    obs = real.split(start).obs
    chunks, nonfinite = [], 0
    for _ in range(rollout_length):
        act = actor.sample(obs, generator)[0]
        rew, next_obs = dynamics.model.sample_next(obs, act, generator)
        done = term(obs, act, next_obs)
        row = torch.cat([obs, act, rew[:, None], next_obs, done[:, None].to(obs.dtype)], 1)
        keep = ~done
        finite = torch.isfinite(row).all(1)
        if not bool(finite.all()):  # a diverged model: drop those transitions and their rollouts
            nonfinite += int((~finite).sum())
            row, keep = row[finite], keep & finite
        chunks.append(row)
        if not bool(keep.any()):
            break
        obs = next_obs[keep]
    rows = torch.cat(chunks)
    # each non-finite transition ends its rollout: ``nonfinite`` counts the rollouts lost
    if 2 * nonfinite > cfg.rollout.batch_size:
        raise DivergenceError(
            f"the dynamics model diverged: {nonfinite} of {cfg.rollout.batch_size} rollouts came "
            "out non-finite (NaN or inf); nothing of this round is kept: the last good state is "
            "the previous round's")
    if nonfinite:
        log.warning("dropped %d imagined transitions with NaN or inf predictions", nonfinite)
    return ImagineResult(rows, rollout_length, rows.shape[0] / cfg.rollout.batch_size, nonfinite)


# --------------------------------------------------------------------------------------------
# update_sac
# --------------------------------------------------------------------------------------------
class Agent:
    """SAC with its optimizers and the RNG it samples batches and actions with."""

    def __init__(self, cfg: MBPOConfig, device: str | torch.device = "cpu") -> None:
        spec = ENV_SPECS[cfg.env]
        seed = stream_seeds(cfg.seed)["agent"]
        self.sac = SAC(spec.obs_dim, spec.act_dim, cfg.sac, make_generator(seed + 1), device,
                       compile=cfg.sac.compile)
        self.generator = make_generator(seed, device)

    @property
    def actor(self) -> Actor:
        return self.sac.actor

    def state_dict(self) -> dict[str, Any]:
        return {"sac": self.sac.full_state_dict(), "generator": self.generator.get_state()}

    @classmethod
    def from_state_dict(cls, cfg: MBPOConfig, state: dict[str, Any],
                        device: str | torch.device = "cpu") -> Agent:
        a = cls(cfg, device)
        a.sac.load_full_state_dict(state["sac"])
        a.generator = generator_from_state(state["generator"], device)
        return a


def update_sac(cfg: MBPOConfig, agent: Agent, real: ReplayBuffer, model_data: ReplayBuffer,
               n_updates: int) -> dict[str, float]:
    """``n_updates`` SAC steps on mixed batches (``real_ratio`` real); mean stats over them."""
    if n_updates == 0:
        return {}
    sac, g = agent.sac, agent.generator
    total = torch.zeros(5, device=sac.log_alpha.device)  # where the stats are: no sync per update
    for _ in range(n_updates):
        rows = mixed_batch(real, model_data, cfg.sac.batch_size, cfg.sac.real_ratio, g)
        b = real.split(rows)
        total += sac.update(b.obs, b.act, b.rew, b.next_obs, b.done, g)
    stats = dict(zip(("critic_loss", "actor_loss", "alpha", "entropy", "q_mean"),
                     (total / n_updates).tolist()))
    bad = {k: v for k, v in stats.items() if not np.isfinite(v)}
    if bad:
        raise DivergenceError(f"SAC diverged in this round's {n_updates} updates ({bad}); nothing "
                              "of this round is kept: the last good state is the previous round's. "
                              "Lower sac.lr or raise sac.batch_size, then resume from it")
    return stats


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(cfg: MBPOConfig, actor: Actor, env_steps: int,
             device: str | torch.device = "cpu") -> tuple[float, float, list[float]]:
    """Deterministic-policy returns over ``eval_episodes`` episodes on a fresh env.

    The eval env's seed derives from the run seed and the env-step count, so evaluation needs no
    carried state and never touches the training env."""
    if cfg.eval_episodes == 0:
        return float("nan"), float("nan"), []
    seed = (stream_seeds(cfg.seed)["env"] + 7919 * (env_steps + 1)) % (2**31 - 1)
    env = make_env(cfg.env, seed, cfg.max_episode_steps)
    returns = []
    for _ in range(cfg.eval_episodes):
        obs, _ = env.reset()
        done, ret = False, 0.0
        while not done:
            a = actor.act(torch.as_tensor(obs, dtype=torch.float32, device=device)[None],
                          deterministic=True)[0].cpu().numpy()
            obs, r, terminated, truncated, _ = env.step(to_env_action(env, a))
            ret += float(r)
            done = terminated or truncated
        returns.append(ret)
    env.close()
    return float(np.mean(returns)), float(np.std(returns)), returns


# --------------------------------------------------------------------------------------------
# one round's decisions and metric names, shared by the trainer and the pipeline components
# --------------------------------------------------------------------------------------------
def round_env_steps(cfg: MBPOConfig, env_steps: int, max_env_steps: int | None = None) -> int:
    """Env steps the next round collects: the random warm-up first, then ``steps_per_round``."""
    n = cfg.init_steps if env_steps == 0 else cfg.steps_per_round
    if max_env_steps is not None:
        n = min(n, max_env_steps - env_steps)
    if n <= 0:
        raise ValueError(f"no env steps left in this round (env_steps={env_steps}, "
                         f"max_env_steps={max_env_steps})")
    return n


def collect_round(cfg: MBPOConfig, collector: Collector, actor: Actor, env_steps: int,
                  max_env_steps: int | None = None) -> CollectResult:
    """The round's real data: uniform random actions during warm-up, the policy afterwards."""
    warmup = env_steps < cfg.init_steps
    return collect(collector, None if warmup else actor, round_env_steps(cfg, env_steps, max_env_steps))


def imagine_round(cfg: MBPOConfig, dynamics: Dynamics, actor: Actor, real: ReplayBuffer,
                  env_steps: int, generator: torch.Generator) -> ImagineResult:
    return imagine(cfg, dynamics, actor, real, cfg.rollout_length(env_steps), generator)


def sac_updates_per_round(cfg: MBPOConfig) -> int:
    return cfg.sac.updates_per_step * cfg.steps_per_round


def collect_metrics(res: CollectResult, real_size: int) -> dict[str, float]:
    m = {"buffer/real_size": float(real_size)}
    if res.episodes:
        m["train/episode_return"] = sum(r for r, _ in res.episodes) / len(res.episodes)
    return m


def fit_metrics(fit: ens.FitResult) -> dict[str, float]:
    finite = [m for m in fit.holdout_mse if np.isfinite(m)]
    return {"model/train_loss": fit.train_loss,
            "model/holdout_mse": sum(finite) / max(len(finite), 1),
            "model/elite_holdout_mse": fit.elite_holdout_mse,
            "model/epochs": float(fit.epochs)}


def imagine_metrics(dream: ImagineResult, model_buffer_size: int) -> dict[str, float]:
    return {"rollout/length": float(dream.rollout_length), "rollout/mean_steps": dream.mean_steps,
            "rollout/model_buffer_size": float(model_buffer_size),
            "rollout/nonfinite_dropped": float(dream.nonfinite)}


def sac_metrics(stats: dict[str, float]) -> dict[str, float]:
    return {f"sac/{name}": value for name, value in stats.items()}


def eval_metrics(mean: float, std: float) -> dict[str, float]:
    return {"eval/return_mean": mean, "eval/return_std": std}
