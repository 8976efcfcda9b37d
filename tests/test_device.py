"""Devices: what a run writes is CPU-loadable, and `--device cuda` trains, saves and resumes.

The CPU tests run everywhere. The ``cuda`` tests (``pytest -m cuda``; scripts/gpu-check.sh runs
them) need an NVIDIA GPU and skip on a machine without CUDA: that is the one allowed skip.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from mbpo_core import ensemble as ens
from mbpo_core.config import make_config
from mbpo_core.envs import ENV_SPECS
from mbpo_core.sac import Actor, cpu_actor, host_actor
from mbpo_core.state import load_state
from mbpo_core.steps import Agent, evaluate
from mbpo_core.trainer import MBPOTrainer
from pipelines.cli import main
from tests.conftest import TINY

ENV = "InvertedPendulum-v5"
CUDA = "cuda"  # the device the cuda tests compare against the CPU
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="CUDA is not available on this machine")

# CPU vs CUDA tolerance for the same computation on the same weights and inputs. Two runs on
# different devices are not comparable number by number: the CUDA generators (Philox) draw other
# numbers than the CPU's (mt19937) for the same seed, so warm-up actions, bootstrap and batches
# differ from the first step, and trained runs can only be compared as distributions over seeds
# (a benchmark, not a test). What must agree is the arithmetic: cuBLAS and the CPU BLAS sum in
# other orders, which moves float32 results by ~1e-6 relative for these layer widths; 1e-4
# leaves two orders of margin and still catches a wrong input, weight, dtype or a TF32 matmul
# (~1e-3; TF32 is off by default and the comparison switches it off explicitly).
RTOL, ATOL = 1e-4, 1e-5


def _train(out: Path, steps: int, device: str = "cpu", *extra: str, seed: int = 0) -> dict:
    args = ["train", "--env", ENV, "--total-steps", str(steps), "--seed", str(seed), "--out",
            str(out), "--device", device, "--no-progress", "--no-tracking", *extra]
    if "--resume-from" not in extra:
        args += ["--set", *TINY]
    assert main(args) == 0
    return json.loads((out / "summary.json").read_text())


def _assert_cpu_policy(path: Path, cfg) -> dict[str, torch.Tensor]:
    """policy.pt loads on a CPU-only machine (no map_location) with weights_only=True, holds
    only CPU tensors, and is a complete actor state dict."""
    state = torch.load(path, weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    assert {v.device.type for v in state.values()} == {"cpu"}
    _actor(cfg).load_state_dict(state)  # strict: every key, every shape
    return state


def _actor(cfg) -> Actor:
    spec = ENV_SPECS[cfg.env]
    return Actor(spec.obs_dim, spec.act_dim, cfg.sac.hidden_size, cfg.sac.num_hidden_layers,
                 torch.Generator())


# -- CPU: what is saved, logged and rendered is one CPU copy ----------------------------------
def test_policy_of_a_train_run_loads_with_weights_only_and_is_cpu(tmp_path):
    _train(tmp_path / "run", 150)
    cfg = make_config(ENV, TINY)
    state = _assert_cpu_policy(tmp_path / "run" / "policy.pt", cfg)
    assert state.keys() == Agent(cfg).actor.state_dict().keys()


def test_cpu_actor_is_an_equal_copy_that_shares_nothing(tmp_path):
    cfg = make_config(ENV, TINY)
    trainer = MBPOTrainer(cfg)
    live = trainer.agent.actor
    copy = cpu_actor(live)
    assert copy is not live and not copy.training
    assert copy.arch == live.arch
    live_state, copy_state = live.state_dict(), copy.state_dict()
    assert live_state.keys() == copy_state.keys()
    for k, v in copy_state.items():
        assert v.device.type == "cpu" and torch.equal(v, live_state[k])
        assert v.data_ptr() != live_state[k].data_ptr()
    assert not any(p.requires_grad for p in copy.parameters())
    assert all(p.requires_grad for p in live.parameters())  # the live actor keeps training

    before = {k: v.clone() for k, v in live_state.items()}
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(1.0)
    assert all(torch.equal(live.state_dict()[k], before[k]) for k in before)
    with torch.no_grad():  # and the other way: training the live actor leaves the copy alone
        for p in live.parameters():
            p.mul_(-3.0)
    assert all(torch.equal(copy.state_dict()[k], before[k] + 1.0) for k in before)

    # the same actions as the live actor had
    obs = torch.randn(5, ENV_SPECS[ENV].obs_dim, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cpu_actor(live).act(obs, deterministic=True), live.act(obs, deterministic=True))

    # a frozen CPU copy is used as it is; anything else is copied
    assert host_actor(copy) is copy
    assert host_actor(live) is not live

    # save_policy writes the state of the copy it returns, CPU-loadable
    policy = trainer.save_policy(tmp_path / "policy.pt")
    saved = _assert_cpu_policy(tmp_path / "policy.pt", cfg)
    assert all(torch.equal(saved[k], v) for k, v in policy.state_dict().items())
    assert all(torch.equal(saved[k], v) for k, v in live.state_dict().items())


def test_logged_model_and_video_use_one_cpu_copy(monkeypatch):
    """log_final_policy hands the same CPU copy (never the live actor) to MLflow and the video."""
    import mbpo_core.video
    from components.ops import log_final_policy

    seen = []

    class Tracker:
        def log_policy(self, actor, low, high, registered):
            seen.append(actor)
            assert low.device.type == high.device.type == "cpu"

        def log_file(self, path):
            pass

    monkeypatch.setattr(mbpo_core.video, "record_episode",
                        lambda cfg, actor, path: seen.append(actor))
    cfg = make_config(ENV, TINY)
    live = Agent(cfg).actor
    log_final_policy(Tracker(), cfg, live, "")
    assert len(seen) == 2 and seen[0] is seen[1] and seen[0] is not live
    assert not seen[0].training
    assert {p.device.type for p in seen[0].parameters()} == {"cpu"}


# -- CUDA -------------------------------------------------------------------------------------
@torch.no_grad()
def _outputs(trainer: MBPOTrainer, rows: torch.Tensor, eps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every network's output and every loss of ``trainer``'s state on the given rows and noise."""
    b = trainer.real.split(rows)
    sac, model = trainer.agent.sac, trainer.dynamics.model
    mean, log_std = sac.actor.dist_params(b.obs)
    loss, stats = sac._losses(b.obs, b.act, b.rew, b.next_obs, b.done, eps, sac.log_alpha.exp())
    inputs, targets = ens.make_training_data(b.obs, b.act, b.rew, b.next_obs)
    x = model.normalize(inputs)
    members = x.expand(model.size, -1, -1)
    e_mean, e_logvar = model(members)
    return {"actor mean": mean, "actor log_std": log_std, "critic Q": sac.critic(b.obs, b.act),
            "SAC loss": loss, "SAC stats": stats, "ensemble mean": e_mean,
            "ensemble logvar": e_logvar, "ensemble loss": ens.ensemble_loss(model, members, targets),
            "holdout MSE": ens.holdout_mse(model, x, targets)}


@pytest.fixture
def no_tf32():
    """float32 matmuls in full precision on the GPU (torch's default; a TF32 one is ~1e-3 off)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.cuda
@requires_cuda
def test_cuda_train_agrees_with_cpu(tmp_path, no_tf32):
    cpu = _train(tmp_path / "cpu", 200, "cpu", "--save-state")
    gpu = _train(tmp_path / "gpu", 200, CUDA, "--save-state")
    cfg = make_config(ENV, TINY)

    # the same run shape, finite results, and a policy that loads and runs on a CPU-only machine
    assert gpu["env_steps"] == cpu["env_steps"] == 200
    assert [p[0] for p in gpu["curve"]] == [p[0] for p in cpu["curve"]]
    assert all(math.isfinite(v) for p in gpu["curve"] for v in p)
    actor = _actor(cfg)
    actor.load_state_dict(_assert_cpu_policy(tmp_path / "gpu" / "policy.pt", cfg))
    assert math.isfinite(evaluate(cfg, actor, 200)[0])

    # the same initial weights on both devices (CPU generators draw them)
    fresh_cpu, fresh_gpu = MBPOTrainer(cfg), MBPOTrainer(cfg, CUDA)
    for a, b in ((fresh_cpu.agent.sac, fresh_gpu.agent.sac),
                 (fresh_cpu.dynamics.model, fresh_gpu.dynamics.model)):
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            assert w.device.type == torch.device(CUDA).type and torch.equal(w.cpu(), v), k

    # the same arithmetic: the CPU run's trained state evaluated on both devices (see RTOL)
    ref = MBPOTrainer.from_state_dict(load_state(tmp_path / "cpu" / "state.pt"), "cpu")
    dev = MBPOTrainer.from_state_dict(load_state(tmp_path / "cpu" / "state.pt"), CUDA)
    rows = ref.real.rows()
    assert torch.equal(dev.real.rows().cpu(), rows)
    eps = torch.randn((2, rows.shape[0], ENV_SPECS[ENV].act_dim),
                      generator=torch.Generator().manual_seed(0))
    on_cpu, on_gpu = _outputs(ref, rows, eps), _outputs(dev, rows.to(CUDA), eps.to(CUDA))
    for name, value in on_cpu.items():
        assert on_gpu[name].device.type == torch.device(CUDA).type, name
        torch.testing.assert_close(on_gpu[name].cpu(), value, rtol=RTOL, atol=ATOL,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # deterministic evaluation of the same policy gives the same episodes. InvertedPendulum pays
    # 1 per step upright: an action ~1e-6 off may at most tip one borderline step.
    r_cpu = evaluate(cfg, ref.agent.actor, 200, "cpu")[2]
    r_gpu = evaluate(cfg, dev.agent.actor, 200, CUDA)[2]
    assert len(r_cpu) == len(r_gpu) and all(abs(x - y) <= 1.0 for x, y in zip(r_cpu, r_gpu))


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("gpu_first", [True, False], ids=["cuda-to-cpu", "cpu-to-cuda"])
def test_state_moves_between_cuda_and_cpu(tmp_path, gpu_first):
    first, second = (CUDA, "cpu") if gpu_first else ("cpu", CUDA)
    head = _train(tmp_path / "first", 150, first, "--save-state")
    saved = load_state(tmp_path / "first" / "state.pt")  # mapped to the CPU, whatever wrote it

    # everything but the RNG streams crosses exactly (a CUDA generator state cannot seed a CPU
    # generator or the reverse: the moved run continues on streams derived from them)
    moved = MBPOTrainer.from_state_dict(load_state(tmp_path / "first" / "state.pt"), second)
    again = moved.state_dict()
    assert (again["env_steps"], again["round"], again["curve"]) == \
        (saved["env_steps"], saved["round"], saved["curve"])
    for part in ("real", "model_data"):
        assert torch.equal(again[part]["rows"].cpu(), saved[part]["rows"]), part
    for new, old in ((again["agent"]["sac"]["modules"], saved["agent"]["sac"]["modules"]),
                     (again["dynamics"]["model"], saved["dynamics"]["model"])):
        for k, v in new.items():
            assert v.device.type == torch.device(second).type and torch.equal(v.cpu(), old[k]), k
    assert torch.equal(again["collector"]["obs"], saved["collector"]["obs"])

    tail = _train(tmp_path / "second", 250, second, "--resume-from",
                  str(tmp_path / "first" / "state.pt"), "--save-state")
    assert tail["env_steps"] == 250
    assert tail["curve"][:len(head["curve"])] == head["curve"]
    assert len(tail["curve"]) > len(head["curve"])
    assert all(math.isfinite(v) for p in tail["curve"] for v in p)
    _assert_cpu_policy(tmp_path / "second" / "policy.pt", make_config(ENV, TINY))
    # and the moved run's checkpoint moves back
    assert MBPOTrainer.from_state_dict(load_state(tmp_path / "second" / "state.pt"),
                                       first).env_steps == 250
