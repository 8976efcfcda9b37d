"""SAC updates/s: this library (fp32, bf16) against mbrl-lib 0.2.0's SAC, alternating in one run.

    pip install --no-deps --target /tmp/mbrl-pkgs mbrl==0.2.0 omegaconf hydra-core termcolor \\
        antlr4-python3-runtime==4.9.3        # a throwaway install, outside the project's venv
    OMP_NUM_THREADS=2 python benchmarks/sac_vs_mbrl.py --mbrl-path /tmp/mbrl-pkgs

    git worktree add /tmp/mbpo-before 381cd5e     # optional: an earlier commit, run beside it
    OMP_NUM_THREADS=2 python benchmarks/sac_vs_mbrl.py --mbrl-path /tmp/mbrl-pkgs --before /tmp/mbpo-before

Hopper-v5 sizes (11 obs, 3 act), 2x256 networks, batch 256, each update sampling its batch from
a buffer as in MBPO (ours: 5% of 20k real + 95% of 100k model rows; mbrl-lib: its numpy replay
buffer of 100k rows, as its MBPO feeds SAC). The variants run in turns of ``--seconds`` each,
``--repeats`` times, so that a noisy machine slows all of them alike; the figures are medians.
The same run measures the machine's matmul limit (a 256x256 @ 256x256 product, fp32 and bf16)
and states each variant's FLOP rate as a fraction of it. Run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import sac_update_flops  # noqa: E402

from mbpo_core.buffer import ReplayBuffer  # noqa: E402
from mbpo_core.config import make_config  # noqa: E402
from mbpo_core.precision import bf16_matmul_supported  # noqa: E402
from mbpo_core.runtime import tune_allocator  # noqa: E402
from mbpo_core.steps import Agent, make_generator, update_sac  # noqa: E402

OBS, ACT, HIDDEN, BATCH = 11, 3, 256, 256


def ours(overrides: list[str], lib: SimpleNamespace | None = None) -> Callable[[int], None]:
    """This library's update; ``lib``: the modules of another checkout (:func:`checkout`)."""
    lib = lib or SimpleNamespace(ReplayBuffer=ReplayBuffer, make_config=make_config, Agent=Agent,
                                 make_generator=make_generator, update_sac=update_sac)
    cfg = lib.make_config("Hopper-v5", [f"sac.hidden_size={HIDDEN}", f"sac.batch_size={BATCH}",
                                        *overrides])
    agent, g = lib.Agent(cfg), lib.make_generator(0)
    real, model = lib.ReplayBuffer(20_000, OBS, ACT), lib.ReplayBuffer(100_000, OBS, ACT)
    real.add_rows(torch.randn(20_000, real.width, generator=g).clamp(-1, 1))
    model.add_rows(torch.randn(100_000, real.width, generator=g).clamp(-1, 1))
    return lambda n: lib.update_sac(cfg, agent, real, model, n) and None


def checkout(path: Path, name: str) -> SimpleNamespace:
    """The mbpo_core of another checkout (a ``git worktree`` of an earlier commit), imported
    under its own package name so that both versions run in this one process."""
    init = path / "mbpo_core" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--before {path}: no mbpo_core/__init__.py there; give the folder of a "
                         "checkout, e.g. from: git worktree add /tmp/mbpo-before COMMIT")
    spec = importlib.util.spec_from_file_location(
        name, init, submodule_search_locations=[str(init.parent)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[name] = pkg
    spec.loader.exec_module(pkg)
    mods = {m: importlib.import_module(f"{name}.{m}") for m in ("buffer", "config", "steps")}
    return SimpleNamespace(ReplayBuffer=mods["buffer"].ReplayBuffer,
                           make_config=mods["config"].make_config, Agent=mods["steps"].Agent,
                           make_generator=mods["steps"].make_generator,
                           update_sac=mods["steps"].update_sac,
                           has_precision="precision" in mods["config"].SACConfig.__dataclass_fields__)


def mbrl_lib(path: Path) -> Callable[[int], None]:
    sys.path.insert(0, str(path))
    import gymnasium as gym
    from mbrl.third_party.pytorch_sac_pranz24.sac import SAC
    from mbrl.util.replay_buffer import ReplayBuffer as MbrlBuffer

    args = SimpleNamespace(gamma=0.99, tau=0.005, alpha=0.2, policy="Gaussian",
                           target_update_interval=1, automatic_entropy_tuning=True,
                           target_entropy=None, device="cpu", hidden_size=HIDDEN, lr=3e-4)
    torch.manual_seed(0)
    agent = SAC(OBS, gym.spaces.Box(-1.0, 1.0, (ACT,), np.float32), args)
    rng = np.random.default_rng(0)
    buf = MbrlBuffer(100_000, (OBS,), (ACT,), rng=rng)
    n = 100_000
    buf.add_batch(rng.standard_normal((n, OBS), np.float32).clip(-1, 1),
                  rng.uniform(-1, 1, (n, ACT)).astype(np.float32),
                  rng.standard_normal((n, OBS), np.float32).clip(-1, 1),
                  rng.standard_normal(n).astype(np.float32), np.zeros(n, bool), np.zeros(n, bool))
    count = [0]

    def run(k: int) -> None:
        for _ in range(k):
            count[0] += 1
            agent.update_parameters(buf, BATCH, count[0])
    return run


def matmul_peak(dtype: torch.dtype, seconds: float = 1.0) -> float:
    a, b = torch.randn(256, 256, dtype=dtype), torch.randn(256, 256, dtype=dtype)
    for _ in range(50):
        torch.mm(a, b)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(100):
            torch.mm(a, b)
        n += 100
    return n * 2 * 256 ** 3 / (time.perf_counter() - start) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mbrl-path", type=Path, default=None,
                   help="folder where mbrl==0.2.0 is installed (see above); without it, only "
                        "this library's variants run")
    p.add_argument("--before", type=Path, nargs="*", default=[], metavar="CHECKOUT",
                   help="folders of earlier checkouts (git worktree add DIR COMMIT) to run "
                        "beside this one, as 'before <folder name>'")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0, help="length of one turn")
    p.add_argument("--repeats", type=int, default=7, help="turns per variant")
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tune_allocator()
    variants: dict[str, Callable[[int], None]] = {"ours fp32": ours([])}
    if bf16_matmul_supported("cpu"):
        variants["ours bf16"] = ours(["sac.precision=bf16"])
    for i, path in enumerate(args.before):
        lib = checkout(path.resolve(), f"mbpo_before_{i}")
        variants[f"before {path.name} fp32"] = ours([], lib)
        if lib.has_precision and bf16_matmul_supported("cpu"):
            variants[f"before {path.name} bf16"] = ours(["sac.precision=bf16"], lib)
    if args.mbrl_path:
        variants["mbrl-lib 0.2.0"] = mbrl_lib(args.mbrl_path)
    for run in variants.values():
        run(30)  # warm-up: allocator, kernels
    rates: dict[str, list[float]] = {k: [] for k in variants}
    peaks: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(args.repeats):
        peaks["fp32"].append(matmul_peak(torch.float32))
        peaks["bf16"].append(matmul_peak(torch.bfloat16))
        for name, run in variants.items():
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.seconds:
                run(10)
                n += 10
            rates[name].append(n / (time.perf_counter() - start))
    flops = sac_update_flops(OBS, ACT, HIDDEN, 2, BATCH)
    peak = {k: statistics.median(v) for k, v in peaks.items()}
    ref = statistics.median(rates["mbrl-lib 0.2.0"]) if args.mbrl_path else None
    rows = []
    print(f"matmul 256^3 on {args.threads} threads: fp32 {peak['fp32']:.0f} GFLOP/s, "
          f"bf16 {peak['bf16']:.0f} GFLOP/s (medians)")
    w = max(16, *(len(k) + 2 for k in rates))
    print(f"{'variant':<{w}}{'updates/s':>10}{'range':>16}{'GFLOP/s':>9}{'of limit':>9}"
          f"{'vs mbrl-lib':>12}")
    for name, r in rates.items():
        med = statistics.median(r)
        limit = peak["bf16" if "bf16" in name else "fp32"]
        row = {"variant": name, "updates_per_s": med, "runs": r, "gflops": med * flops / 1e9,
               "fraction_of_limit": med * flops / 1e9 / limit,
               "vs_mbrl_lib": med / ref if ref else None}
        rows.append(row)
        print(f"{name:<{w}}{med:>10.1f}{min(r):>8.1f}-{max(r):<7.1f}{row['gflops']:>9.1f}"
              f"{row['fraction_of_limit']:>9.0%}"
              f"{'' if ref is None else f'{med / ref:.2f}x':>12}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sac_vs_mbrl.json").write_text(json.dumps(
        {"threads": args.threads, "peak_gflops": peak, "peak_runs": peaks, "variants": rows},
        indent=1))


if __name__ == "__main__":
    main()
