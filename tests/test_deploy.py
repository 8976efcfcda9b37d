"""The kustomize manifests in deploy/: rendered with `kubectl kustomize`, then checked as objects.

Nothing is applied to a cluster. kubectl is required: without it these tests fail (they do not
skip), because a skipped manifest check would look like a passing one.
"""

from __future__ import annotations

import base64
import fnmatch
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
IMAGE_REPO = "ghcr.io/mbpo-project/mbpo"
PLACEHOLDER = "REPLACE_ME"
SECRET_KEYS = {"mbpo-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
               "mbpo-mlflow": {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"},
               "mbpo-mlflow-db": {"MLFLOW_BACKEND_STORE_URI"}}
# environment variables that must never carry a literal value in a manifest
SENSITIVE = ("SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY", "BACKEND_STORE_URI")


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is needed to render deploy/ with `kubectl kustomize` (tests/test_deploy.py); "
                    "install kubectl >= 1.27 (it bundles kustomize v5) and put it on PATH", pytrace=False)
    return path


def render(kubectl: str, directory: Path) -> list[dict]:
    out = subprocess.run([kubectl, "kustomize", str(directory)], check=True, capture_output=True,
                         text=True, timeout=60)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def find(objs: list[dict], kind: str, name: str) -> dict:
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def container(objs: list[dict]) -> dict:
    (c,) = find(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    return c


def overlay(tmp_path: Path, body: dict, *bases: Path) -> Path:
    """A kustomization in tmp_path over ``bases`` (kustomize takes bases only as relative paths)."""
    d = tmp_path / "overlay"
    d.mkdir()
    resources = [os.path.relpath(b, d) for b in bases]
    (d / "kustomization.yaml").write_text(yaml.safe_dump({"resources": resources, **body}))
    return d


@pytest.fixture(scope="module")
def base(kubectl) -> list[dict]:
    return render(kubectl, DEPLOY)


def test_base_renders_on_a_fresh_clone(kubectl, tmp_path):
    """No git-ignored file (deploy/secrets/*.env) is needed to render the base."""
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy, ignore=shutil.ignore_patterns("*.env"))
    kinds = {(o["kind"], o["metadata"]["name"]) for o in render(kubectl, copy)}
    assert {("ConfigMap", "mbpo-config"), ("Deployment", "mlflow"), ("Service", "mlflow"),
            ("PersistentVolumeClaim", "mlflow-db"), ("ServiceAccount", "mlflow")} <= kinds
    assert not any(kind == "Secret" for kind, _ in kinds), "secrets are not part of the base"
    assert not any(kind in ("Role", "RoleBinding") for kind, _ in kinds), "RBAC is opt-in"


def test_base_is_namespace_agnostic(base):
    assert all("namespace" not in o["metadata"] for o in base)


def test_mlflow_service_selects_the_deployment(base):
    dep = find(base, "Deployment", "mlflow")
    svc = find(base, "Service", "mlflow")
    selector = dep["spec"]["selector"]["matchLabels"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 5000
    (cport,) = container(base)["ports"]
    assert cport["containerPort"] == 5000
    assert port["targetPort"] in (cport["name"], 5000)
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"


def test_mlflow_server_command(base):
    c = container(base)
    assert c["command"] == ["mlflow"] and c["args"][0] == "server"
    args = c["args"]
    for flag in ("--host=0.0.0.0", "--port=5000", "--serve-artifacts",
                 "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)",
                 "--allowed-hosts=$(MLFLOW_SERVER_ALLOWED_HOSTS)", "--workers=$(MLFLOW_WORKERS)"):
        assert flag in args
    # every $(VAR) in the arguments is defined by the ConfigMap the container loads
    config = find(base, "ConfigMap", "mbpo-config")["data"]
    assert {"configMapRef": {"name": "mbpo-config"}} in c["envFrom"]
    for var in ("MLFLOW_ARTIFACTS_DESTINATION", "MLFLOW_SERVER_ALLOWED_HOSTS", "MLFLOW_WORKERS",
                "MLFLOW_BACKEND_STORE_URI"):
        assert config[var]
    assert config["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert config["MBPO_S3_ENDPOINT_URL"].startswith(("http://", "https://"))


def test_backend_store_sqlite_on_the_pvc_and_overridable_by_secret(base):
    c = container(base)
    config = find(base, "ConfigMap", "mbpo-config")["data"]
    uri = config["MLFLOW_BACKEND_STORE_URI"]
    assert uri.startswith("sqlite:////")
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert uri.removeprefix("sqlite:///").startswith(mounts["db"] + "/")
    pod = find(base, "Deployment", "mlflow")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["db"]["persistentVolumeClaim"]["claimName"] == "mlflow-db"
    # the optional Secret comes after the ConfigMap: later envFrom sources win
    refs = [next(iter(src.values()))["name"] for src in c["envFrom"]]
    assert refs.index("mbpo-mlflow-db") > refs.index("mbpo-config")
    assert {"secretRef": {"name": "mbpo-mlflow-db", "optional": True}} in c["envFrom"]
    # a literal env entry would beat both envFrom sources
    assert "MLFLOW_BACKEND_STORE_URI" not in {e["name"] for e in c.get("env", [])}


def test_probes_call_health(base):
    c = container(base)
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health"
        assert get["port"] in ("http", 5000)


def test_runs_as_non_root_with_a_read_only_root(base):
    spec = find(base, "Deployment", "mlflow")["spec"]["template"]["spec"]
    c = container(base)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] > 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == tmp["name"])
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False  # else the Service injects MLFLOW_PORT=tcp://...


def test_resources_are_set(base):
    res = container(base)["resources"]
    for kind in ("requests", "limits"):
        assert res[kind]["cpu"] and res[kind]["memory"]


def test_s3_credentials_come_from_the_mbpo_s3_secret(base):
    env = {e["name"]: e for e in container(base)["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[key]
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "mbpo-s3", "key": key}
    assert env["MLFLOW_S3_ENDPOINT_URL"]["valueFrom"]["configMapKeyRef"] == {
        "name": "mbpo-config", "key": "MBPO_S3_ENDPOINT_URL"}


def _literal_secrets(obj: object, path: str = "") -> list[str]:
    """Paths of env entries with a sensitive name and a literal value, anywhere in ``obj``."""
    found = []
    if isinstance(obj, dict):
        name = obj.get("name")
        if isinstance(name, str) and "value" in obj and any(s in name.upper() for s in SENSITIVE):
            found.append(f"{path}/{name}")
        for k, v in obj.items():
            found += _literal_secrets(v, f"{path}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += _literal_secrets(v, f"{path}/{i}")
    return found


def test_no_literal_secret_in_the_base(base):
    for obj in base:
        assert not _literal_secrets(obj), f"{obj['kind']}/{obj['metadata']['name']}"
    for cm in (o for o in base if o["kind"] == "ConfigMap"):
        for key, value in cm["data"].items():
            assert not any(s in key for s in SENSITIVE if s != "BACKEND_STORE_URI"), key
            assert "@" not in value, f"{key}: credentials in a URI belong in a Secret"


def test_allowed_hosts_admit_the_service_names():
    """The same matching rule as mlflow's is_allowed_host_header: fnmatch on "host:port"."""
    config = yaml.safe_load((DEPLOY / "config.yaml").read_text())["data"]
    patterns = config["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")

    def allowed(host: str) -> bool:
        return any(fnmatch.fnmatch(host, p) if "*" in p else host == p for p in patterns)

    for host in ("mlflow:5000", "mlflow.team-rl:5000", "mlflow.team-rl.svc:5000",
                 "mlflow.team-rl.svc.cluster.local:5000", "localhost:5000", "127.0.0.1:8080"):
        assert allowed(host), host
    for host in ("evil.example.com:5000", "mlflow.example.com", "10.0.0.7:5000"):
        assert not allowed(host), host


def test_image_default_matches_the_project_version(base):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert container(base)["image"] == f"{IMAGE_REPO}:{version}"


def test_image_can_be_overridden(kubectl, tmp_path):
    d = overlay(tmp_path, {"namespace": "team-rl", "images": [
        {"name": IMAGE_REPO, "newName": "registry.example.com/mbpo", "newTag": "9.9.9"}]}, DEPLOY)
    objs = render(kubectl, d)
    assert container(objs)["image"] == "registry.example.com/mbpo:9.9.9"
    assert {o["metadata"].get("namespace") for o in objs} == {"team-rl"}


def _env_file(path: Path) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in path.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    return {k: v for k, v in pairs}


def test_secret_templates_hold_placeholders_only():
    examples = {"mbpo-s3": "s3.env.example", "mbpo-mlflow": "mlflow.env.example",
                "mbpo-mlflow-db": "mlflow-db.env.example"}
    for secret, filename in examples.items():
        values = _env_file(DEPLOY / "secrets" / filename)
        assert set(values) == SECRET_KEYS[secret], filename
        assert all(PLACEHOLDER in v for v in values.values()), filename
    docs = yaml.safe_load_all((DEPLOY / "secrets.example.yaml").read_text())
    shapes = {d["metadata"]["name"]: d for d in docs}
    assert set(shapes) == set(SECRET_KEYS)
    for name, doc in shapes.items():
        assert doc["kind"] == "Secret" and set(doc["stringData"]) == SECRET_KEYS[name]
        assert all(PLACEHOLDER in v for v in doc["stringData"].values()), name
    # the real files are ignored, the templates are not
    lines = (DEPLOY / "secrets" / ".gitignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert "*.env" in patterns
    for name in ("s3.env", "mlflow.env", "mlflow-db.env"):
        assert any(fnmatch.fnmatch(name, p) for p in patterns), name
    for name in ("s3.env.example", "kustomization.yaml"):
        assert not any(fnmatch.fnmatch(name, p) for p in patterns), name


def test_secret_generator_renders_the_named_secrets(kubectl, tmp_path):
    """deploy/secrets from the templates: fixed names (no hash), exactly the expected keys."""
    copy = tmp_path / "secrets"
    shutil.copytree(DEPLOY / "secrets", copy, ignore=shutil.ignore_patterns("*.env"))
    for name in ("s3", "mlflow"):
        shutil.copy(copy / f"{name}.env.example", copy / f"{name}.env")
    secrets = {o["metadata"]["name"]: o for o in render(kubectl, copy)}
    assert set(secrets) == {"mbpo-s3", "mbpo-mlflow"}
    for name, obj in secrets.items():
        assert obj["kind"] == "Secret" and "namespace" not in obj["metadata"]
        assert set(obj["data"]) == SECRET_KEYS[name]
        assert all(base64.b64decode(v).decode() == PLACEHOLDER for v in obj["data"].values())


def test_secret_generator_needs_the_ignored_files(kubectl, tmp_path):
    """On a fresh clone deploy/secrets refuses to render: placeholders never reach a cluster."""
    copy = tmp_path / "secrets"
    shutil.copytree(DEPLOY / "secrets", copy, ignore=shutil.ignore_patterns("*.env"))
    out = subprocess.run([kubectl, "kustomize", str(copy)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "s3.env" in out.stderr


def test_rbac_is_minimal(kubectl, tmp_path):
    objs = render(kubectl, overlay(tmp_path, {"namespace": "team-rl"}, DEPLOY / "rbac"))
    role = find(objs, "Role", "mbpo-kfp-run-submitter")
    binding = find(objs, "RoleBinding", "mbpo-kfp-run-submitter")
    granted = {(r, v) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert {g for rule in role["rules"] for g in rule["apiGroups"]} == {"pipelines.kubeflow.org"}
    assert granted == {("experiments", "get"), ("experiments", "list"), ("experiments", "create"),
                       ("runs", "get"), ("runs", "create")}
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "mbpo-kfp-run-submitter"}
    # no namespace on the subject: a RoleBinding then means its own namespace
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "default-editor"}]
