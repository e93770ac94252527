"""Reading an InferenceService's status: is the rollout done, still going, or failed?

A *judge* looks at the ISVC as the API server returns it and answers True (done), False (not yet) or a
`Failure`. Knative mode is judged on revisions and traffic (kserve v0.20.0 ``inference_service_status.go``
PropagateStatus L567-636); Standard mode on the predictor's Deployment by kubectl's rollout rule and on the
canary statuses. ``status.observedGeneration`` is never compared with the ISVC's ``metadata.generation``:
KServe copies it from the child (Knative Service or Deployment; L456, L635).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bockd.platform.kube.client import condition, is_true

if TYPE_CHECKING:
    from bockd.platform.inference_service.api import InferenceServiceApi

# KServe puts the storageUri on the predictor's pod template (kserve v0.20.0 components/predictor.go L299;
# the storage initializer injector reads it from the pod, storage_initializer_injector.go L202).
SOURCE_URI_ANNOTATION = "internal.serving.kserve.io/storage-initializer-sourceuri"
# Reasons KServe/Knative/Deployments report while pods are still coming up: not failures.
TRANSIENT_REASONS = frozenset({"MinimumReplicasUnavailable", "RevisionMissing", "Deploying", "Pending"})
_FAILING_CONDITIONS = ("Ready", "PredictorReady")
_PROGRESS_DEADLINE = "ProgressDeadlineExceeded"  # a Deployment's Progressing reason when it timed out


@dataclass(frozen=True)
class Failure:
    condition: str
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.condition}=False, reason {self.reason}" + (f": {self.message}" if self.message else "")


@dataclass(frozen=True)
class Refusal(Failure):
    """A request the API server or an admission webhook refused (an HTTP 4xx Status): nothing changed."""

    def __str__(self) -> str:
        return f"the request was refused ({self.reason}): {self.message}"


Verdict = bool | Failure  # True: done; False: not yet; a Failure: failed
Judge = Callable[[dict[str, Any]], Verdict]


def status_of(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("status") or {}


def predictor_status(obj: dict[str, Any]) -> dict[str, Any]:
    return (status_of(obj).get("components") or {}).get("predictor") or {}


def _latest_traffic(obj: dict[str, Any]) -> int | None:
    for t in predictor_status(obj).get("traffic") or []:
        if t.get("latestRevision"):
            return int(t.get("percent") or 0)
    return None


def failure_of(obj: dict[str, Any]) -> Failure | None:
    """A terminal failure: Ready or PredictorReady False with a reason that is not a transient one."""
    for kind in _FAILING_CONDITIONS:
        c = condition(obj, kind)
        reason = c.get("reason") or ""
        if c.get("status") == "False" and reason and reason not in TRANSIENT_REASONS:
            return Failure(kind, reason, c.get("message") or "")
    return None


def summarize(obj: dict[str, Any]) -> str:
    """One line of the status that matters while waiting (logged when it changes)."""
    parts = []
    for kind in ("Ready", "PredictorReady"):
        c = condition(obj, kind)
        reason = f" ({c['reason']})" if c.get("reason") else ""
        parts.append(f"{kind}={c.get('status', 'Unknown')}{reason}")
    p = predictor_status(obj)
    if p.get("latestCreatedRevision"):
        parts.append(f"revision {p.get('latestReadyRevision', '-')}/{p['latestCreatedRevision']}")
    if _latest_traffic(obj) is not None:
        parts.append(f"latest {_latest_traffic(obj)}%")
    for c in status_of(obj).get("canaryStatuses") or []:
        parts.append(f"canary {c.get('name')} {c.get('trafficPercent')}% ready={c.get('ready')}")
    return ", ".join(parts)


# -- Knative mode: revisions and traffic (kserve v0.20.0 inference_service_status.go PropagateStatus L567-636)


def _template(obj: dict[str, Any] | None) -> dict[str, Any]:
    """The predictor as it shapes the pod template: everything but the traffic split."""
    predictor = dict(predictor_of(obj or {}))
    predictor.pop("canaryTrafficPercent", None)
    return predictor


def knative_judge(before: dict[str, Any] | None, after: dict[str, Any], percent: int) -> Judge:
    """Done when the revision of this change is ready and takes ``percent`` % of the traffic.

    ``before``/``after``: the ISVC as stored before and after the request. A change of the predictor (other
    than its traffic split) makes Knative create a revision, so until ``latestCreatedRevision`` moves on
    from ``before``'s the status describes the previous spec and is neither success nor failure.
    """
    old = predictor_status(before or {}).get("latestCreatedRevision")
    needs_new = before is None or _template(before) != _template(after)

    def judge(obj: dict[str, Any]) -> Verdict:
        p = predictor_status(obj)
        created = p.get("latestCreatedRevision")
        if not created or (needs_new and created == old):
            return False
        failure = failure_of(obj)
        if failure is not None:
            return failure
        return (
            is_true(obj, "Ready")
            and p.get("latestReadyRevision") == created
            and _latest_traffic(obj) == percent
        )

    return judge


# -- Standard mode: Deployments (kubectl's rollout rule) and canary statuses


def deployment_name(obj: dict[str, Any]) -> str:
    """``{isvc}-predictor``, or ``{isvc}-{predictor.name}-predictor`` (kserve v0.20.0 constants.go
    PredictorServiceName, L799-804)."""
    name, predictor = obj["metadata"]["name"], predictor_of(obj).get("name")
    return f"{name}-{predictor}-predictor" if predictor else f"{name}-predictor"


def rollout_status(deployment: dict[str, Any]) -> Verdict:
    """kubectl rollout status (kubernetes/kubectl v0.36.3 pkg/polymorphichelpers/rollout_status.go L75-89):
    the spec observed, not past its progress deadline, every replica updated and available, no old ones."""
    meta, spec, status = deployment["metadata"], deployment.get("spec") or {}, deployment.get("status") or {}
    if meta.get("generation", 0) > status.get("observedGeneration", 0):
        return False
    for c in status.get("conditions") or []:
        if c.get("type") == "Progressing" and c.get("reason") == _PROGRESS_DEADLINE:
            return Failure(
                "Progressing", _PROGRESS_DEADLINE, f"Deployment {meta['name']}: {c.get('message')}"
            )
    updated = status.get("updatedReplicas", 0)
    if spec.get("replicas") is not None and updated < spec["replicas"]:
        return False
    return status.get("replicas", 0) <= updated and status.get("availableReplicas", 0) >= updated


def _reflects(deployment: dict[str, Any], obj: dict[str, Any]) -> bool:
    """Whether KServe has written the stored ISVC into the Deployment's pod template: the storageUri
    annotation and the ISVC's labels go there (kserve v0.20.0 components/predictor.go buildObjectMeta
    L498-519, deployment_reconciler.go createRawDefaultDeployment L145-158)."""
    template = ((deployment.get("spec") or {}).get("template") or {}).get("metadata") or {}
    uri = predictor_of(obj).get("model", {}).get("storageUri")
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return (template.get("annotations") or {}).get(SOURCE_URI_ANNOTATION) == uri and all(
        (template.get("labels") or {}).get(k) == v for k, v in labels.items()
    )


def standard_judge(api: InferenceServiceApi, namespace: str) -> Judge:
    """Done when the predictor's Deployment reflects the stored ISVC and has rolled out, no canary is left
    and the ISVC is Ready. The ISVC alone cannot say so: it stays Ready while the Deployment is Available,
    i.e. during a whole rolling update (inference_service_status.go PropagateRawStatus L360-458). Its
    conditions are believed once its status is computed from the current Deployment (the ISVC's
    observedGeneration is the Deployment's, L456)."""

    def judge(obj: dict[str, Any]) -> Verdict:
        if status_of(obj).get("canaryStatuses"):
            return False
        deployment = api.deployment(namespace, deployment_name(obj))
        if deployment is None or not _reflects(deployment, obj):
            return False
        rolled_out = rollout_status(deployment)
        if not rolled_out or isinstance(rolled_out, Failure):
            return rolled_out
        if status_of(obj).get("observedGeneration") != deployment["metadata"].get("generation"):
            return False
        return failure_of(obj) or is_true(obj, "Ready")

    return judge


def canary_judge(canary: str) -> Judge:
    """Done when the canary's status entry is ready (KServe: its Deployment has an available replica,
    components/predictor.go reconcileCanaryDeployments L959-981). KServe reports no failure of a canary:
    a canary that never gets ready times out."""

    def judge(obj: dict[str, Any]) -> Verdict:
        statuses = status_of(obj).get("canaryStatuses") or []
        return any(c.get("name") == canary and c.get("ready") for c in statuses)

    return judge


def predictor_of(obj: dict[str, Any]) -> dict[str, Any]:
    """``spec.predictor`` of an ISVC ({} when absent)."""
    return (obj.get("spec") or {}).get("predictor") or {}
