"""The MBPO pipeline: K rounds of collect -> fit_ensemble -> imagine -> update_sac -> evaluate.

KFP v2 has no recursion, so the rounds are unrolled at compile time, and the compiled spec grows
with K (about 13-16 KB per task). A training run longer than K rounds is a chain of pipeline runs:
the first builds fresh states (``init_states``); every later one imports the states of the last
complete round by URI (``dsl.importer``) and continues from its env-step count.
"""


from collections.abc import Callable
from pathlib import Path

from kfp import compiler, dsl
from kfp.dsl import Artifact, Dataset, Model

from components import DEFAULT_IMAGE
from components.definitions import make_components

from .chain import DEFAULT_ROUNDS_PER_RUN
from .cluster import ClusterSettings, configure

# Every state a round hands to the next, with its artifact type.
STATE_TYPES: dict[str, type] = {
    "collector": Artifact, "real_manifest": Dataset, "dynamics": Model, "model_manifest": Dataset,
    "rollout": Artifact, "agent": Model, "policy": Model,
}
PIPELINE_NAME = "mbpo"


def _rounds(c, rounds: int, config, states: dict, run_url, total_steps, device, env_steps,
            prev_round, registered_model, setup, gpu_device):
    """Wire ``rounds`` rounds onto ``states`` and end with finalize."""
    last = None
    for i in range(rounds):
        col = c.collect(config=config, collector_in=states["collector"], policy=states["policy"],
                        real_manifest_in=states["real_manifest"], run_url=run_url,
                        total_steps=total_steps, env_steps=env_steps, prev_round=prev_round)
        if last is not None:
            # A round is complete once evaluated (mbpo_core.runstore): finish it before the next
            # starts, so a stopped run never leaves a later round recorded but an earlier one not.
            col.after(last)
        env_steps, rnd = col.outputs["env_steps"], col.outputs["round_index"]
        real = col.outputs["real_manifest_out"]
        fit = c.fit_ensemble(config=config, dynamics_in=states["dynamics"], real_manifest=real,
                             run_url=run_url, round_index=rnd, env_steps=env_steps,
                             device=gpu_device or device)
        im = c.imagine(config=config, dynamics=fit.outputs["dynamics_out"], policy=states["policy"],
                       real_manifest=real, model_manifest_in=states["model_manifest"],
                       rollout_in=states["rollout"], run_url=run_url, round_index=rnd,
                       env_steps=env_steps, device=device)
        up = c.update_sac(config=config, agent_in=states["agent"], real_manifest=real,
                          model_manifest=im.outputs["model_manifest_out"], run_url=run_url,
                          round_index=rnd, env_steps=env_steps, device=gpu_device or device)
        last = c.evaluate(config=config, policy=up.outputs["policy_out"], run_url=run_url,
                          round_index=rnd, env_steps=env_steps)
        for task, step in ((col, "collect"), (fit, "fit_ensemble"), (im, "imagine"),
                           (up, "update_sac"), (last, "evaluate")):
            task.set_display_name(f"r{i} {step}")
            setup(task)
            # Steps write shards and run records as side effects: never serve them from cache.
            task.set_caching_options(False)
        states = states | {
            "collector": col.outputs["collector_out"], "real_manifest": real,
            "dynamics": fit.outputs["dynamics_out"],
            "model_manifest": im.outputs["model_manifest_out"], "rollout": im.outputs["rollout_out"],
            "agent": up.outputs["agent_out"], "policy": up.outputs["policy_out"],
        }
        prev_round = rnd
    fin = c.finalize(config=config, policy=states["policy"], run_url=run_url,
                     round_index=prev_round, env_steps=env_steps, total_steps=total_steps,
                     registered_model=registered_model)
    fin.after(last)
    setup(fin)
    fin.set_caching_options(False)
    fin.set_display_name("finalize")
    return fin


def build_pipeline(rounds: int, resume: bool = False, image: str = DEFAULT_IMAGE,
                   cluster: ClusterSettings | None = None, *, chain_step: Callable) -> Callable:
    """A pipeline of ``rounds`` rounds; with ``resume`` it continues from imported states.

    ``cluster`` adds the Kubernetes settings (secrets, resources, retries, GPUs) that only a
    cluster uses. With ``chain_in_cluster=True`` at submission, its last task submits the next
    pipeline run of the chain to the KFP API until ``total_steps``: that task is ``chain_step``
    (``pipelines.submit.continue_chain``), passed in so that this module never imports the one
    that submits, which compiles this pipeline.

    Caching is off for every task: each step also writes shards, run records and MLflow entries,
    which a cache hit would silently skip, and its outputs depend on state artifacts that are new
    in every run, so no hit could be correct and useful at once."""
    if rounds < 1:
        raise ValueError(f"rounds = {rounds} must be >= 1")
    c = make_components(image)
    chain_op = dsl.component(chain_step, base_image=image, install_kfp_package=False)
    gpu_device = "cuda" if cluster is not None and cluster.gpu else None

    def setup(task):
        if cluster is not None:
            configure(task, cluster)
        return task

    def start(env, seed, overrides, run_url, total_steps, tracking_uri, mlflow_experiment,
              parent_run_id, registered_model):
        init = c.init_run(env=env, seed=seed, overrides=overrides, run_url=run_url,
                          total_steps=total_steps, tracking_uri=tracking_uri,
                          mlflow_experiment=mlflow_experiment, parent_run_id=parent_run_id,
                          registered_model=registered_model,
                          kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, image=image)
        init.set_caching_options(False)
        setup(init)
        return init.outputs["config"]

    def finish(fin, run_url, total_steps, device, chain_in_cluster, kfp_host, namespace,
               kfp_experiment, rounds_per_run, next_image, tracking_uri, mlflow_experiment,
               registered_model):
        with dsl.If(chain_in_cluster == True, name="chain-in-cluster"):  # noqa: E712 (KFP condition)
            nxt = chain_op(run_url=run_url, total_steps=total_steps, device=device,
                           kfp_host=kfp_host, namespace=namespace, kfp_experiment=kfp_experiment,
                           rounds_per_run=rounds_per_run, image=next_image,
                           tracking_uri=tracking_uri, mlflow_experiment=mlflow_experiment,
                           registered_model=registered_model,
                           gpu=gpu_device is not None).after(fin)
            nxt.set_caching_options(False)
            nxt.set_display_name("submit next run")
            setup(nxt)

    if not resume:
        @dsl.pipeline(name=PIPELINE_NAME, description=f"MBPO, {rounds} rounds from scratch")
        def mbpo(env: str, seed: int, overrides: list, run_url: str, total_steps: int,
                 device: str = "cpu", tracking_uri: str = "", mlflow_experiment: str = "mbpo",
                 registered_model: str = "", parent_run_id: str = "",
                 chain_in_cluster: bool = False, kfp_host: str = "",
                 namespace: str = "", kfp_experiment: str = "mbpo",
                 rounds_per_run: int = DEFAULT_ROUNDS_PER_RUN, next_image: str = image):
            config = start(env, seed, overrides, run_url, total_steps, tracking_uri,
                           mlflow_experiment, parent_run_id, registered_model)
            init = c.init_states(config=config)
            init.set_caching_options(False)
            setup(init)
            states = {name: init.outputs[name] for name in STATE_TYPES}
            fin = _rounds(c, rounds, config, states, run_url, total_steps, device, 0, -1,
                          registered_model, setup, gpu_device)
            finish(fin, run_url, total_steps, device, chain_in_cluster, kfp_host, namespace,
                   kfp_experiment, rounds_per_run, next_image, tracking_uri, mlflow_experiment,
                   registered_model)
        return mbpo

    @dsl.pipeline(name=f"{PIPELINE_NAME}-continue",
                  description=f"MBPO, {rounds} more rounds from the states of a stored round")
    def mbpo_continue(env: str, seed: int, overrides: list, run_url: str, total_steps: int,
                      start_env_steps: int, last_round: int, collector_uri: str,
                      real_manifest_uri: str, dynamics_uri: str, model_manifest_uri: str,
                      rollout_uri: str, agent_uri: str, policy_uri: str, device: str = "cpu",
                      tracking_uri: str = "", mlflow_experiment: str = "mbpo",
                      registered_model: str = "", parent_run_id: str = "",
                      chain_in_cluster: bool = False,
                      kfp_host: str = "", namespace: str = "", kfp_experiment: str = "mbpo",
                      rounds_per_run: int = DEFAULT_ROUNDS_PER_RUN, next_image: str = image):
        config = start(env, seed, overrides, run_url, total_steps, tracking_uri,
                       mlflow_experiment, parent_run_id, registered_model)
        uris = {"collector": collector_uri, "real_manifest": real_manifest_uri,
                "dynamics": dynamics_uri, "model_manifest": model_manifest_uri,
                "rollout": rollout_uri, "agent": agent_uri, "policy": policy_uri}
        states = {}
        for name, kind in STATE_TYPES.items():
            imp = dsl.importer(artifact_uri=uris[name], artifact_class=kind, reimport=False)
            imp.set_display_name(f"import {name}")
            states[name] = imp.output
        fin = _rounds(c, rounds, config, states, run_url, total_steps, device, start_env_steps,
                      last_round, registered_model, setup, gpu_device)
        finish(fin, run_url, total_steps, device, chain_in_cluster, kfp_host, namespace,
               kfp_experiment, rounds_per_run, next_image, tracking_uri, mlflow_experiment,
               registered_model)
    return mbpo_continue


def compile_pipeline(rounds: int, path: str | Path, resume: bool = False,
                     image: str = DEFAULT_IMAGE, cluster: ClusterSettings | None = None, *,
                     chain_step: Callable) -> Path:
    """Compile for a cluster: with ``cluster`` settings (default ones when None)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(rounds, resume, image, cluster or ClusterSettings(),
                                               chain_step=chain_step), str(path))
    return path
