"""Probabilistic dynamics ensemble: E Gaussian MLPs in one batched network, and its training.

Follows the original MBPO model (jannerm/mbpo ``bnn.py``): inputs [obs, act] standardized on the
training split, targets [reward, next_obs - obs], learned soft bounds on the log-variance,
per-member bootstrap, holdout early stopping with per-member best weights, elites by holdout MSE.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .config import EnsembleConfig
from .nets import BatchedMLP

log = logging.getLogger(__name__)


class GaussianEnsemble(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, cfg: EnsembleConfig,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.obs_dim, self.act_dim, self.cfg = obs_dim, act_dim, cfg
        in_dim, self.out_dim = obs_dim + act_dim, obs_dim + 1
        self.net = BatchedMLP(cfg.ensemble_size, in_dim, 2 * self.out_dim, cfg.hidden_size,
                              cfg.num_hidden_layers, nn.SiLU, cfg.precision)
        for layer in self.net.layers:
            layer.reset_truncated_normal(generator)
        self.max_logvar = nn.Parameter(torch.full((1, self.out_dim), 0.5))
        self.min_logvar = nn.Parameter(torch.full((1, self.out_dim), -10.0))
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.register_buffer("input_std", torch.ones(in_dim))
        self.register_buffer("elites", torch.arange(cfg.num_elites))

    @property
    def size(self) -> int:
        return self.cfg.ensemble_size

    def normalize(self, inputs: torch.Tensor) -> torch.Tensor:
        return (inputs - self.input_mean) / self.input_std

    def fit_normalizer(self, inputs: torch.Tensor) -> None:
        self.input_mean.copy_(inputs.mean(0))
        std = inputs.std(0, unbiased=False)
        self.input_std.copy_(torch.where(std < 1e-12, torch.ones_like(std), std))

    def forward(self, x_norm: torch.Tensor,
                members: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and soft-bounded log-variance of [reward, delta obs] for normalized inputs."""
        mean, raw = self.net(x_norm, members).chunk(2, dim=-1)
        logvar = self.max_logvar - F.softplus(self.max_logvar - raw)
        logvar = self.min_logvar + F.softplus(logvar - self.min_logvar)
        return mean, logvar

    def weight_decay_loss(self) -> torch.Tensor:
        # tf.nn.l2_loss: sum(w^2) / 2 per layer, scaled by that layer's decay.
        return sum(wd * 0.5 * layer.weight.pow(2).sum()
                   for wd, layer in zip(self.cfg.weight_decay, self.net.layers))

    @torch.no_grad()
    def sample_next(self, obs: torch.Tensor, act: torch.Tensor,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One imagined step: each sample uses a random elite and Gaussian noise.

        Only the chosen member runs for each sample: samples are grouped by member and padded to
        the largest group, so the cost is about one network pass per sample, not E of them.
        """
        n = obs.shape[0]
        k = self.elites.numel()
        pick = torch.randint(k, (n,), generator=generator, device=obs.device)
        order = torch.argsort(pick, stable=True)
        counts = torch.bincount(pick, minlength=k)
        starts = torch.cumsum(counts, 0) - counts
        sorted_pick = pick[order]
        pos = torch.arange(n, device=obs.device) - starts[sorted_pick]
        width = int(counts.max())
        x = self.normalize(torch.cat([obs, act], dim=-1))
        padded = x.new_zeros(k, width, x.shape[-1])
        padded[sorted_pick, pos] = x[order]
        mean, logvar = self(padded, self.elites)
        noise = torch.randn(mean.shape, generator=generator, device=obs.device, dtype=mean.dtype)
        sample = (mean + noise * torch.exp(0.5 * logvar))[sorted_pick, pos]
        out = torch.empty_like(sample)
        out[order] = sample
        return out[:, :1].squeeze(-1), obs + out[:, 1:]


@dataclass
class FitResult:
    epochs: int
    train_loss: float
    holdout_mse: list[float]   # NaN for every member when there was no holdout
    elite_holdout_mse: float
    n_holdout: int = 0

    @property
    def diverged(self) -> bool:
        """The training loss, or every member's holdout error, is no longer a finite number."""
        return not math.isfinite(self.train_loss) or (
            self.n_holdout > 0 and not any(math.isfinite(m) for m in self.holdout_mse))


def make_optimizer(model: GaussianEnsemble) -> torch.optim.Adam:
    """Adam with the original's per-layer L2 on the weights as Adam's (coupled) weight decay.

    The gradient of the loss term ``wd/2 * sum(w^2)`` is ``wd * w``, which is what Adam's
    ``weight_decay`` adds to the gradient before its moments: the same update, computed inside
    the fused Adam kernel instead of as a loss term whose squares, sums and backward cost about
    a tenth of a training step. Biases and the log-variance bounds get no decay, as in the
    original."""
    fused = model.max_logvar.device.type in ("cpu", "cuda")
    layers = model.net.layers
    groups = [{"params": [layer.weight], "weight_decay": wd}
              for wd, layer in zip(model.cfg.weight_decay, layers, strict=True)]
    groups.append({"params": [layer.bias for layer in layers]
                   + [model.max_logvar, model.min_logvar], "weight_decay": 0.0})
    return torch.optim.Adam(groups, lr=model.cfg.lr, fused=fused)


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: GaussianEnsemble,
                         state: dict[str, Any]) -> None:
    """Load a saved :func:`make_optimizer` state, or one saved before the weight decay moved
    into Adam (one group over ``model.parameters()``; its moments carry over unchanged)."""
    if len(state["param_groups"]) == 1 and len(optimizer.param_groups) > 1:
        order = {id(p): i for i, p in enumerate(model.parameters())}
        flat = [p for g in optimizer.param_groups for p in g["params"]]
        converted = optimizer.state_dict()
        converted["state"] = {j: state["state"][order[id(p)]] for j, p in enumerate(flat)
                              if order[id(p)] in state["state"]}
        state = converted
    optimizer.load_state_dict(state)


def ensemble_loss(model: GaussianEnsemble, x_norm: torch.Tensor,
                  target: torch.Tensor) -> torch.Tensor:
    """Gaussian NLL (up to constants) summed over members, + log-variance bound term (the L2
    term is in the optimizer: :func:`make_optimizer`)."""
    mean, logvar = model(x_norm)
    inv_var = torch.exp(-logvar)
    nll = ((mean - target).pow(2) * inv_var).mean(dim=(1, 2)) + logvar.mean(dim=(1, 2))
    bound = model.cfg.logvar_bound_coef * (model.max_logvar.sum() - model.min_logvar.sum())
    return nll.sum() + bound  # + the L2 on the weights, applied by the optimizer


@torch.no_grad()
def holdout_mse(model: GaussianEnsemble, x_norm: torch.Tensor, target: torch.Tensor,
                chunk: int = 8192) -> torch.Tensor:
    """Per-member MSE of the mean on the holdout set, [E]."""
    total = torch.zeros(model.size, device=x_norm.device)
    for i in range(0, x_norm.shape[0], chunk):
        xb = x_norm[i:i + chunk].expand(model.size, -1, -1)
        mean, _ = model(xb)
        total += (mean - target[i:i + chunk]).pow(2).sum(dim=(1, 2))
    return total / (x_norm.shape[0] * target.shape[-1])


def fit(model: GaussianEnsemble, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
        targets: torch.Tensor, generator: torch.Generator) -> FitResult:
    """Train until no member improves its holdout MSE by > threshold for ``patience`` epochs."""
    cfg = model.cfg
    n = inputs.shape[0]
    n_hold = min(int(n * cfg.holdout_ratio), cfg.max_holdout)
    if n - n_hold < 1:
        raise ValueError(f"need at least one training transition, got {n} with holdout {n_hold}")
    perm = torch.randperm(n, generator=generator, device=inputs.device)
    train_idx, hold_idx = perm[n_hold:], perm[:n_hold]
    model.fit_normalizer(inputs[train_idx])
    train_x, train_y = model.normalize(inputs[train_idx]), targets[train_idx]
    hold_x, hold_y = model.normalize(inputs[hold_idx]), targets[hold_idx]
    n_train = train_x.shape[0]
    bootstrap = torch.randint(n_train, (model.size, n_train), generator=generator,
                              device=inputs.device)

    best = torch.full((model.size,), math.inf)
    best_state = {k: v.clone() for k, v in model.net.state_dict().items()}
    since_update, epoch = 0, 0
    n_batches = math.ceil(n_train / cfg.batch_size)
    while True:
        shuffle = torch.argsort(torch.rand(model.size, n_train, generator=generator,
                                           device=inputs.device), dim=1)
        idx = torch.gather(bootstrap, 1, shuffle)
        # summed where the losses are (a CPU accumulator cannot take a CUDA loss), read once
        # after the last epoch: no host-device sync per minibatch or per epoch
        running = torch.zeros((), device=train_x.device)
        for b in range(0, n_train, cfg.batch_size):
            batch = idx[:, b:b + cfg.batch_size]
            loss = ensemble_loss(model, train_x[batch], train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.detach()
        epoch += 1
        if n_hold == 0:  # no holdout: train for max_epochs (or one epoch) and keep everything
            if epoch >= max(cfg.max_epochs, 1):
                break
            continue
        mse = holdout_mse(model, hold_x, hold_y).cpu()  # the one sync per epoch: early stopping
        improved = (best - mse) / best > cfg.improvement_threshold
        improved |= torch.isinf(best) & torch.isfinite(mse)
        if improved.any():
            best = torch.where(improved, mse, best)
            current = model.net.state_dict()
            for k, v in current.items():
                best_state[k][improved.to(v.device)] = v[improved.to(v.device)]
            since_update = 0
        else:
            since_update += 1
        if since_update > cfg.patience or (cfg.max_epochs and epoch >= cfg.max_epochs):
            break
    # the reported loss includes the L2 term as the original's did (at the last weights)
    last_loss = float(running) / n_batches + float(model.weight_decay_loss().detach())
    if n_hold:
        model.net.load_state_dict(best_state)
        mse = holdout_mse(model, hold_x, hold_y).cpu()
        model.elites.copy_(torch.argsort(mse)[:cfg.num_elites].to(model.elites.device))
    else:
        mse = torch.full((model.size,), float("nan"))
    elite_mse = float(mse[model.elites.cpu()].mean())
    log.debug("ensemble fit: %d epochs, loss %.4f, elite holdout mse %.5f", epoch, last_loss,
              elite_mse)
    return FitResult(epoch, last_loss, mse.tolist(), elite_mse, n_hold)


def make_training_data(obs: torch.Tensor, act: torch.Tensor, rew: torch.Tensor,
                       next_obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [obs, act] and targets [reward, next_obs - obs]."""
    return torch.cat([obs, act], -1), torch.cat([rew.unsqueeze(-1), next_obs - obs], -1)
