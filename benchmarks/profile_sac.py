"""Where a SAC update's time goes: torch.profiler over 100 updates at Hopper sizes, 2x256, batch 256.

    OMP_NUM_THREADS=2 python benchmarks/profile_sac.py [--precision fp32|bf16] [--rows 25]

Prints updates/s over 300 updates, then the operators by self CPU time. Run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from mbpo_core.buffer import ReplayBuffer
from mbpo_core.config import make_config
from mbpo_core.runtime import tune_allocator
from mbpo_core.steps import Agent, make_generator, update_sac


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=25, help="operators to list")
    args = p.parse_args()
    tune_allocator()
    torch.set_num_threads(args.threads)
    cfg = make_config("Hopper-v5", [f"sac.precision={args.precision}"])
    agent, g = Agent(cfg), make_generator(0)
    real, model = ReplayBuffer(20_000, 11, 3), ReplayBuffer(100_000, 11, 3)
    real.add_rows(torch.randn(20_000, real.width, generator=g).clamp(-1, 1))
    model.add_rows(torch.randn(100_000, real.width, generator=g).clamp(-1, 1))
    update_sac(cfg, agent, real, model, 50)
    start = time.perf_counter()
    update_sac(cfg, agent, real, model, 300)
    print(f"{args.precision}: {300 / (time.perf_counter() - start):.1f} updates/s")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        update_sac(cfg, agent, real, model, 100)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
