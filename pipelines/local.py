"""Run a training run on this machine: the pipeline, chained, under ``kfp.local``.

Each task runs as a subprocess of this Python (SubprocessRunner, no venv, no pip install), so the
same component definitions that run in the project image on a cluster run here unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from components import DEFAULT_IMAGE
from mbpo_core.storage import read_uri

from .chain import TrainingRun, next_run, summary
from .pipeline import DEFAULT_ROUNDS_PER_RUN, build_pipeline
from .submit import continue_chain

log = logging.getLogger(__name__)


class PipelineRunError(RuntimeError):
    """A local pipeline run failed; the training run can be continued with --resume-from."""


def run_local(run: TrainingRun, out: Path, rounds_per_run: int = DEFAULT_ROUNDS_PER_RUN,
              pipeline_root: Path | None = None, warm_workers: bool = True,
              keep_artifacts: bool = False, verbose: bool = False, progress: bool = True,
              runner: str = "subprocess", image: str | None = None) -> dict[str, Any]:
    """Chain local pipeline runs until ``run.total_steps``; write OUT/summary.json and policy.pt.

    With ``warm_workers`` each task hands its step to a server that has torch imported already
    (:mod:`components.worker`), saving about 3 s of imports per task; results are identical.
    kfp.local's task logs go to OUT/pipeline.log (to the console with ``verbose``), and a
    progress bar follows the run's round records."""
    root = pipeline_root or out / "kfp-root"
    docker = check_docker(run, image, root) if runner == "docker" else None
    try:
        return _run(run, out, rounds_per_run, root, docker, warm_workers, keep_artifacts,
                    verbose, progress, image)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # kfp.local's artifacts, the task log and the summary live under OUT: a full disk there
        # stops the run, never the stored rounds (they are in the run's store)
        raise PipelineRunError(f"no space left on the device holding {out} ({e.strerror}); "
                               f"free some space, then continue the training run with: mbpo "
                               f"run --resume-from {run.run_url}") from None


def _run(run: TrainingRun, out: Path, rounds_per_run: int, root: Path, docker, warm_workers: bool,
         keep_artifacts: bool, verbose: bool, progress: bool, image: str | None
         ) -> dict[str, Any]:
    from kfp import local

    from components.worker import DRIVER_ENV, StepServer

    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"run_url": run.run_url}, indent=1))
    (out / "config.json").write_text(run.config.to_json())
    if docker is not None:
        warm_workers = False  # steps run in containers of the image, not in forks of this Python
        local.init(runner=docker.runner(), pipeline_root=str(root.resolve()), raise_on_error=True)
    else:
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
                   raise_on_error=True)
    start = time.perf_counter()
    log_path = out / "pipeline.log"
    # the log grows over resumes: only what this run writes can name its failure's cause
    log_start = log_path.stat().st_size if log_path.is_file() else 0
    with contextlib.ExitStack() as stack:
        if docker is None:  # task processes end when this driver does (not seen from containers)
            stack.enter_context(_environ(DRIVER_ENV, str(os.getpid())))
        if warm_workers:
            stack.enter_context(StepServer())
        if docker is not None:
            from .docker_runner import exit_status_kept

            stack.enter_context(exit_status_kept())
        if not verbose:
            log.info("task logs: %s", log_path)
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(
                _TaskLog(log_path))))
        stack.enter_context(_Progress(run, enabled=progress))
        _chain(run, rounds_per_run, root, keep_artifacts, {"image": image} if image else {},
               None if verbose else (log_path, log_start))
    result = summary(run, time.perf_counter() - start)
    (out / "policy.pt").write_bytes(read_uri(run.store.store.uri("policy.pt")))
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    shutil.rmtree(root / ".tmp", ignore_errors=True)
    _report_pending(run)
    return result


class _TaskLog(io.TextIOBase):
    """OUT/pipeline.log, where kfp.local's task logs go. On a full disk it stops writing instead
    of turning every log line into a "--- Logging error ---" traceback on the console; the run
    then fails at its next artifact write, with the message of :func:`run_local`."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 (closed by __exit__)
        self.full = False

    def _guard(self, fn, default):  # noqa: ANN001, ANN202
        if self.full:
            return default
        try:
            return fn()
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self.full = True
            return default

    def write(self, text: str) -> int:
        return self._guard(lambda: self.file.write(text), len(text))

    def flush(self) -> None:
        if not self.file.closed:
            self._guard(self.file.flush, None)

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.file.closed:
            self._guard(self.file.close, None)
        super().close()


@contextlib.contextmanager
def _environ(key: str, value: str):  # noqa: ANN202 (a context manager)
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _report_pending(run: TrainingRun) -> None:
    """Say here, not only in a step's log, what the steps kept while MLflow was unreachable."""
    from mbpo_core.tracking import PENDING_DIR

    try:
        kept = [k for k in run.store.store.child(PENDING_DIR).list() if k.endswith(".jsonl")]
    except Exception as e:  # the run itself is done and stored; this is advice only
        log.warning("could not check for tracking records kept in %s/%s: %s", run.run_url,
                    PENDING_DIR, e)
        return
    if kept:
        log.error("the MLflow server was unreachable when the run ended: %d batch(es) of tracking "
                  "records (metrics, the final policy, the run's end) are kept in %s/%s; once "
                  "the server answers, send them with `mbpo sync %s`", len(kept), run.run_url,
                  PENDING_DIR, run.run_url)


class _Progress:
    """A tqdm bar over env steps, fed by polling the run's round records from a thread."""

    def __init__(self, run: TrainingRun, enabled: bool, every_s: float = 2.0) -> None:
        self.run, self.enabled, self.every_s = run, enabled, every_s
        self.stop = threading.Event()
        self.last: int | None = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.run.total_steps, unit="step", desc=self.run.env,
                            dynamic_ncols=True, file=sys.stderr)
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def _update(self) -> None:
        rounds = self.run.store.complete_rounds()
        if rounds and rounds[-1] != self.last:
            self.last = rounds[-1]
            steps, m = self.run.store.round_metrics(rounds[-1])
            self.bar.update(steps - self.bar.n)
            self.bar.set_postfix(round=rounds[-1], ret=f"{m['eval/return_mean']:.1f}",
                                 k=int(m["rollout/length"]))

    def _poll(self) -> None:
        while not self.stop.wait(self.every_s):
            with contextlib.suppress(Exception):  # a record mid-write: next poll
                self._update()

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.stop.set()
            self.thread.join()
            with contextlib.suppress(Exception):
                self._update()
            self.bar.close()


def _prune(root: Path, run: TrainingRun) -> None:
    """Delete the artifacts of earlier pipeline runs: the chain continues from the last complete
    round's states only, so a long local run keeps one pipeline run's worth on disk."""
    ckpt = run.store.checkpoint()
    if ckpt is None:
        return
    keep = {Path(uri.removeprefix("file://")).resolve() for uri in ckpt.artifacts.values()}
    for pipeline_run in root.iterdir():
        if pipeline_run.is_dir() and not pipeline_run.name.startswith(".") and not any(
                pipeline_run.resolve() in k.parents for k in keep):
            shutil.rmtree(pipeline_run, ignore_errors=True)


def check_docker(run: TrainingRun, image: str | None, pipeline_root: Path,
                 dry_run: bool = False):  # -> DockerSetup
    """Everything the containers need, checked before the first task (engine, image, package,
    store and tracking server reachable, shared folders writable), as a PipelineRunError."""
    from .docker_runner import DockerSetup, DockerSetupError

    try:
        setup = DockerSetup(image or DEFAULT_IMAGE, run.run_url, run.tracking_uri, pipeline_root)
        setup.check(dry_run=dry_run)
    except DockerSetupError as e:
        msg = str(e)
        raise PipelineRunError(msg if msg.startswith("--runner docker") else
                               f"--runner docker: {msg}") from None
    return setup


_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception|Failed)): (.+)$")


def _cause(task_log: tuple[Path, int] | None) -> str:
    """The last exception a task of this run logged: the reason behind kfp.local's 'task
    failed'. ``task_log``: the log file and where this run's part of it starts."""
    if task_log is None or not task_log[0].is_file():
        return ""
    with task_log[0].open("rb") as f:
        f.seek(task_log[1])
        text = f.read().decode(errors="replace")
    for line in reversed(text.splitlines()[-2000:]):
        m = _ERROR_LINE.match(line)
        if m and m.group(1) not in ("RuntimeError", "StepFailed"):
            return f"\ncause: {m.group(1)}: {m.group(2)}"
    return ""


def _chain(run: TrainingRun, rounds_per_run: int, root: Path, keep_artifacts: bool,
           image_kw: dict[str, str], task_log: tuple[Path, int] | None) -> None:
    while (step := next_run(run, rounds_per_run)) is not None:
        log.info("pipeline run: %d round(s)%s", step.rounds, " (continuing)" if step.resume else "")
        pipeline = build_pipeline(step.rounds, resume=step.resume, chain_step=continue_chain,
                                  **image_kw)
        try:
            with warnings.catch_warnings():
                # the project image's name does not contain "python"; it does hold this package
                warnings.filterwarnings("ignore", message=".*non-Python base image.*")
                # display names are for the KFP UI; kfp.local has none
                warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
                pipeline(**step.arguments)
        except Exception as e:  # kfp.local raises RuntimeError naming the failed task
            raise PipelineRunError(f"{e}{_cause(task_log)}\nthe training run is stored at "
                                   f"{run.run_url}; continue it with: mbpo run --resume-from "
                                   f"{run.run_url}") from e
        if not keep_artifacts:
            _prune(root, run)
