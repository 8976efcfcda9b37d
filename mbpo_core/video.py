"""An evaluation video of a policy: one deterministic episode rendered off-screen as a GIF.

Rendering needs an off-screen OpenGL (``MUJOCO_GL=egl`` or ``osmesa``); where there is none, the
caller gets ``None`` and one log line saying why, and training is unaffected.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from .config import MBPOConfig
from .envs import ENV_SPECS, to_env_action
from .sac import Actor, host_actor

log = logging.getLogger(__name__)


@torch.no_grad()
def record_episode(cfg: MBPOConfig, actor: Actor, path: str | os.PathLike[str], seed: int = 0,
                   max_steps: int = 400, every: int = 2, size: tuple[int, int] = (240, 180)
                   ) -> Path | None:
    """Write a GIF of up to ``max_steps`` steps (every ``every``-th frame); None if no renderer.

    The episode runs a CPU copy of ``actor`` (none is made if it is one already), so a policy
    trained on a GPU renders the same way as one trained on the CPU."""
    import gymnasium as gym
    from PIL import Image

    os.environ.setdefault("MUJOCO_GL", "egl")  # headless default; read when the viewer is made
    try:
        env = gym.make(cfg.env, render_mode="rgb_array", width=size[0], height=size[1],
                       **ENV_SPECS[cfg.env].kwargs)
        obs, _ = env.reset(seed=seed)
        frames = [env.render()]
    except Exception as e:  # no OpenGL platform, missing libraries, ...
        log.warning("no evaluation video: rendering is unavailable with MUJOCO_GL=%s (%s: %s); "
                    "set MUJOCO_GL=egl or osmesa on a machine with that library",
                    os.environ.get("MUJOCO_GL"), type(e).__name__, str(e).splitlines()[0][:200])
        return None
    actor = host_actor(actor)
    for t in range(max_steps):
        a = actor.act(torch.as_tensor(obs, dtype=torch.float32)[None], deterministic=True)[0]
        obs, _, terminated, truncated, _ = env.step(to_env_action(env, a.numpy()))
        if t % every == 0:
            frames.append(env.render())
        if terminated or truncated:
            break
    env.close()
    images = [Image.fromarray(np.asarray(f)) for f in frames]
    path = Path(path)
    images[0].save(path, save_all=True, append_images=images[1:], duration=40 * every, loop=0)
    return path
