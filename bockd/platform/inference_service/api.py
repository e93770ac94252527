"""The Kubernetes calls a deployment makes: InferenceServices, and reading Deployments and ServiceAccounts."""

from __future__ import annotations

import logging
from typing import Any

from bockd.platform.inference_service.spec import GROUP, KIND, PLURAL, VERSION, DeploySpec
from bockd.platform.kube import client as kube_client
from bockd.platform.kube.client import CustomResourceApi, KubeApiError, read_json

LOG = logging.getLogger("bockd.deploy")

IRSA_ANNOTATION = "eks.amazonaws.com/role-arn"  # service_account_credentials.go L51, L241


class DeployError(KubeApiError, RuntimeError):
    """An InferenceService could not be created, rolled out or rolled back."""


class InferenceServiceApi(CustomResourceApi):
    """The calls a deployment needs: InferenceServices, and reading Deployments and ServiceAccounts."""

    group, version, plural, kind, error = GROUP, VERSION, PLURAL, KIND, DeployError

    def deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes import client

        read = client.AppsV1Api(self.api_client).read_namespaced_deployment
        return read_json(read, name, namespace, error=DeployError, what=f"Deployment {namespace}/{name}")

    def service_account(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes import client

        read = client.CoreV1Api(self.api_client).read_namespaced_service_account
        return read_json(read, name, namespace, error=DeployError, what=f"ServiceAccount {namespace}/{name}")


def load_kube_config() -> Any:
    """The client configuration: in-cluster (the pod's ServiceAccount) first, then ``~/.kube/config``."""
    return kube_client.load_kube_config(DeployError)


def check_service_account(api: InferenceServiceApi, spec: DeploySpec) -> None:
    """The ServiceAccount the storage initializer downloads with exists in the ISVC's namespace and names
    a Secret (or an IRSA role); `DeployError` with the remedy otherwise, before anything is changed.

    KServe looks the account up in the ISVC's namespace and, when there is none, downloads with no
    credentials at all (service_account_credentials.go L217-221). Without RBAC to read ServiceAccounts
    the check is skipped with a warning.
    """
    ns, name = spec.namespace, spec.service_account or "default"  # KServe's default too (L214-216)
    try:
        account = api.service_account(ns, name)
    except DeployError as e:
        if e.status != 403:
            raise
        LOG.warning("cannot read ServiceAccount %s/%s (RBAC: %s); not checked", ns, name, e.api_message)
        return
    remedy = (
        f"create the Secret bockd-s3 and the account in namespace {ns} (manifests/overlays/profile; "
        f"docs/operations.md, 'A namespace that serves')"
    )
    if account is None:
        raise DeployError(
            f"ServiceAccount {ns}/{name} does not exist: KServe would download {spec.storage_uri} with no "
            f"credentials; {remedy}"
        )
    annotations = (account.get("metadata") or {}).get("annotations") or {}
    if not account.get("secrets") and IRSA_ANNOTATION not in annotations:
        raise DeployError(
            f"ServiceAccount {ns}/{name} lists no Secret (and no {IRSA_ANNOTATION}): KServe would download "
            f"{spec.storage_uri} with no credentials; {remedy}"
        )
