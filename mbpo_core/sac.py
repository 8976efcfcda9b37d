"""Soft Actor-Critic with a tanh-Gaussian actor, twin critics run as one batched pair, target
critics, and automatic entropy tuning.

By default the critic, actor and temperature losses are all taken at the pre-update parameters
and stepped together, as softlearning (the SAC inside the original MBPO code) does in one
``session.run``; ``sequential=True`` gives the critic-then-actor order of PyTorch ports.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .config import SACConfig
from .nets import BatchedMLP

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
Weights = list[tuple[torch.Tensor, torch.Tensor]]
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_LOG2 = math.log(2.0)


class Actor(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int, layers: int,
                 generator: torch.Generator, precision: str = "fp32") -> None:
        super().__init__()
        # the constructor's sizes: enough to rebuild it around a saved state dict
        self.arch = {"obs_dim": obs_dim, "act_dim": act_dim, "hidden": hidden, "layers": layers}
        self.net = BatchedMLP(1, obs_dim, 2 * act_dim, hidden, layers, nn.ReLU, precision)
        for layer in self.net.layers:
            layer.reset_glorot_uniform(generator)

    def dist_params(self, obs: torch.Tensor, weights: Weights | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.net(obs.unsqueeze(0), weights=weights)[0].chunk(2, dim=-1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None,
               eps: torch.Tensor | None = None, weights: Weights | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterized tanh-Gaussian action in [-1, 1] and its log-probability.

        The standard-normal noise comes from ``generator``, or is given as ``eps``; ``weights``
        are the net's :meth:`~BatchedMLP.product_weights` when the caller casts them once."""
        mean, log_std = self.dist_params(obs, weights)
        if eps is None:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device,
                              dtype=mean.dtype)
        u = mean + log_std.exp() * eps
        # log N(u) - log |d tanh(u)/du|, the latter in the stable form 2 (log 2 - u - softplus(-2u))
        logp = (-0.5 * eps.pow(2) - log_std - _HALF_LOG_2PI
                - 2.0 * (_LOG2 - u - F.softplus(-2.0 * u))).sum(-1)
        return torch.tanh(u), logp

    @torch.no_grad()
    def act(self, obs: torch.Tensor, generator: torch.Generator | None = None,
            deterministic: bool = False) -> torch.Tensor:
        if deterministic:
            return torch.tanh(self.dist_params(obs)[0])
        assert generator is not None, "stochastic actions need a generator"
        return self.sample(obs, generator)[0]


def cpu_actor(actor: Actor) -> Actor:
    """A CPU copy of ``actor`` in eval mode, frozen, sharing no storage with it.

    What is saved (policy.pt, a pipeline's policy artifact), logged, registered or rendered is
    taken from such a copy, never from the live training actor: that one may be on a GPU (a
    file with CUDA tensors does not load on a machine without CUDA, and a CPU observation fed to
    it fails) and keeps changing while training goes on."""
    copy = Actor(**actor.arch, generator=torch.Generator())
    copy.load_state_dict(actor.state_dict())  # copy_ into the new CPU parameters, any device
    return copy.eval().requires_grad_(False)


def host_actor(actor: Actor) -> Actor:
    """``actor`` itself if it already lives on the CPU and is frozen (a :func:`cpu_actor`
    copy), else its CPU copy: for functions that only read and run a policy."""
    if not actor.training and all(p.device.type == "cpu" and not p.requires_grad
                                  for p in actor.parameters()):
        return actor
    return cpu_actor(actor)


class TwinCritic(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int, layers: int,
                 generator: torch.Generator, precision: str = "fp32") -> None:
        super().__init__()
        self.net = BatchedMLP(2, obs_dim + act_dim, 1, hidden, layers, nn.ReLU, precision)
        for layer in self.net.layers:
            layer.reset_glorot_uniform(generator)

    def forward(self, obs: torch.Tensor, act: torch.Tensor, detach: bool = False,
                weights: Weights | None = None) -> torch.Tensor:
        """Both Q values, [2, B]; ``detach`` lets gradients reach the action but not the weights."""
        x = torch.cat([obs, act], dim=-1)
        return self.net(x.unsqueeze(0).expand(2, -1, -1), detach=detach,
                        weights=weights).squeeze(-1)


class SAC(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, cfg: SACConfig, generator: torch.Generator,
                 device: str | torch.device = "cpu", compile: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        # the training actor and critics (which also act in collect, imagine and evaluate) multiply
        # in cfg.precision; a saved, logged or rendered policy (cpu_actor) runs in fp32 from the
        # same fp32 weights
        self.actor = Actor(obs_dim, act_dim, cfg.hidden_size, cfg.num_hidden_layers, generator,
                           cfg.precision)
        self.critic = TwinCritic(obs_dim, act_dim, cfg.hidden_size, cfg.num_hidden_layers,
                                 generator, cfg.precision)
        self.critic_target = TwinCritic(obs_dim, act_dim, cfg.hidden_size,
                                        cfg.num_hidden_layers, generator, cfg.precision)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.critic_target.requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(cfg.init_alpha)))
        self.to(device)
        fused = torch.device(device).type in ("cpu", "cuda")
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.lr, fused=fused)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.lr, fused=fused)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=cfg.alpha_lr, fused=fused)
        self.updates = 0
        self._critic_params = list(self.critic.parameters())
        self._target_params = list(self.critic_target.parameters())
        # torch.compile fuses the elementwise work around the matmuls (same math, same order)
        self._loss_fn = torch.compile(self._losses, dynamic=False) if compile else self._losses

    def _critic_loss(self, obs: torch.Tensor, act: torch.Tensor, rew: torch.Tensor,
                     next_obs: torch.Tensor, done: torch.Tensor, eps: torch.Tensor,
                     alpha: torch.Tensor, actor_w: Weights | None = None,
                     critic_w: Weights | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Twin-critic soft Bellman loss (0.5 MSE each) and the mean Q."""
        with torch.no_grad():
            next_act, next_logp = self.actor.sample(next_obs, eps=eps, weights=actor_w)
            q_next = self.critic_target(next_obs, next_act).min(0).values - alpha * next_logp
            target = rew + self.cfg.gamma * (1.0 - done) * q_next
        q = self.critic(obs, act, weights=critic_w)
        return 0.5 * (q - target).pow(2).mean(1).sum(), q.detach().mean()

    def _policy_loss(self, obs: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor,
                     actor_w: Weights | None = None, critic_w: Weights | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Actor + temperature loss, the actor loss alone, and the policy entropy estimate.

        Q of the policy's action uses the critic weights as constants: the actor loss moves only
        the actor, so one backward pass over a sum of losses gives every gradient."""
        new_act, logp = self.actor.sample(obs, eps=eps, weights=actor_w)
        q_pi = self.critic(obs, new_act, detach=True, weights=critic_w).min(0).values
        actor_loss = (alpha * logp - q_pi).mean()
        alpha_loss = -(self.log_alpha * (logp.detach() + self.cfg.target_entropy)).mean()
        return actor_loss + alpha_loss, actor_loss.detach(), -logp.detach().mean()

    def _losses(self, obs: torch.Tensor, act: torch.Tensor, rew: torch.Tensor,
                next_obs: torch.Tensor, done: torch.Tensor, eps: torch.Tensor,
                alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All losses at the current parameters (softlearning's simultaneous update), summed,
        and the stats [critic, actor, alpha, entropy, Q]. A pure function of its tensors (the
        policy noise ``eps [2, B, A]`` comes in), so it can be compiled. The actor's and the
        critic's weights are cast to the product dtype once, for both losses' passes."""
        device = obs.device.type
        actor_w = self.actor.net.product_weights(device)
        critic_w = self.critic.net.product_weights(device)
        critic_loss, q_mean = self._critic_loss(obs, act, rew, next_obs, done, eps[0], alpha,
                                                actor_w, critic_w)
        policy_loss, actor_loss, entropy = self._policy_loss(obs, eps[1], alpha, actor_w,
                                                             critic_w)
        stats = torch.stack([critic_loss.detach(), actor_loss, alpha, entropy, q_mean])
        return critic_loss + policy_loss, stats

    def update(self, obs: torch.Tensor, act: torch.Tensor, rew: torch.Tensor,
               next_obs: torch.Tensor, done: torch.Tensor, generator: torch.Generator
               ) -> torch.Tensor:
        """One gradient step on a batch; returns detached stats [critic, actor, alpha, H, Q]."""
        cfg = self.cfg
        eps = torch.randn((2, *act.shape), generator=generator, device=act.device,
                          dtype=act.dtype)
        alpha = self.log_alpha.detach().exp()  # the temperature before this step, for every loss
        if cfg.sequential:  # critic step first; the actor then sees the updated critic
            critic_loss, q_mean = self._critic_loss(obs, act, rew, next_obs, done, eps[0], alpha)
            self.critic_opt.zero_grad(set_to_none=True)
            critic_loss.backward()
            self.critic_opt.step()
            policy_loss, actor_loss, entropy = self._policy_loss(obs, eps[1], alpha)
            self.actor_opt.zero_grad(set_to_none=True)
            self.alpha_opt.zero_grad(set_to_none=True)
            policy_loss.backward()
            self.actor_opt.step()
            self.alpha_opt.step()
            stats = torch.stack([critic_loss.detach(), actor_loss, alpha, entropy, q_mean])
        else:
            total, stats = self._loss_fn(obs, act, rew, next_obs, done, eps, alpha)
            for opt in (self.actor_opt, self.critic_opt, self.alpha_opt):
                opt.zero_grad(set_to_none=True)
            total.backward()
            for opt in (self.actor_opt, self.critic_opt, self.alpha_opt):
                opt.step()
        self.updates += 1
        if self.updates % cfg.target_update_interval == 0:
            with torch.no_grad():
                torch._foreach_lerp_(self._target_params, self._critic_params, cfg.tau)
        return stats

    # -- exact state ---------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, Any]:
        return {
            "modules": self.state_dict(),
            "actor_opt": self.actor_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "alpha_opt": self.alpha_opt.state_dict(),
            "updates": self.updates,
        }

    def load_full_state_dict(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["modules"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.alpha_opt.load_state_dict(state["alpha_opt"])
        self.updates = int(state["updates"])

