"""The KFP v2 components: one per MBPO step, plus run setup and publishing.

Each is a lightweight Python component declared with the project image as ``base_image`` and
``install_kfp_package=False``: on a cluster the image already holds kfp, ``mbpo_core`` and this
package, so nothing is pip-installed at run time; under ``kfp.local``'s SubprocessRunner the same
definition runs in the current environment. Bodies only forward to :mod:`components.ops`
through :func:`components.worker.run_step` (in-process, or on ``mbpo run``'s warm step server);
KFP serializes a body's source, so its imports live inside it.
"""


from types import SimpleNamespace
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components import DEFAULT_IMAGE


def init_run(env: str, seed: int, overrides: list, run_url: str, total_steps: int,
             tracking_uri: str, mlflow_experiment: str, parent_run_id: str, kfp_run_id: str,
             image: str, config: Output[Artifact], registered_model: str = ""):
    """Validate the whole configuration, set up (or check) the run's storage prefix, and create
    (or reopen) the training run's MLflow run."""
    from components.worker import run_step
    run_step("init_run", env=env, seed=seed, overrides=overrides, run_url=run_url,
             total_steps=total_steps, config=config, tracking_uri=tracking_uri,
             experiment=mlflow_experiment, parent_run_id=parent_run_id,
             tags={"kfp.pipeline_run_id": kfp_run_id, "image": image},
             registered_model=registered_model)


def init_states(config: Input[Artifact], collector: Output[Artifact], dynamics: Output[Model],
                agent: Output[Model], policy: Output[Model], rollout: Output[Artifact],
                real_manifest: Output[Dataset], model_manifest: Output[Dataset]):
    """The initial states of a fresh run."""
    from components.worker import run_step
    run_step("init_states", config=config, collector=collector, dynamics=dynamics, agent=agent,
             policy=policy, rollout=rollout, real_manifest=real_manifest,
             model_manifest=model_manifest)


def collect(config: Input[Artifact], collector_in: Input[Artifact], policy: Input[Model],
            real_manifest_in: Input[Dataset], run_url: str, total_steps: int, env_steps: int,
            prev_round: int, collector_out: Output[Artifact], real_manifest_out: Output[Dataset],
            metrics: Output[Metrics]) -> NamedTuple("CollectOutputs", env_steps=int, round_index=int):
    """Step the real environment with the current policy; store the new rows as a shard."""
    from components.worker import run_step
    steps, round_index = run_step(
        "collect", config=config, collector_in=collector_in, policy=policy,
        real_manifest_in=real_manifest_in, run_url=run_url, total_steps=total_steps,
        env_steps=env_steps, prev_round=prev_round, collector_out=collector_out,
        real_manifest_out=real_manifest_out, metrics=metrics)
    return NamedTuple("CollectOutputs", env_steps=int, round_index=int)(steps, round_index)


def fit_ensemble(config: Input[Artifact], dynamics_in: Input[Model], real_manifest: Input[Dataset],
                 run_url: str, round_index: int, env_steps: int, device: str,
                 dynamics_out: Output[Model], metrics: Output[Metrics]):
    """Fit the probabilistic dynamics ensemble on all real transitions."""
    from components.worker import run_step
    run_step("fit_ensemble_step", config=config, dynamics_in=dynamics_in,
             real_manifest=real_manifest, run_url=run_url, round_index=round_index,
             env_steps=env_steps, device=device, dynamics_out=dynamics_out, metrics=metrics)


def imagine(config: Input[Artifact], dynamics: Input[Model], policy: Input[Model],
            real_manifest: Input[Dataset], model_manifest_in: Input[Dataset],
            rollout_in: Input[Artifact], run_url: str, round_index: int, env_steps: int, device: str,
            model_manifest_out: Output[Dataset], rollout_out: Output[Artifact],
            metrics: Output[Metrics]):
    """Generate k-step model rollouts from real start states; store them as a shard."""
    from components.worker import run_step
    run_step("imagine_step", config=config, dynamics=dynamics, policy=policy,
             real_manifest=real_manifest, model_manifest_in=model_manifest_in,
             rollout_in=rollout_in, run_url=run_url, round_index=round_index,
             env_steps=env_steps, device=device, model_manifest_out=model_manifest_out,
             rollout_out=rollout_out, metrics=metrics)


def update_sac(config: Input[Artifact], agent_in: Input[Model], real_manifest: Input[Dataset],
               model_manifest: Input[Dataset], run_url: str, round_index: int, env_steps: int,
               device: str, agent_out: Output[Model], policy_out: Output[Model],
               metrics: Output[Metrics]):
    """SAC gradient steps on mixed real and imagined batches."""
    from components.worker import run_step
    run_step("update_sac_step", config=config, agent_in=agent_in, real_manifest=real_manifest,
             model_manifest=model_manifest, run_url=run_url, round_index=round_index,
             env_steps=env_steps, device=device, agent_out=agent_out, policy_out=policy_out,
             metrics=metrics)


def evaluate(config: Input[Artifact], policy: Input[Model], run_url: str, round_index: int,
             env_steps: int, metrics: Output[Metrics]) -> float:
    """Deterministic-policy return on fresh episodes; completes the round's record."""
    from components.worker import run_step
    return run_step("evaluate_step", config=config, policy=policy, run_url=run_url,
                    round_index=round_index, env_steps=env_steps, metrics=metrics)


def finalize(config: Input[Artifact], policy: Input[Model], run_url: str, round_index: int,
             env_steps: int, total_steps: int, registered_model: str,
             final_policy: Output[Model], summary: Output[Artifact]):
    """Publish the policy and the run's summary; at the end, log and register it in MLflow."""
    from components.worker import run_step
    run_step("finalize", config=config, policy=policy, run_url=run_url, round_index=round_index,
             env_steps=env_steps, final_policy=final_policy, summary=summary,
             total_steps=total_steps, registered_model=registered_model)


STEP_FUNCTIONS = (init_run, init_states, collect, fit_ensemble, imagine, update_sac, evaluate,
                  finalize)


def make_components(image: str = DEFAULT_IMAGE) -> SimpleNamespace:
    """The components, all running in ``image`` (which must hold this package)."""
    return SimpleNamespace(**{
        f.__name__: dsl.component(f, base_image=image, install_kfp_package=False)
        for f in STEP_FUNCTIONS})
