"""Replay buffers for real and model transitions: preallocated, FIFO, rows of one float tensor.

A row is [obs, act, reward, next_obs, done]; keeping one 2-D tensor makes a batch one gather.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Batch:
    obs: torch.Tensor
    act: torch.Tensor
    rew: torch.Tensor
    next_obs: torch.Tensor
    done: torch.Tensor


class ReplayBuffer:
    def __init__(self, capacity: int, obs_dim: int, act_dim: int,
                 device: str | torch.device = "cpu") -> None:
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.width = 2 * obs_dim + act_dim + 2
        self.capacity = capacity
        self.data = torch.empty(capacity, self.width, device=device)
        self.ptr = 0  # next row to write
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, obs: torch.Tensor, act: torch.Tensor, rew: torch.Tensor, next_obs: torch.Tensor,
            done: torch.Tensor) -> None:
        rows = torch.cat([obs, act, rew.reshape(-1, 1), next_obs, done.reshape(-1, 1).to(obs.dtype)],
                         dim=1).to(self.data)
        self.add_rows(rows)

    def add_rows(self, rows: torch.Tensor) -> None:
        n = rows.shape[0]
        if n >= self.capacity:  # only the newest `capacity` rows survive
            self.data.copy_(rows[-self.capacity:])
            self.ptr, self.size = 0, self.capacity
            return
        end = self.ptr + n
        if end <= self.capacity:
            self.data[self.ptr:end] = rows
        else:
            first = self.capacity - self.ptr
            self.data[self.ptr:] = rows[:first]
            self.data[:n - first] = rows[first:]
        self.ptr = end % self.capacity
        self.size = min(self.size + n, self.capacity)

    def rows(self) -> torch.Tensor:
        """All stored rows, oldest first."""
        if self.size < self.capacity:
            return self.data[:self.size]
        return torch.cat([self.data[self.ptr:], self.data[:self.ptr]])

    def split(self, rows: torch.Tensor) -> Batch:
        o, a = self.obs_dim, self.act_dim
        return Batch(rows[:, :o], rows[:, o:o + a], rows[:, o + a], rows[:, o + a + 1:2 * o + a + 1],
                     rows[:, -1])

    def sample_rows(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Uniform rows. Indices are drawn in age order (0 = oldest), so a buffer rebuilt from
        ``rows()`` samples exactly what the original would, whatever its ring layout."""
        idx = torch.randint(self.size, (n,), generator=generator, device=self.data.device)
        if self.size == self.capacity and self.ptr:
            idx = (idx + self.ptr) % self.capacity
        return self.data[idx]

    def resize(self, capacity: int) -> None:
        """New capacity keeping the newest rows (the original's pool re-creation on k changes)."""
        if capacity == self.capacity:
            return
        rows = self.rows()[-capacity:]
        self.data = torch.empty(capacity, self.width, device=self.data.device)
        self.capacity, self.ptr, self.size = capacity, 0, 0
        self.add_rows(rows.clone())

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows().clone(), "capacity": self.capacity,
                "obs_dim": self.obs_dim, "act_dim": self.act_dim}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: str | torch.device = "cpu"
                        ) -> ReplayBuffer:
        buf = cls(int(state["capacity"]), int(state["obs_dim"]), int(state["act_dim"]), device)
        if state["rows"].shape[0]:
            buf.add_rows(state["rows"].to(device))
        return buf


def mixed_batch(real: ReplayBuffer, model: ReplayBuffer, batch_size: int, real_ratio: float,
                generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` rows, ``int(batch_size * real_ratio)`` of them real (all real if no model data)."""
    n_real = batch_size if len(model) == 0 else int(batch_size * real_ratio)
    parts = []
    if n_real:
        parts.append(real.sample_rows(n_real, generator))
    if batch_size - n_real:
        parts.append(model.sample_rows(batch_size - n_real, generator))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
