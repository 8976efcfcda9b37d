"""The compiled pipeline: tasks, data dependencies and parameters for N rounds."""

import pytest
import yaml

from pipelines.cli import main
from pipelines.pipeline import STATE_TYPES

STEPS = ["collect", "fit-ensemble", "imagine", "update-sac", "evaluate"]


def _compile(tmp_path, rounds, *extra):
    out = tmp_path / "p.yaml"
    assert main(["compile", "--env", "Hopper-v5", "--rounds", str(rounds), "-o", str(out),
                 "--image", "registry.example/mbpo@sha256:abc", *extra]) == 0
    return next(yaml.safe_load_all(out.read_text()))  # doc 2: the kubernetes platform spec


def _name(step: str, i: int) -> str:
    return step if i == 0 else f"{step}-{i + 1}"


def _producers(task: dict) -> dict[str, str]:
    """input name -> producing task, for artifact and parameter inputs taken from tasks."""
    out = {}
    for kind, key in (("artifacts", "taskOutputArtifact"), ("parameters", "taskOutputParameter")):
        for name, spec in task.get("inputs", {}).get(kind, {}).items():
            if key in spec:
                out[name] = spec[key]["producerTask"]
    return out


@pytest.mark.parametrize("rounds", [1, 3])
def test_fresh_pipeline_structure(tmp_path, rounds):
    spec = _compile(tmp_path, rounds)
    tasks = spec["root"]["dag"]["tasks"]
    expected = {"init-run", "init-states", "finalize", "condition-1"} | {
        _name(s, i) for s in STEPS for i in range(rounds)}
    assert set(tasks) == expected

    for i in range(rounds):
        col, fit, im, up, ev = (tasks[_name(s, i)] for s in STEPS)
        prev_up = "init-states" if i == 0 else _name("update-sac", i - 1)
        prev_col = "init-states" if i == 0 else _name("collect", i - 1)
        p = _producers(col)
        assert p["policy"] == prev_up and p["collector_in"] == prev_col
        if i:  # env steps and round index flow from the previous collect; round 0 has constants
            assert p["env_steps"] == p["prev_round"] == _name("collect", i - 1)
        else:
            assert "env_steps" not in p
        assert _producers(fit)["real_manifest"] == _name("collect", i)
        assert _producers(im)["dynamics"] == _name("fit-ensemble", i)
        assert _producers(up)["model_manifest"] == _name("imagine", i)
        assert _producers(up)["real_manifest"] == _name("collect", i)
        assert _producers(ev)["policy"] == _name("update-sac", i)
    assert _producers(tasks["finalize"])["policy"] == _name("update-sac", rounds - 1)
    assert _name("evaluate", rounds - 1) in tasks["finalize"]["dependentTasks"]

    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"env", "seed", "overrides", "run_url", "total_steps", "device",
            "chain_in_cluster"} <= set(params)
    assert params["overrides"]["parameterType"] == "LIST"


def test_continuation_pipeline_imports_every_state(tmp_path):
    spec = _compile(tmp_path, 2, "--continuation")
    tasks = spec["root"]["dag"]["tasks"]
    importers = {n for n in tasks if n.startswith("importer")}
    assert len(importers) == len(STATE_TYPES)
    assert "init-states" not in tasks
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {f"{s}_uri" for s in STATE_TYPES} | {"start_env_steps", "last_round"} <= set(params)
    # the first round's inputs come from the importers
    assert set(_producers(tasks["collect"]).values()) >= {"init-run"}
    assert all(v.startswith("importer") for k, v in _producers(tasks["collect"]).items()
               if k in ("collector_in", "policy", "real_manifest_in"))


def test_every_task_uses_the_image_and_installs_nothing(tmp_path):
    spec = _compile(tmp_path, 2)
    executors = spec["deploymentSpec"]["executors"]
    assert executors
    for name, ex in executors.items():
        container = ex["container"]
        assert container["image"] == "registry.example/mbpo@sha256:abc", name
        text = " ".join(container["command"] + container.get("args", []))
        assert "pip install" not in text, name


def test_compile_rejects_too_many_rounds_and_bad_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compile", "--env", "Hopper-v5", "--rounds", "500", "-o", str(tmp_path / "x.yaml")])
    assert "too large to submit" in capsys.readouterr().err
    rc = main(["compile", "--env", "Hopper-v5", "--rounds", "2", "-o", str(tmp_path / "y.yaml"),
               "--set", "sac.gamma=2"])
    assert rc == 2 and not (tmp_path / "y.yaml").exists()


def test_spec_size_grows_linearly_and_stays_submittable(tmp_path):
    sizes = {}
    for k in (1, 2, 10):
        out = tmp_path / f"{k}.yaml"
        main(["compile", "--env", "Hopper-v5", "--rounds", str(k), "-o", str(out)])
        sizes[k] = out.stat().st_size
    per_round = sizes[2] - sizes[1]
    assert abs((sizes[10] - sizes[1]) - 9 * per_round) < 0.02 * sizes[10]
    # default chunk: Argo's object is about 2.85x the spec; etcd refuses more than 1.5 MiB
    assert 2.85 * sizes[10] < 1.5 * 2**20


def test_chain_arguments_match_the_pipeline_parameters(tmp_path):
    """What a driver passes to the next run of a chain is exactly what the pipeline takes."""
    from mbpo_core.runstore import RunStore
    from pipelines.chain import new_run, next_run

    run = new_run("Hopper-v5", 0, [], 20_000, str(tmp_path / "store"), "w")
    fresh = next_run(run, 10)
    assert fresh.rounds == 10 and not fresh.resume
    # pretend round 3 completed: records naming its artifacts
    rs = RunStore(run.run_url)
    for step, names in {"collect": ["collector", "real_manifest"], "fit_ensemble": ["dynamics"],
                        "imagine": ["model_manifest", "rollout"], "update_sac": ["agent", "policy"],
                        "evaluate": []}.items():
        for r in range(4):
            rs.write_record(r, step, 5000 + 250 * r, {}, {n: f"s3://b/{n}{r}" for n in names})
    cont = next_run(run, 10)
    assert cont.resume and cont.arguments["last_round"] == 3
    assert cont.arguments["start_env_steps"] == 5750 and cont.arguments["policy_uri"] == "s3://b/policy3"
    assert cont.rounds == 10  # (20000 - 5750) / 250 = 57 rounds left, 10 per run
    for args, flag in ((fresh.arguments, []), (cont.arguments, ["--continuation"])):
        spec = _compile(tmp_path, 1, *flag)
        params = spec["root"]["inputDefinitions"]["parameters"]
        assert set(args) <= set(params)
        required = {k for k, v in params.items() if not v.get("isOptional")}
        assert required <= set(args)
    chained = set(cont.arguments) | {"chain_in_cluster", "kfp_host", "namespace", "kfp_experiment",
                                     "rounds_per_run", "next_image"}
    assert chained <= set(params)


def test_submit_needs_an_s3_store(tmp_path):
    from pipelines.chain import new_run
    from pipelines.submit import ClusterTarget, submit_next

    run = new_run("Hopper-v5", 0, [], 20_000, str(tmp_path / "store"), "w")
    with pytest.raises(Exception, match="must be an s3:// URL"):
        submit_next(run, ClusterTarget(host="http://127.0.0.1:9"), "x")
