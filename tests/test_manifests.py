"""The kustomize manifests and the images' entrypoints, checked offline.

Every overlay (and the base) is built with ``kubectl kustomize``; each document is validated: built-in kinds
against the Kubernetes OpenAPI schemas shipped by ``kubernetes-validate`` (strict: unknown fields fail),
KServe and Kubeflow Trainer resources against their real CRDs in ``tests/crds``. Then the properties
that matter on a cluster: pinned images, non-root containers, no credentials in the build, the RBAC the
deploy step needs, KServe's S3 service account, the kfp-launcher config, and serving args that
``python -m bockd.serving`` really accepts.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from bockd.pipeline.parameters import CLUSTER_MLFLOW_URI
from bockd.pipeline.settings import DEFAULT_S3_ENDPOINT, DEFAULT_SERVING_IMAGE
from bockd.platform.credentials import S3_SECRET_KEYS
from bockd.platform.kube.crd import validate_against_crd

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
SCHEMAS = Path(__file__).resolve().parent / "crds"  # vendored: tests/crds/PROVENANCE.md
KUBERNETES_VERSION = "1.32"  # the schema set of kubernetes-validate used for built-in kinds
NAMESPACE = "bockd"
BUILDS = ["base", "overlays/dev", "overlays/production-gpu"]
OVERLAYS = ["overlays/dev", "overlays/production-gpu"]
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with kustomize) is not installed")

# apiVersion group -> CRD files (one per kind) in tests/crds
CRD_GROUPS = ("serving.kserve.io", "trainer.kubeflow.org")
CLUSTER_SCOPED = {"Namespace", "ClusterServingRuntime", "ClusterRole", "ClusterRoleBinding"}
PLACEHOLDER = "REPLACE_ME"


@functools.cache
def build(path: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        [KUBECTL, "kustomize", str(MANIFESTS / path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    docs = tuple(d for d in yaml.safe_load_all(out.stdout) if d)
    assert docs, f"{path} builds no resources"
    return docs


@functools.cache
def crd_files() -> dict[tuple[str, str], Path]:
    found = {}
    for path in sorted(SCHEMAS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        found[crd["spec"]["group"], crd["spec"]["names"]["kind"]] = path
    return found


def find(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_specs(doc: dict[str, Any]) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(pod-level spec, containers) of every pod a resource makes."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        pod = spec["template"]["spec"]
        yield pod, pod.get("containers", []) + pod.get("initContainers", [])
    elif kind in ("ServingRuntime", "ClusterServingRuntime"):
        yield spec, spec.get("containers", [])
    elif kind == "InferenceService":
        for component in ("predictor", "transformer", "explainer"):
            part = spec.get(component)
            if part:
                model = [part["model"]] if "model" in part else []
                yield part, model + part.get("containers", [])


def images(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                yield value
            else:
                yield from images(value)
    elif isinstance(node, list):
        for item in node:
            yield from images(item)


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# --- every document is valid ---------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("path", BUILDS)
def test_every_document_matches_its_schema(path: str) -> None:
    import kubernetes_validate

    for doc in build(path):
        group = doc["apiVersion"].rpartition("/")[0]
        if group in CRD_GROUPS:
            crd = crd_files().get((group, doc["kind"]))
            assert crd is not None, f"no CRD for {doc['apiVersion']} {doc['kind']} in {SCHEMAS}"
            validate_against_crd(doc, crd)  # raises with every violation listed
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_crd_schemas_are_present() -> None:
    assert ("serving.kserve.io", "ClusterServingRuntime") in crd_files()
    assert ("serving.kserve.io", "InferenceService") in crd_files()
    assert ("trainer.kubeflow.org", "TrainJob") in crd_files()


@needs_kubectl
@pytest.mark.parametrize("path", BUILDS)
def test_images_are_pinned(path: str) -> None:
    found = [image for doc in build(path) for image in images(doc)]
    assert found
    for image in found:
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag and tag != "latest", f"{image}: pin a tag, never :latest"


@needs_kubectl
@pytest.mark.parametrize("path", BUILDS)
def test_every_container_runs_as_non_root(path: str) -> None:
    checked = 0
    for doc in build(path):
        for pod, containers in pod_specs(doc):
            pod_non_root = (pod.get("securityContext") or {}).get("runAsNonRoot")
            for container in containers:
                context = container.get("securityContext") or {}
                where = f"{doc['kind']}/{doc['metadata']['name']}: container {container.get('name', 'model')}"
                assert context.get("runAsNonRoot", pod_non_root) is True, f"{where} may run as root"
                assert context.get("allowPrivilegeEscalation") is False, where
                assert context.get("capabilities", {}).get("drop") == ["ALL"], where
                checked += 1
    assert checked >= 3


# --- namespaces ----------------------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("path", OVERLAYS)
def test_overlays_put_everything_in_namespace_bockd(path: str) -> None:
    docs = build(path)
    assert one(docs, "Namespace", NAMESPACE)
    for doc in docs:
        if doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in doc["metadata"], f"{doc['kind']} is cluster-scoped"
        else:
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"
    for subject in one(docs, "RoleBinding", "bockd-pipeline-deployer")["subjects"]:
        assert subject["namespace"] == NAMESPACE


@needs_kubectl
def test_base_is_namespace_agnostic() -> None:
    assert all("namespace" not in doc["metadata"] for doc in build("base"))


@needs_kubectl
@pytest.mark.parametrize("path", OVERLAYS)
def test_mlflow_service_matches_the_pipelines_default_uri(path: str) -> None:
    match = re.fullmatch(r"http://([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", CLUSTER_MLFLOW_URI)
    assert match, CLUSTER_MLFLOW_URI
    name, namespace, port = match.groups()
    service = one(build(path), "Service", name)
    assert service["metadata"]["namespace"] == namespace
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    args = one(build(path), "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["args"]
    allowed = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    for host in (f"{name}.{namespace}.svc.cluster.local:{port}", f"{name}:{port}", f"{name}.{namespace}"):
        assert any(fnmatch.fnmatch(host, pattern) for pattern in allowed), f"MLflow rejects Host {host}"
    env = one(build(path), "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["env"]
    # No job-runner and huey workers: the embedded stack turns them off too (docs/services.md).
    assert {"name": "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "value": "false"} in env


# --- secrets, service account, RBAC, kfp-launcher ------------------------------------------------------


def test_secret_templates_hold_only_placeholders() -> None:
    secrets = [d for d in yaml_docs(MANIFESTS / "base" / "secrets.yaml") if d["kind"] == "Secret"]
    assert {s["metadata"]["name"] for s in secrets} == {"bockd-s3", "mlflow-postgres"}
    for secret in secrets:
        # local-config: kustomize leaves them out of every build, so an apply never overwrites real ones
        assert secret["metadata"]["annotations"]["config.kubernetes.io/local-config"] == "true"
        assert "data" not in secret
        assert secret["stringData"]
        for key, value in secret["stringData"].items():
            assert value.startswith(PLACEHOLDER), f"{secret['metadata']['name']}.{key} is not a placeholder"
    s3 = next(s for s in secrets if s["metadata"]["name"] == "bockd-s3")
    assert set(s3["stringData"]) == set(S3_SECRET_KEYS)
    # KServe reads the S3 settings from the Secret's annotations (kserve v0.20.0 s3_secret.go L106)
    annotations = s3["metadata"]["annotations"]
    assert annotations["serving.kserve.io/s3-endpoint"] == urlsplit(DEFAULT_S3_ENDPOINT).netloc  # host:port
    assert annotations["serving.kserve.io/s3-usehttps"] == "0"
    assert annotations["serving.kserve.io/s3-region"] and annotations["serving.kserve.io/s3-verifyssl"]


@needs_kubectl
@pytest.mark.parametrize("path", BUILDS)
def test_no_secret_is_applied(path: str) -> None:
    docs = build(path)
    assert not find(docs, "Secret")
    assert PLACEHOLDER not in yaml.safe_dump_all(docs)


@needs_kubectl
@pytest.mark.parametrize("path", BUILDS)
def test_s3_service_account_for_kserve(path: str) -> None:
    """KServe downloads with the Secrets the predictor's account lists (service_account_credentials.go
    L261-266); the account's own serving.kserve.io/s3-* annotations count only with an IRSA role, so no
    build puts any there (the Secret carries them)."""
    account = one(build(path), "ServiceAccount", "bockd-s3")
    assert {"name": "bockd-s3"} in account["secrets"]
    annotations = account["metadata"].get("annotations") or {}
    assert not [k for k in annotations if k.startswith("serving.kserve.io/s3-")]


# The calls the deploy step and the TrainJob launcher make (tests/test_deploy_cluster.py and
# tests/test_trainjob.py check their requests against this Role).
STEP_RULES = {
    ("serving.kserve.io", "inferenceservices"): {"get", "create", "patch"},
    ("apps", "deployments"): {"get"},
    ("", "serviceaccounts"): {"get"},
    ("trainer.kubeflow.org", "trainjobs"): {"get", "create", "delete"},
}


def role_verbs(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    verbs: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                verbs.setdefault((group, resource), set()).update(rule["verbs"])
    return verbs


@needs_kubectl
@pytest.mark.parametrize("path", [*BUILDS, "overlays/profile"])
def test_deployer_role(path: str) -> None:
    """Exactly the verbs the steps use: nothing on Secrets, no wildcard."""
    docs = build(path)
    rules = one(docs, "Role", "bockd-pipeline-deployer")["rules"]
    assert role_verbs(rules) == STEP_RULES
    assert all("*" not in rule["verbs"] and "*" not in rule["resources"] for rule in rules)
    binding = one(docs, "RoleBinding", "bockd-pipeline-deployer")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "bockd-pipeline-deployer",
    }
    assert {s["name"] for s in binding["subjects"]} == {"default-editor", "pipeline-runner"}


@needs_kubectl
def test_profile_overlay_gives_a_namespace_the_account_and_the_role() -> None:
    """overlays/profile: what a profile namespace needs to run the pipeline and serve, all in one namespace,
    the same objects as the base's."""
    docs = build("overlays/profile")
    assert sorted(d["kind"] for d in docs) == ["Role", "RoleBinding", "ServiceAccount"]
    (namespace,) = {d["metadata"]["namespace"] for d in docs}
    assert namespace == "kubeflow-user-example-com"
    assert {s["namespace"] for s in one(docs, "RoleBinding", "bockd-pipeline-deployer")["subjects"]} == {
        namespace
    }
    base = {(d["kind"], d["metadata"]["name"]): d for d in build("base")}
    for doc in docs:
        mine = {k: v for k, v in doc.items() if k not in ("metadata", "subjects")}
        theirs = base[doc["kind"], doc["metadata"]["name"]]
        assert mine == {k: v for k, v in theirs.items() if k not in ("metadata", "subjects")}


@needs_kubectl
@pytest.mark.parametrize("path", BUILDS)
def test_kfp_launcher_config(path: str) -> None:
    docs = build(path)
    data = one(docs, "ConfigMap", "kfp-launcher")["data"]
    assert data["defaultPipelineRoot"].startswith("s3://bockd-pipelines/")
    s3 = yaml.safe_load(data["providers"])["s3"]["default"]
    ref = s3["credentials"]["secretRef"]
    assert s3["credentials"]["fromEnv"] is False
    assert ref["secretName"] == one(docs, "ServiceAccount", "bockd-s3")["secrets"][0]["name"] == "bockd-s3"
    assert (ref["accessKeyKey"], ref["secretKeyKey"]) == S3_SECRET_KEYS
    assert re.fullmatch(r"[a-z0-9.-]+:\d+", s3["endpoint"]), s3["endpoint"]


# --- the object store and the production settings ------------------------------------------------------


# Environment variables that carry an S3 endpoint URL to a client in the manifests.
S3_ENDPOINT_ENV = ("MLFLOW_S3_ENDPOINT_URL", "BOCKD_S3_ENDPOINT", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL")


def s3_endpoints(docs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    """Every S3 endpoint a build sets (KServe annotations, kfp-launcher providers, client env), as
    host:port, by where it is set."""
    found = {}
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        annotations = doc["metadata"].get("annotations") or {}
        if "serving.kserve.io/s3-endpoint" in annotations:
            found[where] = annotations["serving.kserve.io/s3-endpoint"]
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "kfp-launcher":
            found[where] = yaml.safe_load(doc["data"]["providers"])["s3"]["default"]["endpoint"]
        for _, containers in pod_specs(doc):
            for c in containers:
                for env in c.get("env", []):
                    if env["name"] in S3_ENDPOINT_ENV and "value" in env:
                        found[f"{where} {env['name']}"] = urlsplit(env["value"]).netloc
    return found


@needs_kubectl
def test_dev_runs_its_own_object_store() -> None:
    docs = build("overlays/dev")
    store = one(docs, "Deployment", "seaweedfs")["spec"]["template"]["spec"]["containers"][0]
    assert store["args"][0] == "mini" and "-bucket=bockd,bockd-pipelines" in store["args"]
    assert {e["name"] for e in store["env"]} == set(S3_SECRET_KEYS)
    assert one(docs, "Service", "seaweedfs-s3")["spec"]["ports"][0]["port"] == 8333
    assert one(docs, "PersistentVolumeClaim", "seaweedfs-data")
    # every S3 client of the build points at it (KServe's endpoint is on the Secret, outside the build)
    hosts = {urlsplit(f"//{endpoint}").hostname for endpoint in s3_endpoints(docs).values()}
    assert {host.split(".")[0] for host in hosts} == {"seaweedfs-s3"}
    mlflow_env = one(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "MLFLOW_S3_ENDPOINT_URL", "value": "http://seaweedfs-s3:8333"} in mlflow_env
    providers = yaml.safe_load(one(docs, "ConfigMap", "kfp-launcher")["data"]["providers"])
    assert providers["s3"]["default"]["endpoint"] == "seaweedfs-s3.bockd.svc.cluster.local:8333"


@needs_kubectl
@pytest.mark.parametrize("path", ["base", "overlays/production-gpu"])
def test_every_s3_client_defaults_to_kubeflows_seaweedfs(path: str) -> None:
    """KFP >= 2.16 ships SeaweedFS (Service seaweedfs in kubeflow, S3 on 9000; kubeflow/pipelines 2.16.0
    manifests/kustomize/third-party/seaweedfs/base/seaweedfs/seaweedfs-service.yaml lines 6-21) and no
    MinIO: the launcher, MLflow (and KServe, where the build sets it) use the pipeline's default."""
    expected = urlsplit(DEFAULT_S3_ENDPOINT).netloc
    assert expected == "seaweedfs.kubeflow:9000"
    endpoints = s3_endpoints(build(path))
    assert {"ConfigMap/kfp-launcher", "Deployment/mlflow MLFLOW_S3_ENDPOINT_URL"} <= set(endpoints)
    assert {where: e for where, e in endpoints.items() if e != expected} == {}


@needs_kubectl
def test_production_settings() -> None:
    docs = build("overlays/production-gpu")
    assert not find(docs, "Deployment", "seaweedfs")
    mlflow = one(docs, "Deployment", "mlflow")
    assert mlflow["spec"]["replicas"] == 2
    assert mlflow["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    pdb = one(docs, "PodDisruptionBudget", "mlflow")
    assert pdb["spec"]["selector"]["matchLabels"] == mlflow["spec"]["selector"]["matchLabels"]
    claim = one(docs, "StatefulSet", "mlflow-postgres")["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    for doc in docs:
        for _, containers in pod_specs(doc):
            for container in containers:
                assert container["resources"]["limits"]["memory"], f"{doc['metadata']['name']}: no limit"


# --- the serving runtime and the serving image ---------------------------------------------------------


def serving_entrypoint() -> list[str]:
    text = (REPO / "images" / "serving" / "Dockerfile").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("ENTRYPOINT"))
    return json.loads(line.removeprefix("ENTRYPOINT"))


@needs_kubectl
@pytest.mark.parametrize("path", BUILDS)
def test_serving_runtime(path: str) -> None:
    docs = build(path)
    runtime = one(docs, "ClusterServingRuntime", "bockd-predictor")["spec"]
    assert runtime["supportedModelFormats"][0] == {
        "name": "bockd",
        "version": "1",
        "autoSelect": True,
        "priority": 1,
    }
    assert set(runtime["protocolVersions"]) == {"v1", "v2"}
    (container,) = runtime["containers"]
    assert container["name"] == "kserve-container" and container["image"] == DEFAULT_SERVING_IMAGE
    isvc = one(docs, "InferenceService", "bockd-digits-resnet20-s4")["spec"]["predictor"]
    assert isvc["model"]["runtime"] == "bockd-predictor" and isvc["model"]["modelFormat"]["name"] == "bockd"
    assert isvc["serviceAccountName"] == "bockd-s3"
    assert re.fullmatch(r"s3://bockd/mlflow/[^/]+/[^/]+/artifacts/students/s4", isvc["model"]["storageUri"])


@needs_kubectl
def test_runtime_args_are_accepted_by_bockd_serving() -> None:
    from bockd.serving.server import build_parser

    (container,) = one(build("base"), "ClusterServingRuntime", "bockd-predictor")["spec"]["containers"]
    args = [arg.replace("{{.Name}}", "bockd-digits-resnet20-s4") for arg in container["args"]]
    entrypoint = serving_entrypoint()
    assert entrypoint[:3] == ["python", "-m", "bockd.serving"]
    # KServe appends the runtime's args to the image's entrypoint
    parsed = build_parser().parse_args([*entrypoint[3:], *args])
    assert parsed.model_dir == ["/mnt/models"]
    assert parsed.model_name == "bockd-digits-resnet20-s4"
    assert parsed.http_port == 8080 == container["ports"][0]["containerPort"]
    assert parsed.host == "0.0.0.0"  # a container must listen on every interface
    assert build_parser().parse_args([*entrypoint[3:], "--model_dir=/m"]).host == "0.0.0.0"


def test_serving_entrypoint_runs() -> None:
    entrypoint = serving_entrypoint()
    out = subprocess.run(
        [sys.executable, *entrypoint[1:3], "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "--model_dir" in out.stdout and "--host" in out.stdout
