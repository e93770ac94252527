"""Custom resources (InferenceServices, TrainJobs) through the official Kubernetes client.

One place for the client configuration (in-cluster first, then ``~/.kube/config``), the pod's own
namespace, and the get / create / patch / delete calls every resource kind needs; subclasses name the
kind and the error they raise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from bockd.errors import BockdError, ConfigError

POD_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def pod_namespace(namespace: str = "", field: str = "namespace") -> str:
    """``namespace``, else the running pod's own (its ServiceAccount's)."""
    if namespace:
        return namespace
    if POD_NAMESPACE.exists():
        return POD_NAMESPACE.read_text().strip()
    raise ConfigError(f"{field}: not set and not running in a pod (no service account namespace)")


def load_kube_config(error: type[BockdError] = BockdError) -> Any:
    """The client configuration: in-cluster (the pod's ServiceAccount) first, then ``~/.kube/config``."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        try:
            config.load_kube_config(client_configuration=configuration)
        except (config.ConfigException, OSError) as e:
            raise error(f"no Kubernetes configuration: not in a cluster and no kubeconfig ({e})") from e
    return configuration


class CustomResourceApi:
    """Namespaced calls on one custom resource kind over ``kubernetes.client.CustomObjectsApi``."""

    group: ClassVar[str]
    version: ClassVar[str]
    plural: ClassVar[str]
    kind: ClassVar[str]
    error: ClassVar[type[BockdError]] = BockdError

    def __init__(self, custom_objects: Any) -> None:
        self._api = custom_objects

    @classmethod
    def from_config(cls, configuration: Any = None) -> Any:
        """From a ``kubernetes.client.Configuration``, or `load_kube_config()` when there is none."""
        from kubernetes import client

        configuration = configuration if configuration is not None else load_kube_config(cls.error)
        return cls(client.CustomObjectsApi(client.ApiClient(configuration)))

    def _fail(self, verb: str, namespace: str, name: str, e: Any) -> BockdError:
        where = f"{self.kind} {namespace}/{name}"
        return self.error(f"cannot {verb} {where}: HTTP {e.status} {e.reason}: {e.body}")

    def _args(self, namespace: str) -> tuple[str, str, str, str]:
        return self.group, self.version, namespace, self.plural

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when there is none of that name."""
        from kubernetes.client.exceptions import ApiException

        try:
            return self._api.get_namespaced_custom_object(*self._args(namespace), name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise self._fail("read", namespace, name, e) from e

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._api.create_namespaced_custom_object(*self._args(namespace), body)
        except ApiException as e:
            raise self._fail("create", namespace, body["metadata"]["name"], e) from e

    def patch(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch (RFC 7386; the client sends ``application/merge-patch+json``): null deletes."""
        from kubernetes.client.exceptions import ApiException

        try:
            return self._api.patch_namespaced_custom_object(*self._args(namespace), name, patch)
        except ApiException as e:
            raise self._fail("patch", namespace, name, e) from e

    def delete(self, namespace: str, name: str) -> bool:
        """Delete (dependents follow in the background); False when it was already gone."""
        from kubernetes.client.exceptions import ApiException

        try:
            self._api.delete_namespaced_custom_object(
                *self._args(namespace), name, propagation_policy="Background"
            )
        except ApiException as e:
            if e.status == 404:
                return False
            raise self._fail("delete", namespace, name, e) from e
        return True
