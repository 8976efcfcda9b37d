"""Fault campaign: a 10-round ``mbpo run --stack`` under a seeded schedule of faults.

Each fault is followed by the recovery the README documents (``mbpo stack up``, ``mbpo run
--resume-from``, freeing the disk, ``mbpo sync`` at the end), done through the ``mbpo`` command
as a user would. The report says what was injected and recovered, what was lost or duplicated
(from the run's manifests and stored objects), which metrics MLflow lacks against summary.json,
and whether the final curve and policy weights equal an undisturbed ``mbpo train``.

    python benchmarks/faults.py --faults 24 --seed 0 --json bench_out/faults.json

Fault kinds: SIGKILL of SeaweedFS, of the MLflow server, of a step process (the task's process
or its warm worker), of the driver alone (as the OOM killer would); a `stack down`/`up` cycle;
a full disk under the run's --out folder (kfp.local's local artifact root), a small tmpfs that
is filled up (needs root to mount; without it that kind is left out and the report says so).
Each fault waits for the run to make progress (a new step record) and then a random delay, so
faults land at random moments inside steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ENV = "InvertedPendulum-v5"
# a small configuration, so that a 10-round run takes about a minute undisturbed
CONFIG = [
    "init_steps=100", "steps_per_round=50", "epoch_length=50", "eval_episodes=1",
    "ensemble.ensemble_size=3", "ensemble.num_elites=2", "ensemble.hidden_size=32",
    "ensemble.num_hidden_layers=2", "ensemble.weight_decay=[1e-5, 1e-5, 1e-5]",
    "ensemble.max_epochs=5", "rollout.batch_size=256", "rollout.schedule=[0, 2, 1, 3]",
    "sac.hidden_size=32", "sac.updates_per_step=1", "sac.batch_size=64",
]
KINDS = ("kill_s3", "kill_mlflow", "kill_step", "kill_driver", "stack_cycle", "disk_full")
RUN_NAME, EXPERIMENT, MODEL = "campaign", "fault-campaign", "fault-campaign-policy"


def _env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def mbpo(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """One ``mbpo`` command, as a user types it."""
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True,
                          text=True, env=_env(), timeout=timeout, cwd=REPO)


def _must(proc: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return proc


# -- processes ----------------------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _cmdline(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
    except OSError:
        return ""


def _descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def session_members(sid: int) -> list[int]:
    """Processes still in a driver's session (orphans outlive a driver killed alone)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def _step_processes(driver: int) -> tuple[list[int], list[int]]:
    """(task processes kfp.local started, warm-worker forks running a step) under the driver."""
    tasks, forks = [], []
    for pid in _descendants(driver):
        cmd = _cmdline(pid)
        if " -m components.worker " in cmd:
            forks += _descendants(pid)  # the server's children are the forks running steps
        elif " -m kfp.dsl.executor_main " in cmd:
            tasks.append(pid)
    return tasks, forks


# -- the campaign --------------------------------------------------------------------------------
@dataclass
class Fault:
    index: int
    kind: str
    trigger: int                 # injected once the store holds this many step records ...
    delay_s: float               # ... and this long after the run (re)started or last progressed
    injected: bool = False
    at_records: int = 0          # step records in the store when it was injected
    detail: str = ""
    run_failed: bool = False     # the driver exited non-zero after it
    failure_clear: bool = True   # ... and said why and how to resume
    recovered_s: float | None = None  # until the run made progress again


@dataclass
class Campaign:
    workdir: Path
    faults: int
    seed: int
    rounds: int = 10
    rounds_per_run: int = 3
    disk_mb: int = 48
    updates_per_step: int = 20
    timeout_s: float = 3600
    log: list[str] = field(default_factory=list)

    @property
    def config(self) -> list[str]:
        # heavier SAC work than CONFIG: each step lasts long enough for faults to land inside it
        return CONFIG + [f"sac.updates_per_step={self.updates_per_step}"]

    @property
    def total_steps(self) -> int:
        return 100 + 50 * (self.rounds - 1)

    def say(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        self.log.append(line)
        print(line, file=sys.stderr, flush=True)

    # ---- setup
    def run(self) -> dict:
        from pipelines import stack

        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        self.stack_dir, self.out, self.logs = w / "stack", w / "out", w / "logs"
        self.logs.mkdir(exist_ok=True)
        self.say(f"reference: undisturbed mbpo train, {self.total_steps} steps")
        started = time.perf_counter()
        _must(mbpo("train", "--env", ENV, "--total-steps", str(self.total_steps), "--seed",
                   str(self.seed), "--out", str(w / "reference"), "--no-progress",
                   "--no-tracking", "--set", *self.config), "the reference run")
        reference_s = time.perf_counter() - started
        _must(mbpo("stack", "up", "--dir", str(self.stack_dir)), "stack up")
        self.info = stack.load(self.stack_dir)
        os.environ.update(self.info.env())
        self.run_url = f"{self.info.env()['MBPO_STORE']}/runs/{RUN_NAME}"
        kinds = list(KINDS)
        self.tmpfs = self._mount_tmpfs()
        if not self.tmpfs:
            kinds.remove("disk_full")
            self.say("disk_full left out: mounting a tmpfs needs root")
        rng = np.random.default_rng(self.seed)
        plan = [kinds[i % len(kinds)] for i in range(self.faults)]
        rng.shuffle(plan)
        # moments spread over the whole run: a record count each (a round writes 5 step records;
        # a count is reached again while a resumed run redoes steps), then a random delay
        triggers = np.sort(rng.integers(1, 5 * self.rounds - 1, size=self.faults))
        self.plan = [Fault(i, k, int(t), float(rng.uniform(0.0, 2.0)))
                     for i, (k, t) in enumerate(zip(plan, triggers))]
        self.rng = rng
        try:
            started = time.perf_counter()
            outcome = self._drive()
            wall_s = time.perf_counter() - started
            report = self._check(outcome)
        finally:
            self._cleanup()
        report |= {"wall_s": round(wall_s, 1), "reference_train_s": round(reference_s, 1),
                   "seed": self.seed, "rounds": self.rounds, "total_steps": self.total_steps,
                   "rounds_per_run": self.rounds_per_run, "disk_full_injected": self.tmpfs,
                   "faults": [asdict(f) for f in self.plan]}
        return report

    def _mount_tmpfs(self) -> bool:
        self.out.mkdir(exist_ok=True)
        if os.geteuid() != 0:
            return False
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.disk_mb}m", "tmpfs",
                               str(self.out)], capture_output=True, text=True)
        if done.returncode != 0:
            self.say(f"disk_full left out: mount failed: {done.stderr.strip()}")
            return False
        return True

    def _cleanup(self) -> None:
        for proc in getattr(self, "drivers", []):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        mbpo("stack", "down", "--dir", str(self.stack_dir))
        if (self.out / "pipeline.log").exists():  # the tmpfs goes: keep the steps' log
            shutil.copy(self.out / "pipeline.log", self.logs / "pipeline.log")
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.out)], capture_output=True)

    # ---- the run, the faults and the recoveries
    def _start(self, resume: bool) -> subprocess.Popen:
        args = ["run", "--stack", str(self.stack_dir), "--out", str(self.out), "--no-progress"]
        if resume:
            args += ["--resume-from", self.run_url]
        else:
            args += ["--env", ENV, "--total-steps", str(self.total_steps), "--seed",
                     str(self.seed), "--run-name", RUN_NAME, "--rounds-per-run",
                     str(self.rounds_per_run), "--experiment", EXPERIMENT,
                     "--registered-model", MODEL, "--set", *self.config]
        n = len(self.drivers)
        stderr = (self.logs / f"driver-{n}.log").open("w")
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=stderr, env=_env(),
                                start_new_session=True)
        stderr.close()
        self.drivers.append(proc)
        self.say(f"driver {n} started{' (resume)' if resume else ''}: pid {proc.pid}")
        return proc

    def _records(self) -> int | None:
        from mbpo_core.runstore import RunStore

        try:
            return len(RunStore(self.run_url).store.list("rounds/"))
        except Exception:
            return None  # the store is down

    def _drive(self) -> dict:
        self.drivers: list[subprocess.Popen] = []
        driver = self._start(resume=False)
        started_at = time.monotonic()
        deadline = time.monotonic() + self.timeout_s
        pending = iter(self.plan)
        fault, last_records, last_fault, last_fault_at = next(pending, None), 0, None, 0.0
        progress_at: float | None = None
        resumes, failures_in_a_row = 0, 0
        while True:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the campaign did not finish in {self.timeout_s:.0f} s")
            records = self._records()
            since = progress_at if progress_at is not None else started_at
            if records is not None and records > last_records:
                last_records, progress_at = records, time.monotonic()
                failures_in_a_row = 0
                if last_fault is not None and last_fault.recovered_s is None:
                    last_fault.recovered_s = round(time.monotonic() - last_fault_at, 1)
            rc = driver.poll()
            if rc is not None:
                if rc == 0 and self._complete():
                    break
                failures_in_a_row += 1
                if failures_in_a_row > 3:
                    raise RuntimeError(f"resumes keep failing; last log: "
                                       f"{self.logs}/driver-{len(self.drivers) - 1}.log")
                self._note_failure(rc, last_fault)
                self._recover_stack()
                driver = self._start(resume=True)
                started_at, resumes = time.monotonic(), resumes + 1
                progress_at = None
                continue
            if fault is not None and last_records >= fault.trigger \
                    and time.monotonic() - since >= fault.delay_s:
                fault.at_records = last_records
                self._inject(fault, driver)
                last_fault, last_fault_at = fault, time.monotonic()
                fault, progress_at, started_at = next(pending, None), None, time.monotonic()
                continue
            time.sleep(0.1)
        self.say(f"run complete after {sum(f.injected for f in self.plan)} faults and {resumes} "
                 "resumes")
        return {"resumes": resumes, "drivers": len(self.drivers)}

    def _complete(self) -> bool:
        try:
            summary = json.loads((self.out / "summary.json").read_text())
        except (OSError, ValueError):
            return False
        return summary.get("env_steps") == self.total_steps

    def _note_failure(self, rc: int, fault: Fault | None) -> None:
        text = (self.logs / f"driver-{len(self.drivers) - 1}.log").read_text(errors="replace")
        # a failed run names its resume command; a resume that could not start (its store
        # down) says to bring the stack up and run it again
        advice = f"--resume-from {self.run_url}" in text or "run this command again" in text
        clear = rc < 0 or (advice and "Traceback" not in
                           text.split("finished with status", 1)[-1])
        self.say(f"driver exited {rc}; {'clear' if clear else 'UNCLEAR'} failure")
        if fault is not None:
            fault.run_failed = True
            fault.failure_clear = fault.failure_clear and clear

    def _recover_stack(self) -> None:
        """`mbpo stack up`, as the failure message and `mbpo stack status` advise."""
        from pipelines import stack

        if not all(stack.status(self.stack_dir).values()):
            _must(mbpo("stack", "up", "--dir", str(self.stack_dir)), "stack up")
            self.info = stack.load(self.stack_dir)

    def _inject(self, fault: Fault, driver: subprocess.Popen) -> None:
        from pipelines import stack

        info = stack.load(self.stack_dir)
        kind = fault.kind
        if kind == "kill_s3":
            os.killpg(info.s3_pid, signal.SIGKILL)
            fault.detail = f"SeaweedFS pid {info.s3_pid}"
        elif kind == "kill_mlflow":
            os.killpg(info.mlflow_pid, signal.SIGKILL)
            fault.detail = f"mlflow server pid {info.mlflow_pid}"
        elif kind == "kill_step":
            target = None
            for _ in range(100):  # between two steps there is none for a moment
                tasks, forks = _step_processes(driver.pid)
                choices = [("task", p) for p in tasks] + [("worker", p) for p in forks]
                if choices:
                    target = choices[int(self.rng.integers(len(choices)))]
                    break
                time.sleep(0.05)
            if target is None:
                fault.detail = "no step process was running"
            else:
                os.kill(target[1], signal.SIGKILL)
                fault.detail = f"{target[0]} process pid {target[1]}: {_cmdline(target[1])[:80]}"
        elif kind == "kill_driver":
            os.kill(driver.pid, signal.SIGKILL)
            driver.wait()
            time.sleep(2.0)
            orphans = [p for p in session_members(driver.pid)]
            fault.detail = f"driver pid {driver.pid}; {len(orphans)} process(es) of its " \
                           f"session alive 2 s later"
        elif kind == "stack_cycle":
            _must(mbpo("stack", "down", "--dir", str(self.stack_dir)), "stack down")
            time.sleep(float(self.rng.uniform(0.5, 3.0)))
            fault.detail = "stack down, then up"
        elif kind == "disk_full":
            filler = self.out / ".filler"
            with filler.open("wb") as f:
                try:
                    while True:
                        f.write(b"\0" * (1 << 20))
                        f.flush()
                except OSError:
                    pass
            fault.detail = f"{self.out} filled ({filler.stat().st_size >> 20} MiB of filler)"
            # the run fails at its next write here; then the user frees the disk and resumes
            try:
                driver.wait(timeout=300)
            except subprocess.TimeoutExpired:
                fault.detail += "; the run did not notice in 300 s"
            filler.unlink()
        fault.injected = True
        self.say(f"fault {fault.index}: {kind} ({fault.detail})")
        if kind in ("kill_s3", "kill_mlflow", "stack_cycle"):
            self._recover_stack()

    # ---- the checks
    def _check(self, outcome: dict) -> dict:
        import torch
        from mlflow.tracking import MlflowClient

        from mbpo_core.runstore import RunStore
        from mbpo_core.shards import ShardManifest
        from mbpo_core.storage import open_store, split_uri

        self._recover_stack()
        synced = _must(mbpo("sync", self.run_url), "mbpo sync").stdout.strip().splitlines()[-1]
        self.say(synced)
        got = json.loads((self.out / "summary.json").read_text())
        want = json.loads((self.workdir / "reference" / "summary.json").read_text())
        a = torch.load(self.out / "policy.pt", weights_only=True)
        b = torch.load(self.workdir / "reference" / "policy.pt", weights_only=True)
        weights_equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

        run = RunStore(self.run_url)
        ckpt = run.checkpoint()
        store, key = split_uri(ckpt.artifacts["real_manifest"])
        manifest = ShardManifest.from_json(store.get(key).decode())
        rows = sum(s.rows for s in manifest.shards)
        listed = open_store(run.url)
        real = sorted(f"{run.url}/{k}" for k in listed.list("real/"))
        uris = [s.uri for s in manifest.shards]
        unique_rows = sum({s.uri: s.rows for s in manifest.shards}.values())
        model = listed.list("model/")

        client = MlflowClient(self.info.mlflow_uri)
        exp = client.get_experiment_by_name(EXPERIMENT)
        [mlrun] = client.search_runs([exp.experiment_id])
        history = [(m.step, m.value) for m in
                   client.get_metric_history(mlrun.info.run_id, "eval/return_mean")]
        curve = {int(s): m for s, m, _ in got["curve"]}
        logged = {}
        for step, value in history:
            logged.setdefault(step, []).append(value)
        per_round = [k for k in mlrun.data.metrics if k.startswith(("sac/", "model/", "eval/"))]
        histories = {k: client.get_metric_history(mlrun.info.run_id, k) for k in per_round}
        lengths = {k: len(h) for k, h in histories.items()}
        repeated = sum(len(h) - len({m.step for m in h}) for h in histories.values())
        versions = client.search_model_versions(f"name = '{MODEL}'")
        pending = [k for k in open_store(f"{self.run_url}/tracking-pending").list()]
        leftover = [p for d in self.drivers for p in session_members(d.pid)]
        return {
            "faults_planned": len(self.plan),
            "faults_injected": sum(f.injected for f in self.plan),
            "by_kind": {k: sum(f.injected and f.kind == k for f in self.plan) for k in KINDS},
            "runs_failed": sum(f.run_failed for f in self.plan),
            "failures_clear": sum(f.run_failed and f.failure_clear for f in self.plan),
            "resumes": outcome["resumes"],
            "run_complete": self._complete(),
            "transitions_expected": self.total_steps,
            "transitions_stored": rows,
            "transitions_lost": max(0, self.total_steps - unique_rows),
            "transitions_duplicated": (rows - unique_rows) + max(0, unique_rows - self.total_steps),
            "real_shards_not_in_manifest": len(set(real) - set(uris)),
            "manifest_shards_missing": len(set(uris) - set(real)),
            "model_shards": len(model), "model_shards_expected": self.rounds,
            "model_shards_per_round_once": sorted(k.split("/")[-1].split("-")[0] for k in model)
            == [f"{r:06d}" for r in range(self.rounds)],
            "mlflow_eval_points_missing": len(set(curve) - set(logged)),
            "mlflow_eval_points_wrong": sum(any(v != curve[s] for v in vs)
                                            for s, vs in logged.items() if s in curve),
            "mlflow_points_repeated": repeated,
            "mlflow_metric_lengths": lengths,
            "mlflow_status": mlrun.info.status,
            "mlflow_model_versions": len(versions),
            "pending_after_sync": len(pending),
            "sync": synced,
            "curve_equal": got["curve"] == want["curve"],
            "weights_equal": weights_equal,
            "leftover_processes": len(leftover),
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faults", type=int, default=24, help="faults to inject (default 24)")
    p.add_argument("--seed", type=int, default=0, help="fixes the schedule and the run")
    p.add_argument("--rounds", type=int, default=10, help="rounds of the run (default 10)")
    p.add_argument("--rounds-per-run", type=int, default=3)
    p.add_argument("--updates-per-step", type=int, default=20,
                   help="SAC updates per env step (default 20: rounds of several seconds)")
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    args = p.parse_args(argv)
    # a SIGTERM (a CI timeout) ends it through the finally clauses: stack down, tmpfs unmounted
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.faults < 1 or args.rounds < 2:
        p.error(f"--faults must be >= 1 (got {args.faults}), --rounds >= 2 (got {args.rounds})")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mbpo-faults-"))
    try:
        report = Campaign(workdir, args.faults, args.seed, args.rounds, args.rounds_per_run,
                          updates_per_step=args.updates_per_step).run()
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    ok = (report["run_complete"] and report["curve_equal"] and report["weights_equal"]
          and report["transitions_lost"] == 0 and report["transitions_duplicated"] == 0
          and report["real_shards_not_in_manifest"] == 0 and report["manifest_shards_missing"] == 0
          and report["model_shards_per_round_once"]
          and report["mlflow_eval_points_missing"] == 0 and report["pending_after_sync"] == 0
          and report["mlflow_points_repeated"] == 0 and report["mlflow_model_versions"] == 1
          and report["mlflow_status"] == "FINISHED" and report["faults_injected"] == report[
              "faults_planned"]
          and report["failures_clear"] == report["runs_failed"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
