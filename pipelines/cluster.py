"""Kubernetes settings of a compiled pipeline: credentials, resources, GPUs, retries, caching.

They ride in the compiled YAML's platform spec (kfp-kubernetes) and are ignored by kfp.local,
so `mbpo run` does not get them; `mbpo compile` and `mbpo submit` do. Credentials only ever
come in as references to Kubernetes objects (deploy/ creates them); no value is compiled in.
"""

from __future__ import annotations

from dataclasses import dataclass

from kfp import kubernetes

S3_SECRET = "mbpo-s3"            # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
MLFLOW_SECRET = "mbpo-mlflow"    # MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD (optional)
CONFIG_MAP = "mbpo-config"       # MBPO_S3_ENDPOINT_URL, AWS_DEFAULT_REGION

# component name -> (cpu request, cpu limit, memory request, memory limit); sized for the
# Hopper preset on CPU (imagine holds 100k x k rollouts; fit and update are matmul-bound).
RESOURCES: dict[str, tuple[str, str, str, str]] = {
    "init-run": ("250m", "1", "512M", "1G"),
    "init-states": ("500m", "1", "1G", "2G"),
    "collect": ("1", "1", "1G", "2G"),
    "fit-ensemble": ("2", "4", "2G", "8G"),
    "imagine": ("2", "4", "2G", "12G"),
    "update-sac": ("2", "4", "2G", "8G"),
    "evaluate": ("1", "1", "1G", "2G"),
    "finalize": ("500m", "1", "1G", "2G"),
    "continue-chain": ("250m", "1", "512M", "1G"),
}
GPU_STEPS = ("fit-ensemble", "update-sac")


@dataclass(frozen=True)
class ClusterSettings:
    gpu: bool = False                      # an accelerator for fit_ensemble and update_sac
    accelerator: str = "nvidia.com/gpu"
    retries: int = 3                       # a lost pod or a transient error costs one step
    backoff: str = "30s"
    max_backoff: str = "600s"


def component_name(task) -> str:  # noqa: ANN001 (kfp PipelineTask)
    return task.component_spec.name.replace("_", "-")


def configure(task, settings: ClusterSettings) -> None:  # noqa: ANN001
    """Apply credentials, resources, retries and (for the matmul-heavy steps) a GPU."""
    name = component_name(task)
    kubernetes.use_secret_as_env(task, S3_SECRET, {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                                                   "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"})
    kubernetes.use_secret_as_env(task, MLFLOW_SECRET,
                                 {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                                  "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"},
                                 optional=True)
    kubernetes.use_config_map_as_env(task, CONFIG_MAP,
                                     {"MBPO_S3_ENDPOINT_URL": "MBPO_S3_ENDPOINT_URL",
                                      "AWS_DEFAULT_REGION": "AWS_DEFAULT_REGION"})
    cpu_req, cpu_lim, mem_req, mem_lim = RESOURCES[name]
    task.set_cpu_request(cpu_req).set_cpu_limit(cpu_lim)
    task.set_memory_request(mem_req).set_memory_limit(mem_lim)
    task.set_env_variable("MBPO_THREADS", cpu_lim)
    if settings.gpu and name in GPU_STEPS:
        task.set_accelerator_type(settings.accelerator).set_accelerator_limit(1)
    task.set_retry(num_retries=settings.retries, backoff_duration=settings.backoff,
                   backoff_factor=2.0, backoff_max_duration=settings.max_backoff)
    if name == "continue-chain":
        # multi-user KFP mounts a token for the KFP API only into pods with this label
        kubernetes.add_pod_label(task, "access-ml-pipeline", "true")
