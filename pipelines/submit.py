"""Submit a training run to a Kubeflow Pipelines cluster as a chain of pipeline runs.

The chain continues either from this CLI (``follow=True``: wait for each run, then submit the
next) or from the cluster itself (``chain_in_cluster``: every pipeline run ends with a task that
submits the next one), so no laptop has to stay awake. Either way the next run starts from the
last complete round recorded in the run's object store.

``continue_chain`` is that last task: ``pipelines.pipeline`` compiles it into every pipeline (it is
passed in, so the dependency goes one way: this module uses the pipeline, never the reverse).
KFP embeds its source in the compiled YAML and reads its annotations as parameter types, which is
why this module has no ``from __future__ import annotations``.
"""

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from components import DEFAULT_IMAGE
from mbpo_core.config import ConfigError

from .chain import DEFAULT_ROUNDS_PER_RUN, TrainingRun, next_run

log = logging.getLogger(__name__)

TOKEN_ENV = "KFP_TOKEN"  # a bearer token for the KFP API (never a flag: it would land in shell history)


class SubmitError(RuntimeError):
    """The cluster refused a run, or a run of the chain did not succeed."""


@dataclass(frozen=True)
class ClusterTarget:
    host: str | None  # None inside the cluster: kfp.Client finds the API service itself
    namespace: str | None = None
    experiment: str = "mbpo"
    image: str = DEFAULT_IMAGE
    rounds_per_run: int = DEFAULT_ROUNDS_PER_RUN
    chain_in_cluster: bool = False
    gpu: bool = False


IN_CLUSTER_API = "http://ml-pipeline.kubeflow.svc.cluster.local:8888"


def _client(target: ClusterTarget):  # noqa: ANN202
    import kfp

    if target.host is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        # inside a pod: the KFP API service, authenticated by the pod's projected token
        from kfp.client import ServiceAccountTokenVolumeCredentials

        return kfp.Client(host=IN_CLUSTER_API, namespace=target.namespace,
                          credentials=ServiceAccountTokenVolumeCredentials())
    return kfp.Client(host=target.host, namespace=target.namespace,
                      existing_token=os.environ.get(TOKEN_ENV) or None)


def submit_next(run: TrainingRun, target: ClusterTarget, part_name: str) -> str | None:
    """Submit the next pipeline run of ``run``'s chain; its KFP run id, or None when done."""
    if not run.run_url.startswith("s3://"):
        raise ConfigError(f"--store for a cluster run must be an s3:// URL (pods cannot see "
                          f"{run.run_url!r})")
    step = next_run(run, target.rounds_per_run)
    if step is None:
        log.info("%s is complete: nothing to submit", run.run_url)
        return None
    arguments = dict(step.arguments)
    if target.chain_in_cluster:
        arguments |= {"chain_in_cluster": True, "kfp_host": target.host or "",
                      "namespace": target.namespace or "", "kfp_experiment": target.experiment,
                      "rounds_per_run": target.rounds_per_run, "next_image": target.image}
    from .cluster import ClusterSettings
    from .pipeline import compile_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(step.rounds, Path(tmp) / "mbpo.yaml", resume=step.resume,
                                   image=target.image, cluster=ClusterSettings(gpu=target.gpu),
                                   chain_step=continue_chain)
        try:
            result = _client(target).create_run_from_pipeline_package(
                str(package), arguments=arguments, run_name=part_name,
                experiment_name=target.experiment, namespace=target.namespace,
                enable_caching=False)
        except Exception as e:
            raise SubmitError(f"the KFP API at {target.host or 'in-cluster'} refused the run: {e}") from e
    log.info("submitted %s (%d rounds): run id %s", part_name, step.rounds, result.run_id)
    return result.run_id


# The pipeline's last task (a KFP lightweight component): KFP copies this function's source, alone,
# into the compiled YAML, and a pod runs it with the project image's packages; so it imports what
# it uses itself, from this very module too. Any change to its text changes the compiled YAML.
def continue_chain(run_url: str, total_steps: int, device: str, kfp_host: str, namespace: str,
                   kfp_experiment: str, rounds_per_run: int, image: str, tracking_uri: str,
                   mlflow_experiment: str, registered_model: str, gpu: bool) -> str:
    """Submit the next pipeline run of this training run (chaining from inside the cluster)."""
    from pipelines.chain import existing_run
    from pipelines.submit import ClusterTarget, submit_next

    run = existing_run(run_url, total_steps, device)
    ckpt = run.store.checkpoint()
    name = run_url.rstrip("/").rsplit("/", 1)[-1] + f"-from-r{ckpt.round + 1 if ckpt else 0}"
    target = ClusterTarget(kfp_host or None, namespace or None, kfp_experiment, image,
                           rounds_per_run, chain_in_cluster=True, gpu=gpu)
    run.tracking_uri, run.mlflow_experiment = tracking_uri, mlflow_experiment
    run.registered_model = registered_model
    return submit_next(run, target, name) or ""


def submit_chain(run: TrainingRun, target: ClusterTarget, name: str, follow: bool,
                 timeout_s: int = 7 * 24 * 3600) -> list[str]:
    """Submit the first run (and with ``follow`` every next one, waiting for each)."""
    ids: list[str] = []
    part = 0
    while True:
        run_id = submit_next(run, target, f"{name}-part{part:03d}")
        if run_id is None:
            return ids
        ids.append(run_id)
        if not follow:
            return ids
        done = _client(target).wait_for_run_completion(run_id, timeout=timeout_s)
        state = str(getattr(done, "state", "")).upper()
        if "SUCCEEDED" not in state:
            raise SubmitError(f"pipeline run {run_id} ended {state or 'unknown'}; continue the "
                              f"training run with: mbpo submit --resume-from {run.run_url} ...")
        part += 1
