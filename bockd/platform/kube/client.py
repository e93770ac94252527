"""Custom resources (InferenceServices, TrainJobs) through the official Kubernetes client.

One place for the client configuration (in-cluster first, then ``~/.kube/config``), the pod's own
namespace, and the get / create / patch / delete calls every resource kind needs; subclasses name the
kind and the error they raise.

Writes ask the API server for strict field validation (``fieldValidation=Strict``): a field the installed
CRD does not declare is refused with HTTP 400 ``strict decoding error: unknown field "spec.x"`` instead of
being pruned in silence (the default, ``Warn``, drops it and answers 2xx; kubernetes client 30.1.0
``CustomObjectsApi.create_namespaced_custom_object`` docstring, fieldValidation). That is how an
older KServe or Trainer (a CRD without a field bockd writes) is detected without reading the CRD, which
would need cluster-scoped RBAC.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from bockd.errors import BockdError, ConfigError

POD_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
FIELD_VALIDATION = "Strict"


class KubeApiError(BockdError):
    """An error of a Kubernetes API call: ``status`` is the HTTP code the server answered (None when the
    error is not an answer of the server) and ``api_message`` the message of its Status body."""

    def __init__(self, message: str, status: int | None = None, api_message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.api_message = api_message

    @property
    def refused(self) -> bool:
        """The API server (or an admission webhook) refused the request: it changed nothing.

        4xx other than 404/409/410/429: an invalid object (400 strict decoding, 422 schema), a webhook's
        denial (403: apiserver ``admission/plugin/webhook/errors/statuserror.go`` ToStatusErr wraps
        ``admission webhook "<name>" denied the request: <message>``) or missing RBAC (403).
        """
        return (
            self.status is not None and 400 <= self.status < 500 and self.status not in (404, 409, 410, 429)
        )


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


def condition(obj: Mapping[str, Any] | None, kind: str) -> dict[str, Any]:
    """The ``status.conditions`` entry of type ``kind`` of a resource ({} when it has none yet)."""
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return c
    return {}


def is_true(obj: Mapping[str, Any] | None, kind: str) -> bool:
    """Whether condition ``kind`` of a resource has status ``"True"``."""
    return condition(obj, kind).get("status") == "True"


def status_message(e: Any) -> str:
    """The ``message`` of the Status body the API server answers an error with (else the raw body)."""
    try:
        body = json.loads(e.body)
    except (TypeError, ValueError):
        return str(e.body or e.reason or "")
    return str(body.get("message") or body) if isinstance(body, dict) else str(body)


def api_error(error: type[KubeApiError], what: str, e: Any) -> KubeApiError:
    """``error`` for a failed call ``what`` (e.g. "patch InferenceService ns/name"), with the HTTP status."""
    message = status_message(e)
    return error(
        f"cannot {what}: HTTP {e.status} {e.reason}: {message}", status=e.status, api_message=message
    )


def read_json(call: Any, *args: Any, error: type[KubeApiError], what: str) -> dict[str, Any] | None:
    """The JSON object a GET call of the client answers (as the API server sent it: camelCase), or None
    on 404. ``call`` is a bound ``read_namespaced_*`` method of a typed client API."""
    from kubernetes.client.exceptions import ApiException

    try:
        response = call(*args, _preload_content=False)
    except ApiException as e:
        if e.status == 404:
            return None
        raise api_error(error, f"read {what}", e) from e
    return json.loads(response.data)


class CustomResourceApi:
    """Namespaced calls on one custom resource kind over ``kubernetes.client.CustomObjectsApi``."""

    group: ClassVar[str]
    version: ClassVar[str]
    plural: ClassVar[str]
    kind: ClassVar[str]
    error: ClassVar[type[KubeApiError]] = KubeApiError

    def __init__(self, custom_objects: Any, api_client: Any = None) -> None:
        self._api = custom_objects
        self.api_client = api_client

    @classmethod
    def from_config(cls, configuration: Any = None) -> Any:
        """From a ``kubernetes.client.Configuration``, or `load_kube_config()` when there is none."""
        from kubernetes import client

        configuration = configuration if configuration is not None else load_kube_config(cls.error)
        api_client = client.ApiClient(configuration)
        return cls(client.CustomObjectsApi(api_client), api_client)

    def _fail(self, verb: str, namespace: str, name: str, e: Any) -> KubeApiError:
        return api_error(self.error, f"{verb} {self.kind} {namespace}/{name}", e)

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
            return self._api.create_namespaced_custom_object(
                *self._args(namespace), body, field_validation=FIELD_VALIDATION
            )
        except ApiException as e:
            raise self._fail("create", namespace, body["metadata"]["name"], e) from e

    def patch(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch (RFC 7386; the client sends ``application/merge-patch+json``): null deletes."""
        from kubernetes.client.exceptions import ApiException

        try:
            return self._api.patch_namespaced_custom_object(
                *self._args(namespace), name, patch, field_validation=FIELD_VALIDATION
            )
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
