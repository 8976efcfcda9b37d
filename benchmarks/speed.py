"""Speed benchmark: SAC updates/s, ensemble fit time, rollout throughput, s per 1,000 env steps.

    OMP_NUM_THREADS=2 python benchmarks/speed.py [--threads 2] [--device cpu|cuda[:N]] [--quick]

Figures are medians over repeats; GFLOP/s counts the matmul FLOPs of the algorithm (what any
implementation of the same math must do), to compare against the machine's matmul peak. With
``--device cuda`` every timed part ends with ``torch.cuda.synchronize()``, so queued GPU work is
counted (scripts/gpu-check.sh runs it that way).
Run nothing else meanwhile: two benchmarks on two cores measure each other.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mbpo_core.buffer import ReplayBuffer
from mbpo_core.config import make_config
from mbpo_core.envs import ENV_SPECS
from mbpo_core.runtime import tune_allocator
from mbpo_core.state import load_state, save_state
from mbpo_core.steps import (
    Agent,
    Collector,
    Dynamics,
    collect,
    fit_ensemble,
    imagine,
    make_generator,
    update_sac,
)

# mbrl-lib 0.2.0's MBPO Hopper settings, expressed as overrides of our Hopper-v5 preset:
# G=40, 512-unit SAC, target update every 4 steps, critic-then-actor order, uniform model L2.
MBRL_LIB_HOPPER = ["sac.updates_per_step=40", "sac.hidden_size=512",
                   "sac.target_update_interval=4", "sac.sequential=true",
                   "rollout.schedule=[20, 100, 1, 15]",
                   "ensemble.weight_decay=[1e-5, 1e-5, 1e-5, 1e-5, 1e-5]"]


def sync(device: str) -> None:
    """Wait for the device's queued work before reading the clock (CUDA runs asynchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def mlp_macs(sizes: list[int]) -> int:
    return sum(a * b for a, b in zip(sizes, sizes[1:]))


def sac_update_flops(obs: int, act: int, hidden: int, layers: int, batch: int) -> float:
    """FLOPs of one SAC update: 16 single-network passes (fwd = 1, fwd+bwd of weights = 3).

    critic loss: Q1,Q2 fwd+bwd (2x3), target Q1,Q2 fwd (2), actor on s' (1);
    actor loss: actor fwd+bwd (3), Q1,Q2 fwd + input-grad bwd (2x2)."""
    critic = mlp_macs([obs + act] + [hidden] * layers + [1])
    actor = mlp_macs([obs] + [hidden] * layers + [2 * act])
    return 2.0 * batch * (critic * (6 + 2 + 4) + actor * (1 + 3))


def ensemble_epoch_flops(cfg, obs: int, act: int, n_train: int) -> float:
    e = cfg.ensemble
    macs = mlp_macs([obs + act] + [e.hidden_size] * e.num_hidden_layers + [2 * (obs + 1)])
    return 2.0 * 3 * macs * e.ensemble_size * n_train


def bench_sac(env: str, hidden: int, device: str, seconds: float, repeats: int) -> dict:
    cfg = make_config(env, [f"sac.hidden_size={hidden}"])
    spec = ENV_SPECS[env]
    agent = Agent(cfg, device)
    g = make_generator(0, device)
    real = ReplayBuffer(20_000, spec.obs_dim, spec.act_dim, device)
    model = ReplayBuffer(100_000, spec.obs_dim, spec.act_dim, device)
    real.add_rows(torch.randn(20_000, real.width, generator=g, device=device).clamp(-1, 1))
    model.add_rows(torch.randn(100_000, real.width, generator=g, device=device).clamp(-1, 1))
    update_sac(cfg, agent, real, model, 20)  # warm-up
    rates = []
    for _ in range(repeats):
        sync(device)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            update_sac(cfg, agent, real, model, 25)
            n += 25
        sync(device)
        rates.append(n / (time.perf_counter() - start))
    rate = statistics.median(rates)
    flops = sac_update_flops(spec.obs_dim, spec.act_dim, hidden, cfg.sac.num_hidden_layers,
                             cfg.sac.batch_size)
    return {"updates_per_s": rate, "gflops": rate * flops / 1e9, "runs": rates}


def hopper_data(n: int, device: str) -> ReplayBuffer:
    cfg = make_config("Hopper-v5")
    col = Collector(cfg, device)
    buf = ReplayBuffer(n, 11, 3, device)
    buf.add_rows(collect(col, None, n).rows.to(device))
    return buf


def bench_fit(real: ReplayBuffer, device: str) -> tuple[dict, dict]:
    """One fit from scratch (the slowest case: later fits warm-start and stop in few epochs)."""
    cfg = make_config("Hopper-v5")
    dyn = Dynamics(cfg, device)
    sync(device)
    start = time.perf_counter()
    res = fit_ensemble(dyn, real)
    sync(device)
    seconds = time.perf_counter() - start
    n_train = len(real) - min(int(len(real) * 0.2), 5000)
    gflops = res.epochs * ensemble_epoch_flops(cfg, 11, 3, n_train) / seconds / 1e9
    return ({"seconds": seconds, "epochs": res.epochs, "s_per_epoch": seconds / res.epochs,
             "gflops": gflops}, dyn.state_dict())


def bench_rollout(real: ReplayBuffer, device: str, repeats: int) -> dict:
    cfg = make_config("Hopper-v5")
    dyn, agent = Dynamics(cfg, device), Agent(cfg, device)
    g = make_generator(0, device)
    imagine(cfg, dyn, agent.actor, real, 1, g)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        res = imagine(cfg, dyn, agent.actor, real, 1, g)
        sync(device)
        times.append(time.perf_counter() - start)
    return {"transitions_per_s": res.rows.shape[0] / statistics.median(times),
            "seconds": statistics.median(times)}


def bench_round(overrides: list[str], real: ReplayBuffer, fitted: dict, device: str,
                full: bool) -> dict:
    """One steady-state round at rollout length 15 (epoch >= schedule end), scaled to 1,000
    env steps. With ``full=False`` the SAC part runs 1/10 of its updates and is scaled."""
    cfg = make_config("Hopper-v5", overrides + ["rollout.schedule=[0, 0, 15, 15]"])
    col, dyn, agent = Collector(cfg, device), Dynamics(cfg, device), Agent(cfg, device)
    g = make_generator(1, device)
    dyn = Dynamics.from_state_dict(cfg, fitted, device)  # warm start (weights + Adam), as in a run
    model = ReplayBuffer(cfg.model_buffer_capacity(15), 11, 3, device)
    t = {}
    sync(device)
    start = time.perf_counter()
    rows = collect(col, agent.actor, cfg.steps_per_round).rows
    t["collect"] = time.perf_counter() - start
    real.add_rows(rows.to(device))
    sync(device)
    start = time.perf_counter()
    t["fit_ensemble_epochs"] = fit_ensemble(dyn, real).epochs
    sync(device)
    t["fit_ensemble"] = time.perf_counter() - start
    start = time.perf_counter()
    model.add_rows(imagine(cfg, dyn, agent.actor, real, 15, g).rows)
    sync(device)
    t["imagine"] = time.perf_counter() - start
    n_updates = cfg.sac.updates_per_step * cfg.steps_per_round
    scale = 1 if full else 10
    start = time.perf_counter()
    update_sac(cfg, agent, real, model, n_updates // scale)
    sync(device)
    t["update_sac"] = (time.perf_counter() - start) * scale
    per_round = t["collect"] + t["fit_ensemble"] + t["imagine"] + t["update_sac"]
    rounds_per_1000 = 1000 / cfg.steps_per_round
    return {"s_per_1000_env_steps": per_round * rounds_per_1000, "round": t,
            "sac_share": t["update_sac"] / per_round, "sac_updates_scaled": not full}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--quick", action="store_true", help="shorter timings (noisier)")
    p.add_argument("--full-rounds", action="store_true",
                   help="run every SAC update of the 1,000-step rounds instead of 1/10 scaled")
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    p.add_argument("--parts", nargs="+", default=["sac", "fit", "rollout", "round"],
                   choices=["sac", "fit", "rollout", "round"])
    args = p.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine")
    tune_allocator()
    torch.set_num_threads(args.threads)
    seconds, repeats = (3.0, 3) if args.quick else (10.0, 5)
    res: dict = {"threads": args.threads, "device": args.device, "torch": torch.__version__}

    args.out.mkdir(parents=True, exist_ok=True)
    if "sac" in args.parts:
        for hidden in (256, 512):
            r = bench_sac("Hopper-v5", hidden, args.device, seconds, repeats)
            res[f"sac_{hidden}"] = r
            print(f"SAC update, batch 256, 2x{hidden} nets (Hopper dims): {r['updates_per_s']:.1f} "
                  f"updates/s (median of {repeats}), {r['gflops']:.0f} GFLOP/s", flush=True)
    real = hopper_data(20_000, args.device)
    fitted_path = args.out / "fitted-hopper-20k.pt"
    if "fit" in args.parts or not fitted_path.exists():
        r, fitted = bench_fit(real, args.device)
        save_state(fitted, fitted_path)
        res["ensemble_fit_20k"] = r
        print(f"ensemble fit, 20k Hopper transitions from scratch: {r['seconds']:.1f} s "
              f"({r['epochs']} epochs to early stop, {r['s_per_epoch']:.2f} s/epoch, "
              f"{r['gflops']:.0f} GFLOP/s)", flush=True)
    fitted = load_state(fitted_path)
    if "rollout" in args.parts:
        r = bench_rollout(real, args.device, repeats)
        res["rollout"] = r
        print(f"model rollout, 100k start states, 1 step: {r['transitions_per_s']:,.0f} "
              f"transitions/s ({r['seconds']:.2f} s)", flush=True)
    if "round" in args.parts:
        for name, over in (("paper_hopper", []), ("mbrl_lib_hopper", MBRL_LIB_HOPPER)):
            data = ReplayBuffer.from_state_dict(real.state_dict(), args.device)  # a copy per round
            r = bench_round(over, data, fitted, args.device,
                            args.full_rounds)
            res[f"round_{name}"] = r
            print(f"Hopper-v5 steady state ({name} settings, k=15): "
                  f"{r['s_per_1000_env_steps']:.0f} s per 1,000 env steps (SAC "
                  f"{100 * r['sac_share']:.0f}%; round parts "
                  + ", ".join(f"{k} {v:.1f}" for k, v in r["round"].items()) + ")", flush=True)
    (args.out / "speed.json").write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out / 'speed.json'}")


if __name__ == "__main__":
    main()
